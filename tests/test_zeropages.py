"""image/zeropages.py on hand-made CRIU images (the end-to-end check with CRIU's own images is in test_e2e)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from warmstart.image import zeropages as zp

PAGE = zp.PAGE
ANON, FILE = 0x10000000, 0x20000000  # two mappings of 64 pages each


def message(*fields: tuple[int, int | bytes]) -> bytes:
    out = b""
    for number, value in fields:
        if isinstance(value, bytes):
            out += zp._put_varint(number << 3 | 2) + zp._put_varint(len(value)) + value
        else:
            out += zp._put_varint(number << 3) + zp._put_varint(value)
    return out


def image(magic: int, *messages: bytes) -> bytes:
    return struct.pack("<II", zp._COMMON_MAGIC, magic) + b"".join(struct.pack("<I", len(m)) + m for m in messages)


def vma(start: int, status: int, flags: int) -> bytes:
    return message((1, start), (2, start + 64 * PAGE), (3, 0), (4, 0), (5, 3), (6, flags), (7, status), (8, 1))


def entries(path: Path) -> list[tuple[int, int]]:
    head, rest = zp._read_pagemap(path.read_bytes(), path.name)
    return [(zp._fields(e)[1][-1], zp._fields(e)[5][-1]) for e in rest]


@pytest.fixture
def images(tmp_path: Path) -> tuple[Path, bytes]:
    anon = vma(ANON, zp._VMA_AREA_REGULAR | zp._VMA_ANON_PRIVATE, zp._MAP_PRIVATE | zp._MAP_ANONYMOUS)
    file = vma(FILE, zp._VMA_AREA_REGULAR | zp._VMA_FILE_PRIVATE, zp._MAP_PRIVATE)
    (tmp_path / "mm-7.img").write_bytes(image(zp._MM_MAGIC, message((1, 0), (14, anon), (14, file))))
    present = zp._PE_PRESENT
    (tmp_path / "pagemap-7.img").write_bytes(image(
        zp._PAGEMAP_MAGIC, message((1, 3)),
        message((1, ANON), (2, 0), (4, present), (5, 64)), message((1, FILE), (2, 0), (4, present), (5, 64))))
    # anon: 10 data, 20 zeros (dropped), 4 data, 3 zeros (too short: kept), 27 zeros (dropped); file: all zeros
    data = lambda k: bytes([k + 1]) * PAGE  # noqa: E731
    anon_pages = [data(i) for i in range(10)] + [bytes(PAGE)] * 20 + [data(i) for i in range(4)] + \
        [bytes(PAGE)] * 3 + [data(9)] + [bytes(PAGE)] * 26
    pages = b"".join(anon_pages) + bytes(64 * PAGE)
    (tmp_path / "pages-3.img").write_bytes(pages)
    return tmp_path, pages


def test_zero_runs_leave_anonymous_memory_only(images: tuple[Path, bytes]) -> None:
    d, pages = images
    assert zp.drop(d) == (20 + 26) * PAGE
    assert entries(d / "pagemap-7.img") == [(ANON, 10), (ANON + 30 * PAGE, 8), (FILE, 64)]
    kept = pages[:10 * PAGE] + pages[30 * PAGE:38 * PAGE] + pages[64 * PAGE:]
    assert (d / "pages-3.img").read_bytes() == kept
    assert zp.drop(d) == 0  # nothing left to take out
    assert not list(d.glob("*.tmp"))


@pytest.mark.parametrize("damage", ["magic", "short pages", "long pages"])
def test_an_image_it_does_not_understand_is_left_as_it_is(images: tuple[Path, bytes], damage: str) -> None:
    d, pages = images
    if damage == "magic":
        (d / "mm-7.img").write_bytes(b"\0" * 16)
    else:
        (d / "pages-3.img").write_bytes(pages[:-PAGE] if damage == "short pages" else pages + bytes(PAGE))
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    with pytest.raises(zp.ImageError):
        zp.drop(d)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before


def test_a_rewrite_that_fails_leaves_the_image_whole(images: tuple[Path, bytes], monkeypatch) -> None:
    d, _ = images
    before = {p.name: p.read_bytes() for p in d.iterdir()}

    def disk_full(*_a: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(zp.os, "copy_file_range", disk_full)
    with pytest.raises(zp.ImageError, match="No space left"):
        zp.drop(d)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before  # and no .tmp files beside them
