"""How fast can a restore copy an image from the page cache into fresh anonymous memory?

    python bench/pagein.py FILE [GiB]

CRIU's restorer preadv()s each image into freshly mapped private memory, one thread, 4 KiB page faults.
This measures that, and the same with transparent huge pages (MADV_HUGEPAGE) and with 8 threads, to
show what a restorer that did either would gain. Prints one line per variant.
"""

from __future__ import annotations

import mmap
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CHUNK = 64 << 20


def page_in(fd: int, size: int, huge: bool, threads: int) -> float:
    mem = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge:
        mem.madvise(mmap.MADV_HUGEPAGE)
    view = memoryview(mem)
    t = time.perf_counter()

    def read(off: int) -> None:
        n = min(CHUNK, size - off)
        got = os.preadv(fd, [view[off : off + n]], off)
        assert got == n, (got, n)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(read, range(0, size, CHUNK)))
    dt = time.perf_counter() - t
    view.release()
    mem.close()
    return size / dt


def main() -> None:
    path = Path(sys.argv[1])
    size = min(path.stat().st_size, int(float(sys.argv[2]) * (1 << 30)) if len(sys.argv) > 2 else 1 << 62)
    size -= size % CHUNK
    fd = os.open(path, os.O_RDONLY)
    os.pread(fd, 1, 0)
    page_in(fd, size, False, 8)  # warm the page cache
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    print(f"THP: {thp}; {size / 1e9:.2f} GB from the page cache into anonymous memory")
    for huge in (False, True):
        for threads in (1, 8):
            bw = page_in(fd, size, huge, threads)
            print(f"  {'2 MiB THP' if huge else '4 KiB pages'}, {threads} thread(s): {bw / 1e9:.2f} GB/s")


if __name__ == "__main__":
    main()
