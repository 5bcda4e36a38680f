"""Restore's readahead of an image missing from the page cache (image/readahead.py), on real files."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from conftest import evict_file, evict_pages
from warmstart.image import readahead


def _image(tmp_path: Path) -> Path:
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "pages-1.img").write_bytes(os.urandom(24 << 20))
    (tmp_path / "pages-2.img").write_bytes(b"")  # empty images are skipped
    (tmp_path / "core-1.img").write_bytes(b"x" * 4096)  # not a pages image
    return tmp_path


def test_residency_follows_the_page_cache(tmp_path: Path) -> None:
    images = _image(tmp_path)
    paths = readahead.pages_images(images)
    assert [p.name for p in paths] == ["pages-1.img"]
    assert readahead.resident_fraction(paths) > 0.9
    evict_pages(images)
    assert readahead.resident_fraction(paths) < 0.1


def test_sampled_residency_weighs_each_file_by_its_size(tmp_path: Path) -> None:
    big, small = tmp_path / "big", tmp_path / "small"
    big.write_bytes(os.urandom(48 << 20))
    small.write_bytes(os.urandom(1 << 20))
    evict_file(big)
    sampled = readahead.resident_fraction([big, small], windows=8)
    assert sampled == pytest.approx(readahead.resident_fraction([big, small]), abs=0.03)
    assert sampled < 0.05  # 8 windows of the cold 48 MiB count for 48 MiB, not for 8 windows' pages


def test_a_cold_image_is_read_in_and_a_warm_one_left_alone(tmp_path: Path) -> None:
    images = _image(tmp_path)
    assert readahead.start_if_cold(images, threads=2) is None
    evict_pages(images)
    r = readahead.start_if_cold(images, threads=2)
    assert r is not None
    for _ in range(200):
        if readahead.resident_fraction([images / "pages-1.img"]) > 0.99:
            break
        time.sleep(0.01)
    r.wait()
    r.stop()
    r.stop()  # idempotent
    assert readahead.resident_fraction([images / "pages-1.img"]) > 0.99


def test_stop_ends_the_readers_early(tmp_path: Path) -> None:
    images = _image(tmp_path)
    evict_pages(images)
    r = readahead.Readahead(readahead.whole(readahead.pages_images(images)), threads=1)
    r.stop()
    assert all(f.done() for f in r._done)


def test_files_after_the_image_are_read_once_all_of_it_is_in(tmp_path: Path) -> None:
    images = _image(tmp_path)
    later = tmp_path / "saved.bin"
    later.write_bytes(os.urandom(16 << 20))
    events: list[tuple[str, str]] = []

    class Logged(readahead.Readahead):
        def _read(self, path: Path, off: int, length: int) -> None:
            events.append(("start", path.name))
            super()._read(path, off, length)
            events.append(("end", path.name))

    evict_pages(images)
    r = Logged(readahead.whole(readahead.pages_images(images)), threads=4, then=readahead.whole([later]))
    r.wait()
    r.stop()
    assert events.index(("start", "saved.bin")) > events.index(("end", "pages-1.img")), events
    assert readahead.resident_fraction([images / "pages-1.img", later]) > 0.99


def test_a_restore_reads_what_it_needs_first(tmp_path: Path) -> None:
    images = _image(tmp_path / "images")
    (images / "pages-3.img").write_bytes(b"y" * 8192)  # a memfd's pages: restored before the process's memory
    (images / "pages-4.img.sealed").write_bytes(b"s" * 8192)  # asked of the disk: the step that opens it reads it
    lib = tmp_path / "lib.so"
    lib.write_bytes(b"z" * (4 << 20))
    saved = tmp_path / "weights.bin"
    saved.write_bytes(b"w" * (130 << 20))
    first, then = readahead.order(images, ((lib, 1 << 20, 4096), (lib, 3 << 20, 70 << 20)), (saved,))
    assert [(p.name, off) for p, off, _ in first] == [
        ("core-1.img", 0),  # CRIU's small images
        ("lib.so", 0),  # the head of each library, where CRIU checks its build id
        ("pages-3.img", 0), ("pages-4.img.sealed", 0), ("pages-1.img", 0),  # pages images, smallest first
    ]
    # Then the libraries' working set and the saved files, side by side, in pieces of at most 64 MiB.
    assert [(p.name, off >> 20) for p, off, _ in then] == [
        ("lib.so", 1), ("weights.bin", 0), ("lib.so", 3), ("weights.bin", 64), ("lib.so", 67), ("weights.bin", 128)]


def test_a_sealed_image_is_asked_of_the_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = _image(tmp_path)
    sealed = images / "pages-5.img.sealed"
    sealed.write_bytes(os.urandom(16 << 20))
    evict_pages(images)
    copied: list[int] = []
    real = os.preadv

    def spy(fd: int, buffers: list[memoryview], offset: int) -> int:
        copied.append(offset)
        return real(fd, buffers, offset)

    monkeypatch.setattr(readahead.os, "preadv", spy)
    r = readahead.Readahead(readahead.whole([sealed]), threads=2)
    r.wait()
    for _ in range(200):  # the reads were only started
        if readahead.resident_fraction([sealed]) > 0.99:
            break
        time.sleep(0.01)
    r.stop()
    assert readahead.resident_fraction([sealed]) > 0.99
    assert not copied  # the opening step reads it: the readahead copies none of it


def test_a_stored_image_whose_raw_image_the_restore_links_is_read_from_that_file(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    sealed = images / "pages-5.img.sealed"
    sealed.write_bytes(os.urandom(16 << 20))
    raw = tmp_path / "cache" / ("5" * 64 + ".img")  # its raw image in the node's cache, on a cold disk
    raw.parent.mkdir()
    raw.write_bytes(os.urandom(16 << 20))
    evict_file(sealed)
    evict_file(raw)
    first, _ = readahead.order(images, (), instead={sealed: raw})
    assert [p for p, _, _ in first] == [raw]
    r = readahead.start_if_cold(images, threads=2, instead={sealed: raw})
    assert r is not None and r.wait(10)
    r.stop()
    assert readahead.resident_fraction([raw]) > 0.99
    assert readahead.resident_fraction([sealed]) < 0.1  # the restore does not read it: nor does the readahead
    assert readahead.start_if_cold(images, threads=2, instead={sealed: raw}) is None  # what it reads is cached


def test_held_pieces_wait_for_go_on(tmp_path: Path) -> None:
    images = _image(tmp_path)
    later = tmp_path / "lib.so"
    later.write_bytes(os.urandom(8 << 20))
    evict_pages(tmp_path)
    evict_file(later)
    r = readahead.Readahead(readahead.whole(readahead.pages_images(images)), threads=2,
                            then=readahead.whole([later]), held=True)
    assert not r.wait(0.5)  # the image is in, the held piece is not read
    assert readahead.resident_fraction([images / "pages-1.img"]) > 0.99
    assert readahead.resident_fraction([later]) < 0.1
    r.go_on()
    assert r.wait(10)
    assert readahead.resident_fraction([later]) > 0.99
    r.stop()


def test_working_set_is_the_touched_pages_of_mapped_files(tmp_path: Path) -> None:
    import mmap

    from warmstart.image import workingset

    f = tmp_path / "lib.so"
    f.write_bytes(os.urandom(64 << 20))
    with open(f, "rb") as fh:
        m = mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ)
        try:
            m[8 << 20]  # touch one page 8 MiB in, and 1 MiB from 40 MiB on
            m[(40 << 20) : (41 << 20)]
            (entry,) = [w for w in workingset.capture([os.getpid()]) if w.path == str(f)]
        finally:
            m.close()
    assert entry.size == 64 << 20
    covered = lambda off: any(a <= off < a + n for a, n in entry.ranges)  # noqa: E731
    assert covered(8 << 20) and covered(40 << 20) and covered((41 << 20) - 1)
    assert not covered(0) and not covered(20 << 20) and not covered(60 << 20)
    assert workingset.total_bytes([entry]) <= 8 << 20  # pages map in folios of up to 2 MiB

    fd = os.open(f, os.O_RDONLY)  # drop the file from the page cache (written pages first)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    r = readahead.Readahead(list(workingset.pieces([entry])), threads=2)
    r.wait()
    r.stop()
    assert readahead.resident_fraction([f]) < 0.2  # the ranges, not the whole file
    f.write_bytes(b"x")  # another file now: not read
    assert workingset.pieces([entry]) == ()
