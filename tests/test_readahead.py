"""Restore's readahead of an image missing from the page cache (engine/readahead.py), on real files."""

from __future__ import annotations

import os
import time
from pathlib import Path

from conftest import evict_pages
from warmstart.engine import readahead


def _image(tmp_path: Path) -> Path:
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
    r = readahead.Readahead(readahead.pages_images(images), threads=1)
    r.stop()
    assert all(f.done() for f in r._done)


def test_files_after_the_image_are_read_once_all_of_it_is_in(tmp_path: Path) -> None:
    images = _image(tmp_path)
    later = tmp_path / "saved.bin"
    later.write_bytes(os.urandom(16 << 20))
    events: list[tuple[str, str]] = []

    class Logged(readahead.Readahead):
        def _read(self, path: Path, off: int) -> None:
            events.append(("start", path.name))
            super()._read(path, off)
            events.append(("end", path.name))

    evict_pages(images)
    r = Logged(readahead.pages_images(images), threads=4, then=(later,))
    r.wait()
    r.stop()
    assert events.index(("start", "saved.bin")) > events.index(("end", "pages-1.img")), events
    assert readahead.resident_fraction([images / "pages-1.img", later]) > 0.99
