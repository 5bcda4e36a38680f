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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

from warmstart.errors import ImageError

PAGE = 4096
_COPY_STEP = 64 << 20  # bytes copied between checks for an interruption
MIN_RUN = 8  # pages: shorter runs are kept, so that the pagemap does not fragment into many small reads
_ZERO = bytes(PAGE)
_COMMON_MAGIC, _PAGEMAP_MAGIC, _MM_MAGIC = 0x54564319, 0x56084025, 0x57492820
_PE_PRESENT = 1 << 2
# vma_entry.status and .flags
_VMA_AREA_REGULAR, _VMA_FILE_PRIVATE, _VMA_ANON_PRIVATE = 1 << 0, 1 << 6, 1 << 9
_MAP_PRIVATE, _MAP_ANONYMOUS, _MAP_HUGETLB, _MAP_LOCKED = 0x02, 0x20, 0x40000, 0x2000

Fields = dict[int, list[int | bytes]]  # a decoded protobuf message: field number -> its values, in order


class _Kept(NamedTuple):
    """What stays of one process's pages image."""

    entries: list[bytes]  # the pagemap's entries, the dropped runs cut out
    data: list[tuple[int, int]]  # (offset in the pages image, bytes), in the order of the entries
    removed: int  # bytes dropped


def drop(images: Path, stop: Callable[[], None] = lambda: None) -> int:
    """Cut runs of zero pages out of every process's image in this directory; the bytes taken out. `stop` is
    called between processes and between the ranges copied (it raises to interrupt the pass)."""
    removed = 0
    for pagemap in sorted(images.glob("pagemap-*.img")):
        pid = pagemap.name[len("pagemap-"):-len(".img")]
        mm = images / f"mm-{pid}.img"
        if pid.isdigit() and mm.exists():
            stop()
            removed += _drop_one(pagemap, mm, images, stop)
    return removed


def _drop_one(pagemap: Path, mm: Path, images: Path, stop: Callable[[], None]) -> int:
    head, entries = _read_pagemap(pagemap.read_bytes(), pagemap.name)
    pages = images / f"pages-{_int(_fields(head), 1)}.img"
    areas = _zero_fill_areas(mm.read_bytes(), mm.name)
    fd = os.open(pages, os.O_RDONLY)
    data = None
    try:
        size = os.fstat(fd).st_size
        if size:
            data = mmap.mmap(fd, size, prot=mmap.PROT_READ, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        kept = _keep(entries, data, size, areas, pages.name, pagemap.name)
        if kept.removed:
            stop()
            _rewrite(pagemap, pages, fd, head, kept, stop)
    finally:
        if data is not None:
            data.close()
        os.close(fd)
    return kept.removed


def _keep(entries: list[bytes], data: mmap.mmap | None, size: int, areas: list[tuple[int, int]], pages_name: str,
          pagemap_name: str) -> _Kept:
    """Split the pagemap's entries (over data, the pages image of size bytes) into what stays and what goes."""
    kept_entries: list[bytes] = []
    kept_data: list[tuple[int, int]] = []
    offset = removed = 0
    for entry in entries:
        fields = _fields(entry)
        if not _int(fields, 4, 0) & _PE_PRESENT:
            kept_entries.append(entry)  # no data in the pages image
            continue
        vaddr, n = _int(fields, 1), _int(fields, 5) if 5 in fields else _int(fields, 2, 0)
        if offset + n * PAGE > size:
            raise ImageError(f"{pages_name} ends before {pagemap_name} does")
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
        raise ImageError(f"{pages_name} holds {size - offset} bytes more than {pagemap_name} lists")
    return _Kept(kept_entries, kept_data, removed)


def _rewrite(pagemap: Path, pages: Path, fd: int, head: bytes, kept: _Kept, stop: Callable[[], None]) -> None:
    """Replace the pagemap and the pages image (open as fd) with what is kept of them."""
    new_map, new_pages = pagemap.with_suffix(".tmp"), pages.with_suffix(".tmp")
    try:
        new_map.write_bytes(struct.pack("<II", _COMMON_MAGIC, _PAGEMAP_MAGIC)
                            + b"".join(struct.pack("<I", len(e)) + e for e in [head, *kept.entries]))
        _copy(fd, new_pages, kept.data, stop)
    except BaseException as e:  # the originals are still whole: a checkpoint can go on with them
        new_map.unlink(missing_ok=True)
        new_pages.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise ImageError(f"could not write the smaller {pages.name}: {e}") from e
        raise
    os.replace(new_pages, pages)
    os.replace(new_map, pagemap)


def _runs(data: mmap.mmap, offset: int, vaddr: int, n: int, areas: list[tuple[int, int]]
          ) -> Iterator[tuple[int, int, bool]]:
    """(first page, pages, dropped) of one entry, in order: zero runs of MIN_RUN pages or more inside the
    zero-fill areas are dropped, everything between them kept."""
    # A slice compare per page (4 KiB copied): mmap.find can crash CPython before 3.11.5 (gh-105235), which is
    # Debian 12's Python and the agent image's.
    end = offset + n * PAGE
    zero = bytearray(data[o:o + PAGE] == _ZERO for o in range(offset, end, PAGE))  # 1: a page of zeros
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


def _copy(fd: int, to: Path, kept: list[tuple[int, int]], stop: Callable[[], None]) -> None:
    """Write the kept (offset, length) ranges of fd, one after another, into a new file."""
    out = os.open(to, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for off, length in kept:
            done = 0
            while done < length:
                stop()
                got = os.copy_file_range(fd, out, min(length - done, _COPY_STEP), off + done)
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
    for vma in _messages(_fields(body[4:4 + length]), 14):
        f = _fields(vma)
        status, flags = _int(f, 7), _int(f, 6)
        if (status & _VMA_AREA_REGULAR and status & _VMA_ANON_PRIVATE and not status & _VMA_FILE_PRIVATE
                and flags & _MAP_PRIVATE and flags & _MAP_ANONYMOUS and not flags & (_MAP_HUGETLB | _MAP_LOCKED)):
            areas.append((_int(f, 1), _int(f, 2)))
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


def _fields(message: bytes) -> Fields:
    """Field number -> values: varints as ints, length-delimited as bytes (the protobuf wire format)."""
    out: Fields = {}
    at = 0
    while at < len(message):
        key, at = _varint(message, at)
        number, wire = key >> 3, key & 7
        value: int | bytes
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


def _int(fields: Fields, number: int, default: int | None = None) -> int:
    """The last value of a varint field (the one protobuf keeps); default when the message lacks the field."""
    values = fields.get(number)
    if not values:
        if default is None:
            raise ImageError(f"a CRIU image message lacks its field {number}")
        return default
    value = values[-1]
    if not isinstance(value, int):
        raise ImageError(f"field {number} of a CRIU image message is not a number")
    return value


def _messages(fields: Fields, number: int) -> list[bytes]:
    """The values of a repeated length-delimited field (embedded messages)."""
    values = fields.get(number, [])
    if not all(isinstance(v, bytes) for v in values):
        raise ImageError(f"field {number} of a CRIU image message is not a message")
    return [v for v in values if isinstance(v, bytes)]


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


def _entry(fields: Fields, vaddr: int, count: int) -> bytes:
    """A pagemap_entry like the one given, for `count` pages from vaddr."""
    out = bytearray()
    compat = _int(fields, 2) if 5 in fields else count  # CRIU reads nr_pages where the entry has it
    for number, value in ((1, vaddr), (2, compat), (3, _int(fields, 3) if 3 in fields else None),
                          (4, _int(fields, 4) if 4 in fields else None), (5, count if 5 in fields else None)):
        if value is not None:
            out += _put_varint(number << 3) + _put_varint(value)
    return bytes(out)
