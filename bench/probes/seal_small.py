"""The seal's time on an artifact's small files: its /dev/shm segments and its images under 32 MiB.

    python3 bench/probes/seal_small.py ARTIFACT

Each sealed file is opened into a scratch directory under /var/tmp, the whole set is sealed again with
image/codec.py's `seal` (timed), and every file is opened back and compared. Run with the environment the
artifact was made in (WARMSTART_HOME, WARMSTART_KEY_DIR), as bench/vllm_cpu.py sets it.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

from warmstart.artifact import encryption, store
from warmstart.artifact.manifest import IMAGES_DIR, SHM_DIR
from warmstart.image import codec


def _timed(files: list[Path], key: encryption.ImageKey, scratch: Path) -> float:
    raws = {}
    for src in files:
        dst = scratch / codec.raw_name(src)
        codec.inflate(src, dst, 2, key)
        raws[dst] = dst.read_bytes()
    t = time.monotonic()
    codec.seal(list(raws), key, 2, "auto")
    seconds = time.monotonic() - t
    for dst, raw in raws.items():
        back = dst.with_name(dst.name + ".back")
        codec.inflate(dst.with_name(dst.name + codec.SEALED_SUFFIX), back, 2, key)
        assert back.read_bytes() == raw, dst.name
    return seconds


def main() -> None:
    art = Path(sys.argv[1])
    m = store.load(art)
    assert m.encryption is not None, "the artifact is not sealed"
    key = encryption.artifact_key(art, m.encryption)
    groups = {"/dev/shm segments": sorted((art / SHM_DIR).glob("*" + codec.SEALED_SUFFIX)),
              "images under 32 MiB": [p for p in sorted((art / IMAGES_DIR).glob("*" + codec.SEALED_SUFFIX))
                                      if codec.raw_size(p) < codec.MIN_BYTES]}
    for what, files in groups.items():
        scratch = Path(tempfile.mkdtemp(prefix="warmstart-seal-small-", dir="/var/tmp"))
        try:
            print(f"{what}: {len(files)} files sealed in {_timed(files, key, scratch):.3f} s (opened back: same bytes)")
        finally:
            shutil.rmtree(scratch)


if __name__ == "__main__":
    main()
