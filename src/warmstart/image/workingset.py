"""The pages of mapped files a worker has touched (its libraries' working set), read ahead on a cold restore.

A restored process maps its libraries again, but after a reboot none of their pages are cached: CRIU reads
each library's ELF notes to check its build id, and the worker then faults the pages it uses back in one at a
time as it runs, each fault a small read from disk. At checkpoint the pages that each file mapping has present
(/proc/PID/pagemap) are recorded as ranges of the file; a cold restore reads them with the image, in large reads
on several threads.
"""

from __future__ import annotations

import os
import stat
from array import array
from pathlib import Path
from typing import BinaryIO

from warmstart.artifact.manifest import FileRanges

_PAGE = os.sysconf("SC_PAGE_SIZE")
_GAP = 256 << 10  # pages closer than this are read as one range: a few more bytes, far fewer reads
_SKIP = ("/dev/", "/proc/", "/sys/")  # devices, tmpfs and the kernel's files: nothing on disk to read


def capture(pids: list[int]) -> list[FileRanges]:
    """The present pages of every regular file mapped by these processes, as merged ranges per file."""
    pages: dict[str, set[int]] = {}
    sizes: dict[str, int] = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/pagemap", "rb", buffering=0) as pagemap:
                for line in maps:
                    _add_mapping(line, f"/proc/{pid}/root", pagemap, pages, sizes)
        except OSError:
            continue  # the process exited, or its pagemap is not ours to read: only a readahead is lost
    return [FileRanges(path=p, size=sizes[p], ranges=_merge(sorted(idx), sizes[p]))
            for p, idx in sorted(pages.items()) if idx]


def _add_mapping(line: str, root: str, pagemap: BinaryIO, pages: dict[str, set[int]], sizes: dict[str, int]) -> None:
    fields = line.split(maxsplit=5)
    if len(fields) < 6:
        return
    path = fields[5].rstrip("\n")
    if not path.startswith("/") or path.startswith(_SKIP) or path.endswith(" (deleted)"):
        return
    try:
        st = os.stat(root + path)  # the path as the process sees it (a container's, through its root)
    except OSError:
        return
    if not stat.S_ISREG(st.st_mode):
        return
    start, end = (int(x, 16) for x in fields[0].split("-"))
    first_page = int(fields[2], 16) // _PAGE
    pagemap.seek(start // _PAGE * 8)
    entries = array("Q", pagemap.read((end - start) // _PAGE * 8))
    present = [first_page + i for i, e in enumerate(entries) if e >> 63]
    if present:
        pages.setdefault(path, set()).update(present)
        sizes[path] = st.st_size


def _merge(page_indices: list[int], size: int) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for i in page_indices:
        off = i * _PAGE
        if off >= size:
            break
        end = min(off + _PAGE, size)
        if out and off - out[-1][1] < _GAP:
            out[-1][1] = end
        else:
            out.append([off, end])
    return [(a, b - a) for a, b in out]


def pieces(files: list[FileRanges], root: str = "") -> tuple[tuple[Path, int, int], ...]:
    """(file, offset, length) to read ahead, for the files still there with the size they had at checkpoint
    (root: where the restored worker's files are seen from here, for a restore into a pod's namespaces)."""
    out: list[tuple[Path, int, int]] = []
    for f in files:
        path = Path(root + f.path)
        try:
            st = path.stat()
        except OSError:
            continue
        # Only the regular files the worker had mapped: a FIFO or a device named here would block or be read.
        if not stat.S_ISREG(st.st_mode) or st.st_size != f.size:
            continue
        out += [(path, off, n) for off, n in f.ranges]
    return tuple(out)


def total_bytes(files: list[FileRanges]) -> int:
    return sum(n for f in files for _, n in f.ranges)
