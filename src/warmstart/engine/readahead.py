"""Reading an image that is not in the page cache at the disk's speed, alongside CRIU's restore of it.

CRIU reads its pages images as it restores; from a cold page cache its reads keep the disk only partly
busy. When most of an image is not cached, restore starts these readers first: large reads in several
threads, so that CRIU finds the pages cached or already on their way (the page cache never reads a page twice).
Ahead of the pages or beside them: the parts of the libraries the worker had touched (engine/workingset.py),
which CRIU and the resumed worker would otherwise read a page at a time. After the pages: the files the worker
saved outside its image (kept GPU regions), which it reads once it runs again.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

_PIECE = 64 << 20
_BUF = 8 << 20


def pages_images(images: Path) -> list[Path]:
    """CRIU's pages images: all but a few kilobytes of an image's bytes."""
    return sorted(p for p in images.glob("pages-*.img") if p.stat().st_size > 0)


def resident_fraction(paths: list[Path]) -> float:
    """The fraction of these files' pages in the page cache now (mincore on a mapping that is never touched)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    total = resident = 0
    for p in paths:
        size = p.stat().st_size
        fd = os.open(p, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                continue
            try:
                pages = -(-size // mmap.PAGESIZE)
                vec = ctypes.create_string_buffer(pages)
                if libc.mincore(addr, size, vec) == 0:
                    total += pages
                    resident += pages - vec.raw.count(b"\x00")
            finally:
                libc.munmap(addr, size)
        finally:
            os.close(fd)
    return resident / total if total else 1.0


Piece = tuple[Path, int, int]  # (file, offset, length)


class Readahead:
    """Reads files into the page cache with `threads` readers until done or stopped: the `ranges` and the
    `paths` first, then, once all of those are in, the files in `then`."""

    def __init__(self, paths: list[Path], threads: int, then: tuple[Path, ...] = (),
                 ranges: tuple[Piece, ...] = ()) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._fds: dict[Path, int] = {}
        for p in {*paths, *then, *(r[0] for r in ranges)}:
            try:
                self._fds[p] = os.open(p, os.O_RDONLY)
            except OSError:
                pass  # only a readahead: whoever needs the file says what is wrong with it
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="readahead")
        first = [self._pool.submit(self._read, *r) for r in [*_split(ranges), *_pieces(paths)] if r[0] in self._fds]
        later = [self._pool.submit(self._read_after, first, *r) for r in _pieces(list(then)) if r[0] in self._fds]
        self._done = first + later
        self._pool.shutdown(wait=False)

    def _read_after(self, first: list[futures.Future], path: Path, off: int, length: int) -> None:
        futures.wait(first)  # the disk's whole bandwidth goes to what is needed first
        self._read(path, off, length)

    def _read(self, path: Path, off: int, length: int) -> None:
        buf = bytearray(min(_BUF, length))
        end = off + length
        while off < end and not self._stop.is_set():
            got = os.preadv(self._fds[path], [memoryview(buf)[: end - off]], off)
            if got <= 0:
                return
            off += got

    def wait(self) -> None:
        """Until every piece is read (or the readers were stopped)."""
        futures.wait(self._done)

    def stop(self) -> None:
        """Stop reading and close the files (waits for reads in progress, at most one buffer each). Idempotent."""
        with self._lock:
            if self._stop.is_set():
                return
            self._stop.set()
            for f in self._done:
                f.cancel()
            futures.wait(self._done)
            for fd in self._fds.values():
                os.close(fd)


def _pieces(paths: list[Path]) -> list[Piece]:
    return [(p, off, _PIECE) for p in paths for off in range(0, p.stat().st_size, _PIECE)]


def _split(ranges: tuple[Piece, ...]) -> list[Piece]:
    return [(p, o, min(_PIECE, off + n - o)) for p, off, n in ranges for o in range(off, off + n, _PIECE)]


def start_if_cold(images: Path, threads: int, below: float = 0.5, then: tuple[Path, ...] = (),
                  ranges: tuple[Piece, ...] = ()) -> Readahead | None:
    """Readers for the `ranges` (the worker's libraries) and the image's pages, then for the files in `then`,
    when less than `below` of the image and those files is cached; None when it is."""
    paths = pages_images(images)
    everything = paths + list(then)
    if not everything or resident_fraction(everything) >= below:
        return None
    return Readahead(paths, threads, then, ranges)
