"""Copies a restore's inflated images into the raw-image cache after the restoring process has gone, so that
`warmstart restore` returns once its replicas are ready rather than after copying gigabytes (on the 2-core VM,
vLLM's 1.5 GB took 8 s after the replica was ready).

    python -m warmstart.image.keeper DIR NAME=SHA256 ...

It first takes DIR over: renamed to carry its own pid, since `inflated.remove_stale` removes the directories of
dead processes. It then says `taken` on stdout, copies each NAME in DIR into the cache as the image of that
checksum (image/cache.py checks the key and the cache), and removes DIR.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
from pathlib import Path

from warmstart.image import cache

PREFIX = "warmstart-images-"  # inflated.py's, with the pid of the process owning the directory after it
TAKEN = b"taken\n"
_START_S = 30.0  # the most a keeper may take to start and take the directory over


def hand_over(path: Path, fresh: dict[str, str]) -> bool:
    """Start a keeper for `path`; True once it has the directory (the caller must not touch it then)."""
    try:
        proc = subprocess.Popen([sys.executable, "-m", "warmstart.image.keeper", str(path),
                                 *(f"{n}={k}" for n, k in fresh.items())],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                start_new_session=True, close_fds=True)
    except OSError:
        return False
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], _START_S)
    taken = bool(ready) and proc.stdout.readline() == TAKEN
    proc.stdout.close()
    if not taken:  # it failed, or hangs: this process copies instead (from the directory, if it still has it)
        proc.kill()
        proc.wait()
    return taken


def _take(path: Path) -> Path:
    rest = path.name.removeprefix(PREFIX).split("-", 1)[-1]
    mine = path.with_name(f"{PREFIX}{os.getpid()}-{rest}")
    os.rename(path, mine)
    return mine


def main(argv: list[str]) -> int:
    src = Path(argv[0])
    if not src.name.startswith(PREFIX) or src.is_symlink() or not src.is_dir():
        return 2
    mine = _take(src)
    os.write(1, TAKEN)
    os.close(1)
    try:
        for item in argv[1:]:
            name, _, key = item.partition("=")
            if "/" not in name:
                cache.copy_into_cache(mine / name, key)
    finally:
        shutil.rmtree(mine, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
