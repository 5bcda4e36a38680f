"""Reading an image that is not in the page cache at the disk's speed, alongside CRIU's restore of it.

CRIU reads its images as it restores; from a cold page cache its reads keep the disk only partly busy, and
each small read it makes waits behind whatever else the disk has queued. When most of an image is not
cached, restore starts these readers first: large reads in several threads, in the order the restore needs
the bytes (`order`), so that CRIU finds them cached or already on their way (the page cache never reads a page
twice). With the image: the parts of the libraries the worker had touched (image/workingset.py), which CRIU
and the resumed worker would otherwise read a page at a time. After all that: the files the worker saved
outside its image (kept GPU regions), which it reads once it runs again.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import MappingProxyType

from warmstart import linux

_PIECE = 64 << 20
_BUF = 8 << 20
_ASK = 128 << 10  # the kernel reads no more per WILLNEED than the disk's readahead size (128 KiB by default)


def pages_images(images: Path) -> list[Path]:
    """CRIU's pages images, compressed, sealed or not (image/codec.py): all but a few kilobytes of an image's bytes."""
    return sorted(p for p in images.glob("pages-*.img*") if _is_pages(p) and p.stat().st_size > 0)


def _is_pages(p: Path) -> bool:
    return p.match("pages-*.img") or p.match("pages-*.img.z") or p.match("pages-*.img.sealed")  # image/codec.py


def resident_fraction(paths: list[Path], windows: int = 0) -> float:
    """The fraction of these files' bytes in the page cache now (mincore on a mapping that is never touched);
    from `windows` samples of each file (linux.resident_pages), if not 0, each file weighed by its size."""
    total = resident = 0.0
    for p in paths:
        size = p.stat().st_size
        fd = os.open(p, os.O_RDONLY)
        try:
            got = linux.resident_pages(fd, size, windows)
        finally:
            os.close(fd)
        if got and got[1]:
            resident, total = resident + size * got[0] / got[1], total + size
    return resident / total if total else 1.0


Piece = tuple[Path, int, int]  # (file, offset, length)
_HEAD = 128 << 10  # of each library: CRIU checks its build id in the ELF notes near the start


class Readahead:
    """Reads pieces of files into the page cache with `threads` readers until done or stopped, in order: the
    `first` pieces, then, once all of those are in (and, if `held`, once `go_on` is called), the `then` pieces."""

    def __init__(self, first: list[Piece], threads: int, then: list[Piece] | None = None, held: bool = False) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._local = threading.local()
        self._later = threading.Event()  # set by `go_on`: the `then` pieces wait for it too
        if not held:
            self._later.set()
        self._fds: dict[Path, int] = {}
        for p in {r[0] for r in [*first, *(then or [])]}:
            try:
                self._fds[p] = os.open(p, os.O_RDONLY)
            except OSError:
                pass  # only a readahead: whoever needs the file says what is wrong with it
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="readahead")
        started = [self._pool.submit(self._read, *r) for r in _split(first) if r[0] in self._fds]
        later = [self._pool.submit(self._read_after, started, *r) for r in _split(then or []) if r[0] in self._fds]
        self._done = started + later
        self._pool.shutdown(wait=False)

    def _read_after(self, first: list[futures.Future[None]], path: Path, off: int, length: int) -> None:
        futures.wait(first)  # the disk's whole bandwidth goes to what is needed first
        while not self._later.wait(0.05):
            if self._stop.is_set():
                return
        self._read(path, off, length)

    def hold(self) -> None:
        """The `then` pieces wait until `go_on`: the cores are needed for something else first."""
        self._later.clear()

    def go_on(self) -> None:
        self._later.set()

    def _read(self, path: Path, off: int, length: int) -> None:
        if not path.match("pages-*.img") and _is_pages(path):
            # A compressed or sealed image is read by the step that opens it (image/inflated.py): here the disk
            # is only asked for it, with no copy. Copied here too, it took the 2-core VM's cores from that step
            # (a cold vLLM restore opened its image in 5.6 s instead of 3.2).
            for at in range(off, off + length, _ASK):
                if self._stop.is_set():
                    return
                os.posix_fadvise(self._fds[path], at, min(_ASK, off + length - at), os.POSIX_FADV_WILLNEED)
            return
        buf = getattr(self._local, "buf", None)
        if buf is None:  # one per reader, reused: a fresh buffer per piece is fresh memory to fault in
            buf = self._local.buf = memoryview(bytearray(_BUF))
        end = off + length
        while off < end and not self._stop.is_set():
            got = os.preadv(self._fds[path], [buf[: min(_BUF, end - off)]], off)
            if got <= 0:
                return
            off += got

    def wait(self, timeout_s: float | None = None) -> bool:
        """Until every piece is read (or the readers were stopped); False if `timeout_s` passed first."""
        return not futures.wait(self._done, timeout=timeout_s).not_done

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


def whole(paths: list[Path]) -> list[Piece]:
    """Each of these files, from start to end."""
    out = []
    for p in paths:
        try:
            out.append((p, 0, p.stat().st_size))
        except OSError:
            continue
    return out


def _split(pieces: list[Piece]) -> list[Piece]:
    return [(p, o, min(_PIECE, off + n - o)) for p, off, n in pieces for o in range(off, off + n, _PIECE)]


def order(images: Path, ranges: tuple[Piece, ...], saved: tuple[Path, ...] = (),
          instead: Mapping[Path, Path] = MappingProxyType({})) -> tuple[list[Piece], list[Piece]]:
    """What a cold restore needs, in the order it needs it: (first, then). CRIU reads its small images and
    checks each library's build id first, then restores the memfds (small pages images) and the process's
    memory (the large one). The libraries' other pages and the saved files are needed once the process runs
    again; they are read side by side, since the libraries' many small reads alone leave the disk half idle."""
    pages = sorted((instead.get(p, p) for p in pages_images(images)), key=lambda p: p.stat().st_size)
    small = [p for p in sorted(images.iterdir()) if p.is_file() and not _is_pages(p)]
    heads = [(p, 0, _HEAD) for p in dict.fromkeys(r[0] for r in ranges)]  # a read past the end stops there
    return [*whole(small), *heads, *whole(pages)], _interleave(_split(list(ranges)), _split(whole(list(saved))))


def _interleave(a: list[Piece], b: list[Piece]) -> list[Piece]:
    """Both lists in their order, merged so that each has had about as many bytes read at any point."""
    out: list[Piece] = []
    i = j = got_a = got_b = 0
    while i < len(a) or j < len(b):
        if j >= len(b) or (i < len(a) and got_a <= got_b):
            out.append(a[i])
            got_a += a[i][2]
            i += 1
        else:
            out.append(b[j])
            got_b += b[j][2]
            j += 1
    return out


_SAMPLES = 64  # windows of each file: the kernel's walk of all its pages takes ~17 ms a GB, 0.3 s for 18 GB


def start_if_cold(images: Path, threads: int, below: float = 0.5, then: tuple[Path, ...] = (),
                  ranges: tuple[Piece, ...] = (),
                  instead: Mapping[Path, Path] = MappingProxyType({})) -> Readahead | None:
    """Readers for the image, then the `ranges` (the worker's libraries) and the files in `then`, when less than
    `below` of the image's pages and those files is cached; None when it is. `instead`: stored images the
    restore reads from another file (their raw image in the node's cache), read here in their place."""
    everything = [instead.get(p, p) for p in pages_images(images)] + list(then)
    if not everything or resident_fraction(everything, _SAMPLES) >= below:
        return None
    first, later = order(images, ranges, then, instead)
    return Readahead(first, threads, later)
