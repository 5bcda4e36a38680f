"""Copies a restore's inflated images into the raw-image cache after the restoring process has gone, so that
`warmstart restore` returns once its replicas are ready rather than after copying gigabytes (on the 2-core VM,
vLLM's 1.5 GB took 8 s after the replica was ready).

    python -m warmstart.image.keeper DIR NAME=SHA256 ...
    python -m warmstart.image.keeper --fill ARTIFACT NAME=SHA256 ...

It first takes DIR over: renamed to carry its own pid, since `inflated.remove_stale` removes the directories of
dead processes. It then says `taken` on stdout, copies each NAME in DIR into the cache as the image of that
checksum (image/cache.py checks the key and the cache), and removes DIR.

With --fill, after a checkpoint that sealed its large images where CRIU wrote them (image/inplace.py), so left
no raw copy: it opens each image into the file the checkpoint marked for it in the cache (named for this
keeper's pid: a restore that starts meanwhile waits for it), so that the next restore on this node links it.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
from pathlib import Path

from warmstart.artifact import encryption, store
from warmstart.artifact.manifest import IMAGES_DIR
from warmstart.errors import WarmstartError
from warmstart.image import cache, codec

PREFIX = "warmstart-images-"  # inflated.py's, with the pid of the process owning the directory after it
TAKEN = b"taken\n"
_START_S = 30.0  # the most a keeper may take to start and take the directory over


def running() -> bool:
    """Whether a keeper runs on this host (a benchmark waits for them: they share the cores with what it times)."""
    for p in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if b"warmstart.image.keeper" in p.read_bytes():
                return True
        except OSError:
            pass  # it exited meanwhile
    return False


def fill_after_checkpoint(artifact: Path, fresh: dict[str, tuple[str, int]]) -> None:
    """Start a keeper that opens these images of a committed artifact (sealed in place: image/inplace.py) into
    the cache: NAME -> (SHA256, raw size). This process marks each as being written before returning (a restore
    that starts meanwhile waits for it), so it does not wait for the keeper to start."""
    d = cache.cache_dir()
    if not d:
        return
    todo, need = {}, 0
    for n, (sha, size) in fresh.items():
        if cache.KEY.match(sha) and not (d / f"{sha}.img").exists() and cache.make_room(d, need + size):
            todo[n], need = sha, need + size
    if not todo:
        return
    try:
        proc = subprocess.Popen([sys.executable, "-m", "warmstart.image.keeper", "--fill", str(artifact),
                                 *(f"{n}={k}" for n, k in todo.items())],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True, close_fds=True)
    except OSError:
        return
    assert proc.stdin is not None
    try:
        for sha in todo.values():
            os.close(os.open(cache.fill_path(d, sha, proc.pid), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                             0o600))
    except OSError:
        pass  # the keeper fills those marked
    proc.stdin.close()  # go


def hand_over(path: Path, fresh: dict[str, str]) -> bool:
    """Start a keeper for `path`; True once it has the directory (the caller must not touch it then)."""
    return _start([str(path), *(f"{n}={k}" for n, k in fresh.items())])


def _start(args: list[str]) -> bool:
    try:
        proc = subprocess.Popen([sys.executable, "-m", "warmstart.image.keeper", *args],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                start_new_session=True, close_fds=True)
    except OSError:
        return False
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], _START_S)
    taken = bool(ready) and proc.stdout.readline() == TAKEN
    proc.stdout.close()
    if not taken:  # it failed, or hangs: the caller does without it
        proc.kill()
        proc.wait()
    return taken


def _fill(argv: list[str]) -> int:
    sys.stdin.read()  # until the checkpoint has marked the images (fill_after_checkpoint)
    artifact, d = Path(argv[0]), cache.cache_dir()
    manifest = store.load(artifact)
    if d is None or manifest.encryption is None:
        return 2
    key = encryption.artifact_key(artifact, manifest.encryption)
    for item in argv[1:]:
        name, _, sha = item.partition("=")
        tmp = cache.fill_path(d, sha)
        if "/" in name or not cache.KEY.match(sha) or not tmp.is_file() or tmp.is_symlink():
            continue
        try:
            codec.inflate(artifact / IMAGES_DIR / name, tmp, os.cpu_count() or 1, key, existing=True)
            os.replace(tmp, d / f"{sha}.img")
        except (OSError, WarmstartError):
            tmp.unlink(missing_ok=True)
    cache.prune(d)
    return 0


def _take(path: Path) -> Path:
    rest = path.name.removeprefix(PREFIX).split("-", 1)[-1]
    mine = path.with_name(f"{PREFIX}{os.getpid()}-{rest}")
    os.rename(path, mine)
    return mine


def main(argv: list[str]) -> int:
    if argv[:1] == ["--fill"]:
        return _fill(argv[1:])
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
