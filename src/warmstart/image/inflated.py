"""A restore's view of a directory of the artifact: CRIU's images (or the worker's /dev/shm segments) with the
compressed or sealed files inflated into memory, since CRIU and the replicas read plain files.

Links to the artifact's other files and to cached raw images (image/cache.py), copies of the cache's set of
the small files, and the rest inflated into
/dev/shm (or the temporary directory when /dev/shm lacks room). Directories that killed restores left behind
are found by their dead pid and removed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from warmstart import procs
from warmstart.artifact.encryption import ImageKey
from warmstart.image import cache, keeper
from warmstart.image.codec import MIN_BYTES, Stop, inflate, packed, raw_name, raw_size
from warmstart.linux import sparse_copy

_SPARE = 256 << 20  # room left in a memory file system after the inflated images


def memory_dir(need: int) -> Path:
    """Where to inflate `need` bytes: /dev/shm (memory) if it has the room, else the temporary directory."""
    try:
        st = os.statvfs("/dev/shm")
        if st.f_bavail * st.f_frsize >= need + _SPARE:
            return Path("/dev/shm")
    except OSError:
        pass
    return Path(tempfile.gettempdir())


_PREFIX = keeper.PREFIX


def remove_stale(where: Path) -> list[Path]:
    """Directories that restores killed before they could clean up left here (their pid is gone); returns them."""
    removed = []
    for d in where.glob(f"{_PREFIX}*-*"):
        pid = d.name[len(_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not procs.alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def _whole(found: Path | None, raw: dict[Path, int]) -> Path | None:
    """The cached set, if it holds each of these files at its raw size (else the files are opened again)."""
    try:
        if found and all((found / raw_name(z)).lstat().st_size == n and (found / raw_name(z)).is_file()
                         for z, n in raw.items()):
            return found
    except OSError:
        pass
    return None


class Inflated:
    """A directory of what CRIU reads of an image: links to its plain files, to the cached raw images of
    compressed or sealed ones, copies of the cache's set of its small files, and the others inflated. `keys`
    names each stored file's checksum (the manifest's: those named are copied into the raw-image cache by
    `remove(keep=True)`, the large ones each, the others as one set); `key` opens sealed files; `use_cache` links
    large raw images the cache holds instead of inflating them (not where CRIU reads the view from another mount
    namespace, in which the link does not resolve); files under `set_below` bytes (all, for None) form the set.
    Removed by `remove` (idempotent)."""

    def __init__(self, src: Path, threads: int, keys: dict[str, str], key: ImageKey | None = None,
                 use_cache: bool = True, stop: Stop = lambda: None, set_below: int | None = MIN_BYTES) -> None:
        self._fresh: dict[Path, str] = {}  # the large images inflated here, and their checksums
        self._held: list[int] = []  # the cached raw images linked here, held in the cache until `remove`
        stored = {z: raw_size(z) for z in packed(src)}
        in_set = {z for z, size in stored.items() if z.name in keys and (set_below is None or size < set_below)}
        self._set_key = cache.set_key({z.name: keys[z.name] for z in in_set})
        have = _whole(cache.cached_set(self._set_key) if self._set_key else None, {z: stored[z] for z in in_set})
        self._set_new = [] if have else sorted(raw_name(z) for z in in_set)  # kept as the set by `remove(keep=True)`
        cached = {z: cache.cached(keys.get(z.name), size, z, stop) if use_cache and size >= MIN_BYTES else None
                  for z, size in stored.items() if z not in in_set or not have}
        where = memory_dir(sum(size for z, size in stored.items() if not cached.get(z)))
        remove_stale(where)
        self.path = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-", dir=where))
        try:
            for p in src.iterdir():
                if p not in stored:
                    (self.path / p.name).symlink_to(p)
            if have is not None:
                for z in in_set:
                    stop()
                    sparse_copy(have / raw_name(z), self.path / raw_name(z))
            self._open(cached, stored, threads, keys, key, stop)
        except BaseException:
            self.remove()
            raise

    def _open(self, cached: dict[Path, Path | None], stored: dict[Path, int], threads: int, keys: dict[str, str],
              key: ImageKey | None, stop: Stop) -> None:
        for z, raw in cached.items():
            out = self.path / raw_name(z)
            if raw:
                try:
                    self._held.append(cache.hold(raw))
                    out.symlink_to(raw)
                    continue
                except FileNotFoundError:
                    pass  # evicted since it was found: opened here instead
            inflate(z, out, threads, key, stop)
            if keys.get(z.name) and stored[z] >= MIN_BYTES and out.name not in self._set_new:
                self._fresh[out] = keys[z.name]

    def remove(self, keep: bool = False, detach: bool = False) -> None:
        """The directory goes. With `keep` (only once CRIU has read the images: their checksums were verified
        before they were inflated), the images inflated here are copied into the cache first; with `detach` too,
        by a process of its own (image/keeper.py) that outlives this one, and this call returns at once (the set
        of small files is copied before it returns)."""
        if keep and self._set_key and self._set_new:
            cache.keep_set([self.path / n for n in self._set_new], self._set_key)
            self._set_new = []
        while self._held:
            os.close(self._held.pop())
        if keep and detach and self._fresh and keeper.hand_over(
                self.path, {raw.name: key for raw, key in self._fresh.items()}):
            self._fresh.clear()
            return
        if keep:
            for raw, key in self._fresh.items():
                cache.copy_into_cache(raw, key)
            self._fresh.clear()
        shutil.rmtree(self.path, ignore_errors=True)
