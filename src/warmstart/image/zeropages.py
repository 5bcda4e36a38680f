"""Pages of zeros taken out of CRIU's image after the dump: a restore need not read what it would get anyway.

CRIU dumps every page a process has touched, zeros included. A CUDA worker has many: the driver's checkpoint
copies the GPU's memory into the process, the context's reserves among it (0.63 of the 1.41 GB pages image of
the 1.1B reference worker). A page of a private anonymous mapping that the image does not hold comes back as a
fresh zero page: that is how CRIU restores pages the process never touched, and how it treats a child's
inherited mapping (it drops the pages the child's image lacks). So runs of zero pages in such mappings are cut
out of the pagemap and pages images. Pages of file mappings stay, zeros or not: leaving one out would bring
back the file's bytes.

The images are CRIU's: a pagemap-PID.img lists (address, pages, flags) entries, protobuf, for the pages
images' data in order; mm-PID.img holds the mappings. Only the fields needed are decoded.
"""

from __future__ import annotations

import bisect
import mmap
import os
import struct
from pathlib import Path
from typing import Iterator

PAGE = 4096
MIN_RUN = 8  # pages: shorter runs are kept, so that the pagemap does not fragment into many small reads
_ZERO = bytes(PAGE)
_COMMON_MAGIC, _PAGEMAP_MAGIC, _MM_MAGIC = 0x54564319, 0x56084025, 0x57492820
_PE_PRESENT = 1 << 2
# vma_entry.status and .flags
_VMA_AREA_REGULAR, _VMA_FILE_PRIVATE, _VMA_ANON_PRIVATE = 1 << 0, 1 << 6, 1 << 9
_MAP_PRIVATE, _MAP_ANONYMOUS, _MAP_HUGETLB, _MAP_LOCKED = 0x02, 0x20, 0x40000, 0x2000


class ImageError(ValueError):
    """An image this module does not understand, or could not rewrite: it was left as it is."""


def drop(images: Path) -> int:
    """Cut runs of zero pages out of every process's image in this directory; the bytes taken out."""
    removed = 0
    for pagemap in sorted(images.glob("pagemap-*.img")):
        pid = pagemap.name[len("pagemap-"):-len(".img")]
        mm = images / f"mm-{pid}.img"
        if pid.isdigit() and mm.exists():
            removed += _drop_one(pagemap, mm, images)
    return removed


def _drop_one(pagemap: Path, mm: Path, images: Path) -> int:
    head, entries = _read_pagemap(pagemap.read_bytes(), pagemap.name)
    pages = images / f"pages-{_fields(head)[1][-1]}.img"
    areas = _zero_fill_areas(mm.read_bytes(), mm.name)
    kept_entries: list[bytes] = []
    kept_data: list[tuple[int, int]] = []  # (offset in the pages image, bytes)
    offset = removed = 0
    fd = os.open(pages, os.O_RDONLY)
    data = None
    try:
        size = os.fstat(fd).st_size
        if size:
            data = mmap.mmap(fd, size, prot=mmap.PROT_READ, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        for entry in entries:
            fields = _fields(entry)
            if not fields.get(4, [0])[-1] & _PE_PRESENT:
                kept_entries.append(entry)  # no data in the pages image
                continue
            vaddr, n = fields[1][-1], fields.get(5, fields.get(2, [0]))[-1]
            if offset + n * PAGE > size:
                raise ImageError(f"{pages.name} ends before {pagemap.name} does")
            if not n:
                kept_entries.append(entry)
                continue
            assert data is not None  # size > 0
            for first, count, zero in _runs(data, offset, vaddr, n, areas):
                if zero:
                    removed += count * PAGE
                else:
                    kept_entries.append(_entry(fields, vaddr + first * PAGE, count))
                    kept_data.append((offset + first * PAGE, count * PAGE))
            offset += n * PAGE
        if offset != size:
            raise ImageError(f"{pages.name} holds {size - offset} bytes more than {pagemap.name} lists")
        if removed:
            new_map, new_pages = pagemap.with_suffix(".tmp"), pages.with_suffix(".tmp")
            try:
                new_map.write_bytes(struct.pack("<II", _COMMON_MAGIC, _PAGEMAP_MAGIC)
                                    + b"".join(struct.pack("<I", len(e)) + e for e in [head, *kept_entries]))
                _copy(fd, new_pages, kept_data)
            except OSError as e:  # the originals are still whole: a checkpoint can go on with them
                new_map.unlink(missing_ok=True)
                new_pages.unlink(missing_ok=True)
                raise ImageError(f"could not write the smaller {pages.name}: {e}") from e
            os.replace(new_pages, pages)
            os.replace(new_map, pagemap)
    finally:
        if data is not None:
            data.close()
        os.close(fd)
    return removed


def _runs(data: mmap.mmap, offset: int, vaddr: int, n: int, areas: list[tuple[int, int]]
          ) -> Iterator[tuple[int, int, bool]]:
    """(first page, pages, dropped) of one entry, in order: zero runs of MIN_RUN pages or more inside the
    zero-fill areas are dropped, everything between them kept."""
    # find() within one page's bounds is one compare in place: nothing is copied out of the page cache
    end = offset + n * PAGE
    zero = bytearray(data.find(_ZERO, o, o + PAGE) == o for o in range(offset, end, PAGE))  # 1: a page of zeros
    ends = [e for _, e in areas]
    start = i = 0
    while (a := zero.find(1, i)) >= 0:
        b = zero.find(0, a)
        b = n if b < 0 else b
        k = bisect.bisect_right(ends, vaddr + a * PAGE)  # the first area that ends after the run starts
        while k < len(areas) and areas[k][0] < vaddr + b * PAGE:
            lo = max(a, -(-(areas[k][0] - vaddr) // PAGE))
            hi = min(b, (areas[k][1] - vaddr) // PAGE)
            if hi - lo >= MIN_RUN:
                if lo > start:
                    yield start, lo - start, False
                yield lo, hi - lo, True
                start = hi
            k += 1
        i = b
    if n > start:
        yield start, n - start, False


def _copy(fd: int, to: Path, kept: list[tuple[int, int]]) -> None:
    """Write the kept (offset, length) ranges of fd, one after another, into a new file."""
    out = os.open(to, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for off, length in kept:
            done = 0
            while done < length:
                got = os.copy_file_range(fd, out, length - done, off + done)
                if got <= 0:
                    raise OSError(f"copy_file_range ended at byte {off + done}")
                done += got
    finally:
        os.close(out)


def _zero_fill_areas(mm: bytes, name: str) -> list[tuple[int, int]]:
    """(start, end) of the private anonymous mappings, sorted: where a page the image lacks comes back as zeros."""
    body = _body(mm, _MM_MAGIC, name)
    (length,) = struct.unpack_from("<I", body)
    areas = []
    for vma in _fields(body[4:4 + length]).get(14, []):
        f = _fields(vma)
        status, flags = f[7][-1], f[6][-1]
        if (status & _VMA_AREA_REGULAR and status & _VMA_ANON_PRIVATE and not status & _VMA_FILE_PRIVATE
                and flags & _MAP_PRIVATE and flags & _MAP_ANONYMOUS and not flags & (_MAP_HUGETLB | _MAP_LOCKED)):
            areas.append((f[1][-1], f[2][-1]))
    return sorted(areas)


def _read_pagemap(data: bytes, name: str) -> tuple[bytes, list[bytes]]:
    body = _body(data, _PAGEMAP_MAGIC, name)
    messages, at = [], 0
    while at < len(body):
        if at + 4 > len(body):
            raise ImageError(f"{name} ends in the middle of an entry")
        (length,) = struct.unpack_from("<I", body, at)
        messages.append(body[at + 4: at + 4 + length])
        at += 4 + length
    if at != len(body) or not messages:
        raise ImageError(f"{name} ends in the middle of an entry")
    return messages[0], messages[1:]


def _body(data: bytes, magic: int, name: str) -> bytes:
    if len(data) < 8 or struct.unpack_from("<II", data) != (_COMMON_MAGIC, magic):
        raise ImageError(f"{name} is not the CRIU image it should be (magic)")
    return data[8:]


def _fields(message: bytes) -> dict[int, list]:
    """Field number -> values: varints as ints, length-delimited as bytes (the protobuf wire format)."""
    out: dict[int, list] = {}
    at = 0
    while at < len(message):
        key, at = _varint(message, at)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, at = _varint(message, at)
        elif wire == 2:
            length, at = _varint(message, at)
            value, at = message[at: at + length], at + length
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, at = int.from_bytes(message[at: at + size], "little"), at + size
        else:
            raise ImageError(f"unexpected protobuf wire type {wire}")
        out.setdefault(number, []).append(value)
    if at != len(message):
        raise ImageError("a protobuf message ends early")
    return out


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(data):
            raise ImageError("a protobuf varint ends early")
        b = data[at]
        at += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, at
        shift += 7


def _put_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        out.append(b | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _entry(fields: dict[int, list], vaddr: int, count: int) -> bytes:
    """A pagemap_entry like the one given, for `count` pages from vaddr."""
    out = bytearray()
    compat = fields[2][-1] if 5 in fields else count  # CRIU reads nr_pages where the entry has it
    for number, value in ((1, vaddr), (2, compat), (3, fields.get(3, [None])[-1]),
                          (4, fields.get(4, [None])[-1]), (5, count if 5 in fields else None)):
        if value is not None:
            out += _put_varint(number << 3) + _put_varint(int(value))
    return bytes(out)
