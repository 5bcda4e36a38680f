"""How fast warmstart.gpumem.filecopy moves a GPU region to a file and back, by settings.

    python3 bench/probes/filecopy.py [--gb 8] [--dir /var/tmp/warmstart-probe]

Saves random GPU memory to a file (threads), loads it back from the page cache (threads x piece) and from a
cold page cache, checks the bytes, and compares with mapping the file and pinning the mapping piece by piece
(cuMemHostRegister READ_ONLY, the zero-copy alternative to staging). Then the same for a region of random bf16
weights (std 0.02) saved packed (warmstart.gpumem.bf16pack); rates count the region's bytes, not the file's.
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import subprocess
import time
from pathlib import Path

from warmstart.gpumem import filecopy
from warmstart.gpumem import vmm


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=8)
    ap.add_argument("--dir", default="/var/tmp/warmstart-probe")
    args = ap.parse_args()
    import torch

    n = int(args.gb * (1 << 30)) // (2 << 20) * (2 << 20)
    d = vmm.driver()
    ctx = vmm.primary_context(0)
    src = torch.randint(-128, 127, (n,), dtype=torch.int8, device="cuda")
    want = src[:: 4096].to(torch.int64).sum().item(), src[-4096:].to(torch.int64).sum().item()
    dst = torch.empty_like(src)
    torch.cuda.synchronize()
    vmm.ok(d.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    path = os.path.join(args.dir, "region.bin")

    def check(what: str) -> None:
        got = dst[:: 4096].to(torch.int64).sum().item(), dst[-4096:].to(torch.int64).sum().item()
        if got != want:
            raise SystemExit(f"{what}: the bytes read back differ")
        dst.zero_()
        torch.cuda.synchronize()

    for threads in (1, 4, 8):
        if os.path.exists(path):
            os.unlink(path)
        drop_caches()
        free = torch.cuda.mem_get_info()[0]
        t0 = time.monotonic()
        filecopy.save(ctx, src.data_ptr(), n, path, threads=threads)
        t1 = time.monotonic()
        print(f"save, {threads:2d} threads: {n / (t1 - t0) / 1e9:5.1f} GB/s "
              f"(GPU memory free {(torch.cuda.mem_get_info()[0] - free) / 2**20:+.0f} MiB)", flush=True)
    subprocess.run(["sync"], check=True)
    for threads in (4, 8, 16):
        for piece in (8 << 20, 16 << 20, 32 << 20):
            free = torch.cuda.mem_get_info()[0]
            t0 = time.monotonic()
            filecopy.load(ctx, dst.data_ptr(), n, path, threads=threads, piece=piece)
            dt = time.monotonic() - t0
            delta = (torch.cuda.mem_get_info()[0] - free) / 2**20
            check("load")
            print(f"load, page cache, {threads:2d} threads x {piece >> 20:2d} MiB: {n / dt / 1e9:5.1f} GB/s "
                  f"(GPU memory free {delta:+.0f} MiB)", flush=True)
    for threads in (8, 16):
        drop_caches()
        t0 = time.monotonic()
        filecopy.load(ctx, dst.data_ptr(), n, path, threads=threads)
        dt = time.monotonic() - t0
        check("cold load")
        print(f"load, cold page cache, {threads:2d} threads: {n / dt / 1e9:5.1f} GB/s", flush=True)
    registered(ctx, dst.data_ptr(), n, path)
    check("registered load")
    os.unlink(path)
    packed(ctx, n, path)


def packed(ctx, n: int, path: str) -> None:
    import torch

    src = (torch.randn(n // 2, device="cuda") * 0.02).to(torch.bfloat16).view(torch.uint8)
    dst = torch.empty_like(src)
    torch.cuda.synchronize()
    for threads in (1, 8):
        if os.path.exists(path):
            os.unlink(path)
        t0 = time.monotonic()
        filecopy.save(ctx, src.data_ptr(), n, path, packed_on=0, threads=threads)
        dt = time.monotonic() - t0
        print(f"packed save, {threads:2d} threads: {n / dt / 1e9:5.1f} GB/s, file {os.path.getsize(path) / n:.3f} "
              "of the region", flush=True)
    subprocess.run(["sync"], check=True)
    for label, cold in (("page cache", False), ("cold page cache", True)):
        if cold:
            drop_caches()
        t0 = time.monotonic()
        filecopy.load(ctx, dst.data_ptr(), n, path, packed_on=0)
        dt = time.monotonic() - t0
        same = torch.equal(src, dst)
        print(f"packed load, {label}, 8 threads: {n / dt / 1e9:5.1f} GB/s, bytes {'equal' if same else 'DIFFER'}",
              flush=True)
        dst.zero_()
    os.unlink(path)


def registered(ctx, dev: int, n: int, path: str, piece: int = 256 << 20) -> None:
    """Map the (cached) file and pin the mapping piece by piece while earlier pieces go by DMA."""
    d = vmm.driver()
    libc = ctypes.CDLL(None)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    fd = os.open(path, os.O_RDONLY)
    addr = int(libc.mmap(None, n, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0))
    streams = [vmm.ok(d.cuStreamCreate(1), "cuStreamCreate") for _ in range(4)]
    pinned = []
    t0 = time.monotonic()
    try:
        for i, off in enumerate(range(0, n, piece)):
            k = min(piece, n - off)
            vmm.ok(d.cuMemHostRegister(addr + off, k, 8), "cuMemHostRegister READ_ONLY")  # 8: CU_MEMHOSTREGISTER_READ_ONLY
            pinned.append(addr + off)
            vmm.ok(d.cuMemcpyHtoDAsync(dev + off, addr + off, k, streams[i % 4]), "cuMemcpyHtoDAsync")
        for s in streams:
            vmm.ok(d.cuStreamSynchronize(s), "cuStreamSynchronize")
        t1 = time.monotonic()
        for p in pinned:
            vmm.ok(d.cuMemHostUnregister(p), "cuMemHostUnregister")
        t2 = time.monotonic()
        print(f"registered file mapping, page cache: copy {n / (t1 - t0) / 1e9:5.1f} GB/s, unpin {t2 - t1:.3f} s",
              flush=True)
    except RuntimeError as e:
        print(f"registered file mapping: {e}", flush=True)
    finally:
        libc.munmap(addr, n)
        os.close(fd)


if __name__ == "__main__":
    main()
