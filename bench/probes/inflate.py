"""Where inflating a compressed pages image (image/codec.py) spends its time, on synthetic heap-like pages.

    python3 bench/probes/inflate.py [--mb 800]

Per thread count: zlib alone, copying into fresh pages of a tmpfs file (page faults), the same with
MADV_HUGEPAGE, copying into anonymous memory, and codec.inflate itself.
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import sys
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from warmstart.image import codec  # noqa: E402

CH = codec.CHUNK
_MADV_HUGEPAGE = 14


def heap_like() -> bytes:
    """A chunk compressing to about a fifth, like the 1.1B worker's pages: patterns, zeros, some random bytes."""
    out = bytearray()
    for i in range(CH // 4096):
        if i % 5 == 0:
            out += os.urandom(2048) + bytes(2048)
        else:
            out += (i % 251).to_bytes(1, "little") * 1024 + bytes(3072)
    return bytes(out)


def rate(n: int, threads: int, fn) -> str:
    with ThreadPoolExecutor(threads) as pool:
        t = time.perf_counter()
        list(pool.map(fn, range(n)))
        dt = time.perf_counter() - t
    return f"{n * CH / dt / 1e9:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=800)
    args = ap.parse_args()
    for f in ("/sys/kernel/mm/transparent_hugepage/shmem_enabled", "/sys/kernel/mm/transparent_hugepage/enabled"):
        try:
            print(f, Path(f).read_text().strip())
        except OSError as e:
            print(f, e)
    print([ln for ln in Path("/proc/mounts").read_text().splitlines() if " /dev/shm " in ln])
    raw = heap_like()
    z = zlib.compress(raw, 1)
    n = args.mb * (1 << 20) // CH
    print(f"chunk compresses to {len(z) / len(raw):.2f}; {n} chunks of {CH >> 20} MiB; GB/s of raw bytes:")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for threads in (1, 4, 8, 16):
        row = {"zlib alone": rate(n, threads, lambda i: zlib.decompress(z, bufsize=CH))}
        for label, huge in (("copy into tmpfs", False), ("copy into tmpfs, MADV_HUGEPAGE", True)):
            fd, name = tempfile.mkstemp(dir="/dev/shm")
            os.ftruncate(fd, n * CH)
            m = mmap.mmap(fd, n * CH)
            view = ctypes.c_char.from_buffer(m)
            base = ctypes.addressof(view)
            if huge:
                row["madvise rc"] = str(libc.madvise(base, n * CH, _MADV_HUGEPAGE))
            row[label] = rate(n, threads, lambda i: ctypes.memmove(base + i * CH, raw, CH))
            del view
            m.close()
            os.close(fd)
            os.unlink(name)
        a = mmap.mmap(-1, n * CH)
        view = ctypes.c_char.from_buffer(a)
        base = ctypes.addressof(view)
        row["copy into anonymous memory"] = rate(n, threads, lambda i: ctypes.memmove(base + i * CH, raw, CH))
        del view
        a.close()
        with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
            src = Path(d) / "pages-1.img"
            with open(src, "wb") as f:
                for _ in range(n):
                    f.write(raw)
            codec.compress(Path(d), 16, print)
            t = time.perf_counter()
            codec.inflate(Path(d) / "pages-1.img.z", Path("/dev/shm") / f"probe-{os.getpid()}", threads)
            row["codec.inflate"] = f"{n * CH / (time.perf_counter() - t) / 1e9:.2f}"
            os.unlink(Path("/dev/shm") / f"probe-{os.getpid()}")
        print(f"{threads:2d} threads: " + ", ".join(f"{k} {v}" for k, v in row.items()), flush=True)


if __name__ == "__main__":
    main()
