"""The raw-image cache: uncompressed pages images on disk, named by their compressed file's SHA-256.

The checkpoint moves its raw images here (WARMSTART_IMAGE_CACHE, default /var/cache/warmstart/images); a
restore on the same node links one instead of inflating it where that reads no more from the disk (`cached`:
always for a sealed image, for a compressed one while the raw image is mostly in the page cache), and a restore
that inflated an image copies it here once CRIU has read it. An artifact's small files (the images under
MIN_BYTES, its /dev/shm segments) are kept as a set, a directory named by their checksums together, which
later restores copy instead of opening each file again. The newest CACHE_KEEP images and as many sets are
kept, within WARMSTART_IMAGE_CACHE_MB and leaving RESERVE of the disk free. The cache
is used only while it belongs to this user and no one else can write to it, and only a SHA-256 names an
entry, so a manifest cannot point a restore at any other file.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from warmstart import config, procs
from warmstart.image import readahead
from warmstart.linux import sparse_copy

CACHE_KEEP = 8
RESERVE = 8 << 30  # the cache leaves this much of its disk free (or a tenth of the disk, where that is less)
# Opening a stored image fills its raw size of new memory (~5 GB/s on the GPU VMs, ~1 GB/s on the 2-core VM,
# AES-GCM or zlib beside it): counted as at least this fraction of reading the raw size from a disk of 1-2 GB/s.
_OPEN_COST = 0.25
KEY = re.compile(r"^[0-9a-f]{64}$")
_FILL_WAIT_S = 300.0  # the most a restore waits for a checkpoint's copy into the cache
# A smaller image is opened again rather than waited for: the keeper's own Python start (~0.25 s on 2 cores)
# costs more than opening it (the demo's 157 MB: 0.38 s of waiting).
_WAIT_FROM = 256 << 20


def cache_dir() -> Path | None:
    """The cache of raw images, created if missing; None if it cannot be, or others could write to it."""
    d = config.current().image_cache
    try:
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = d.stat()
    except OSError:
        return None
    return d if st.st_uid == os.geteuid() and not st.st_mode & 0o022 else None


def cache_raw(raw: Path, key: str) -> None:
    """Move a raw image the checkpoint compressed into the cache, as the image whose checksum is `key`; where
    the cache is unusable or on another file system, the raw image is removed."""
    d = cache_dir() if KEY.match(key) else None
    try:
        if d:
            os.chmod(raw, 0o600, follow_symlinks=False)  # CRIU writes its images 0644: process memory
            os.replace(raw, d / f"{key}.img")
            prune(d)
    except OSError:
        pass
    raw.unlink(missing_ok=True)


def copy_into_cache(raw: Path, key: str) -> None:
    """Copy an image a restore inflated into the cache, as the image whose checksum is `key`; nothing if the
    cache is unusable, its disk too full, or the copy fails (a restore does not depend on it)."""
    d = cache_dir() if KEY.match(key) else None
    try:  # an older copy of the same image (no longer in the page cache: else it was linked) gives its room
        if not d or not make_room(d, raw.stat().st_size, replaces=d / f"{key}.img"):
            return
    except OSError:  # gone (a keeper that was given up on had taken it)
        return
    tmp = fill_path(d, key)
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        shutil.copyfile(raw, tmp)  # into the file just made, keeping its mode
        os.replace(tmp, d / f"{key}.img")
        prune(d)
    except OSError:
        tmp.unlink(missing_ok=True)


def _size(p: Path) -> int:
    try:
        if p.is_dir() and not p.is_symlink():  # a set: what its sparse files hold
            return sum(f.stat().st_blocks * 512 for f in p.iterdir())
        return p.stat().st_size
    except OSError:
        return 0


def _remove(p: Path) -> bool:
    """Remove an entry (a set, an image, a half-written copy); False, and kept, for an image a restore holds
    (`hold`): that restore's CRIU has yet to open the link to it."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
        return True
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        p.unlink(missing_ok=True)  # gone already, or a symlink (never an entry's form): away with it
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        p.unlink(missing_ok=True)  # under the lock: a hold waiting for it then finds the file unlinked
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def hold(p: Path) -> int:
    """A descriptor holding cached image `p` in the cache until it is closed (the cache removes only images no
    one holds); the caller links or opens `p` itself. FileNotFoundError if it is gone, or being removed."""
    fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
    fcntl.flock(fd, fcntl.LOCK_SH)
    if os.fstat(fd).st_nlink == 0:
        os.close(fd)
        raise FileNotFoundError(p)
    return fd


def make_room(d: Path, size: int, replaces: Path | None = None) -> bool:
    """Whether an image (or set) of `size` bytes can enter the cache: within its budget, and leaving its disk
    the reserve once the least recently used entries go, which this then removes. `replaces`: an older copy of
    the same entry, whose bytes it takes over. (An entry of an artifact no longer restored would otherwise keep
    every newer one out: each of their restores then opened its image again, 4.5 s for 18 GB on the H200.)"""
    if size > config.current().image_cache_mb << 20:
        return False
    replacing = _size(replaces) if replaces else 0
    older = [(p, n) for p, n in entries(d) if p != replaces]  # newest first
    if _free(d) + sum(n for _, n in older) - size + replacing < _reserve(d):
        return False  # not even with the cache emptied: keep what it holds
    while older and _free(d) - size + replacing < _reserve(d):
        _remove(older.pop()[0])  # one a restore holds stays
    return _free(d) - size + replacing >= _reserve(d)


def entries(d: Path) -> list[tuple[Path, int]]:
    """(image or set, bytes) of the cache, newest first."""
    found = sorted([*d.glob("*.img"), *d.glob("*.set")], key=lambda p: p.stat().st_mtime, reverse=True)
    return [(p, _size(p)) for p in found]


def _free(d: Path) -> int:
    st = os.statvfs(d)
    return st.f_bavail * st.f_frsize


def _reserve(d: Path) -> int:
    st = os.statvfs(d)
    return min(RESERVE, st.f_blocks * st.f_frsize // 10)


def prune(d: Path) -> None:
    """The newest CACHE_KEEP images that fit in WARMSTART_IMAGE_CACHE_MB stay, as long as the disk keeps its
    reserve free: the oldest go first."""
    budget = config.current().image_cache_mb << 20
    kept = []
    seen = {".img": 0, ".set": 0}
    for p, size in entries(d):
        budget -= size
        seen[p.suffix] += 1
        if seen[p.suffix] > CACHE_KEEP or budget < 0:
            _remove(p)
        else:
            kept.append(p)
    reserve = _reserve(d)
    while kept and _free(d) < reserve:
        _remove(kept.pop())
    for p in d.glob(".*.tmp"):  # copies that a killed restore left half done
        pid = _writer(p)
        if pid is not None and not procs.alive(pid):
            _remove(p)


def _writer(tmp: Path) -> int | None:
    """The pid that `fill_path` named this file for."""
    pid = tmp.name[:-len(".tmp")].rsplit("-", 1)[-1]
    return int(pid) if pid.isdigit() else None


def clear() -> list[Path]:
    """Remove every cached image a restore does not hold (restores then inflate again); returns those removed."""
    d = cache_dir()
    return [p for p, _ in entries(d) if _remove(p)] if d else []


def fill_path(d: Path, key: str, pid: int | None = None) -> Path:
    """Where process `pid` (this one by default) writes the cache's image of `key` before renaming it into place."""
    return d / f".{key}-{os.getpid() if pid is None else pid}.tmp"


def _wait_for_fill(d: Path, key: str, stop: Callable[[], None]) -> None:
    """While another process (image/keeper.py after a checkpoint) writes this image into the cache, wait for it:
    it started before this restore, so for a large image waiting ends no later than opening it here would."""
    end = time.monotonic() + _FILL_WAIT_S
    while time.monotonic() < end:
        stop()  # raises once the restore is interrupted
        if not any((pid := _writer(p)) is not None and procs.alive(pid) for p in d.glob(f".{key}-*.tmp")):
            return
        time.sleep(0.02)


def cached(key: str | None, size: int, stored: Path, stop: Callable[[], None] = lambda: None) -> Path | None:
    """The cache's raw image for this checksum, if it is there (or being written there) and cheaper to read than
    opening `stored`, the artifact's compressed or sealed file of it (`_cheaper`)."""
    d = cache_dir() if key and KEY.match(key) else None
    if not d:
        return None
    assert key is not None
    path = d / f"{key}.img"
    if not path.exists() and size >= _WAIT_FROM:
        _wait_for_fill(d, key, stop)
    try:
        if path.stat().st_size == size and _cheaper(path, size, stored):
            os.utime(path)  # recently used: pruned last
            return path
    except OSError:
        pass
    return None


def _cheaper(raw: Path, size: int, stored: Path) -> bool:
    """Whether reading the raw image costs no more than opening the stored file, counting the bytes each needs
    from the disk (what the page cache lacks) and the opening's own cost. A sealed file is as large as its raw
    image, so even a cold raw image is cheaper; a compressed one needs fewer bytes from a cold disk."""
    raw_disk = size * (1 - readahead.resident_fraction([raw], windows=64))
    stored_disk = stored.stat().st_size * (1 - readahead.resident_fraction([stored], windows=64))
    return raw_disk <= stored_disk + _OPEN_COST * size


def set_key(files: dict[str, str]) -> str | None:
    """The name of the set of these files (name -> the stored file's checksum, from the verified manifest)."""
    if not files or not all(KEY.match(k) for k in files.values()):
        return None
    return hashlib.sha256("".join(f"{n} {k}\n" for n, k in sorted(files.items())).encode()).hexdigest()


def cached_set(key: str) -> Path | None:
    """The cache's set of that name, if it is there."""
    d = cache_dir() if KEY.match(key) else None
    path = d / f"{key}.set" if d else None
    if path is None or path.is_symlink() or not path.is_dir():
        return None
    os.utime(path)  # recently used: pruned last
    return path


def keep_set(files: list[Path], key: str) -> None:
    """Copy these raw files (holes kept) into the cache as the set `key`; nothing if the cache is unusable or
    its disk too full, or the copy fails (a restore does not depend on it)."""
    d = cache_dir() if KEY.match(key) else None
    if not d or (d / f"{key}.set").exists():
        return
    tmp = fill_path(d, key)
    try:
        if not make_room(d, sum(f.stat().st_blocks * 512 for f in files)):
            return
        tmp.mkdir(mode=0o700)
        for f in files:
            sparse_copy(f, tmp / f.name)
        os.rename(tmp, d / f"{key}.set")
        prune(d)
    except OSError:
        _remove(tmp)
