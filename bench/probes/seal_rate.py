"""The in-place seal's rate on one raw pages image (image/inplace.py), with its CPU time.

    python3 bench/probes/seal_rate.py PAGES.img

The file is sealed where it lies and renamed to PAGES.img.sealed (it is consumed). Make one with a checkpoint
that does not seal: `WARMSTART_ENCRYPT=0 WARMSTART_COMPRESS=0 WARMSTART_ZERO_PAGES=0 warmstart checkpoint ...`.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from warmstart.artifact import encryption
from warmstart.image import codec, inplace


def main() -> None:
    p = Path(sys.argv[1])
    size = p.stat().st_size
    _, key = encryption.new_artifact_key()
    before, t = os.times(), time.monotonic()
    inplace.seal(p, p.with_name(p.name + codec.SEALED_SUFFIX), key, codec.CHUNK, os.cpu_count() or 1, lambda: None)
    wall, after = time.monotonic() - t, os.times()
    print(f"{size / 1e9:.2f} GB sealed in {wall:.2f} s ({size / 1e6 / wall:.0f} MB/s), "
          f"CPU user {after.user - before.user:.2f} s, system {after.system - before.system:.2f} s")


if __name__ == "__main__":
    main()
