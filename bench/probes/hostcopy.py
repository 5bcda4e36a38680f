"""How fast warmstart.gpumem.hostcopy moves a kept region between host and GPU memory, by settings.

    python3 bench/probes/hostcopy.py [--gb 8]

Host memory as a restored process has it (written, huge pages or not); prints GB/s per piece size (the
copy; the unpinning after it is off the critical path), next to one whole-buffer registration and the
driver's pageable copy, the staging alternative (CPU threads copying into a few pinned buffers), how a
small GPU step slows while another thread unpins, and what freeing costs.
"""

from __future__ import annotations

import argparse
import ctypes
import threading
import time

from warmstart.gpumem import hostcopy
from warmstart.gpumem import vmm


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=8)
    args = ap.parse_args()
    n = int(args.gb * (1 << 30)) // (2 << 20) * (2 << 20)
    d = vmm.driver()
    ctx = vmm.primary_context(0)
    dev = int(vmm.ok(d.cuMemAlloc(n), "cuMemAlloc"))
    for huge in (True, False):
        host = hostcopy.alloc(n)
        if not huge:
            ctypes.CDLL(None).madvise(ctypes.c_void_p(host), ctypes.c_size_t(n), 15)  # MADV_NOHUGEPAGE
        ctypes.memset(host, 1, n)
        for p in (64 << 20, 256 << 20, 1 << 30):
            t0 = time.monotonic()
            unpin = hostcopy.copy(ctx, dev, host, n, to_device=True, piece=p)
            t1 = time.monotonic()
            unpin()
            t2 = time.monotonic()
            print(f"huge={huge} piece={p >> 20:4d} MiB: copied at {n / (t1 - t0) / 1e9:5.1f} GB/s, "
                  f"unpinned in {t2 - t1:.3f} s", flush=True)
        t0 = time.monotonic()
        vmm.ok(d.cuMemHostRegister(host, n, 0), "register")
        t1 = time.monotonic()
        vmm.ok(d.cuMemcpyHtoD(dev, host, n), "copy")
        t2 = time.monotonic()
        d.cuMemHostUnregister(host)
        t3 = time.monotonic()
        print(f"huge={huge} whole buffer: register {t1 - t0:.3f} s, copy {n / (t2 - t1) / 1e9:.1f} GB/s, "
              f"unregister {t3 - t2:.3f} s", flush=True)
        t0 = time.monotonic()
        vmm.ok(d.cuMemcpyHtoD(dev, host, n), "copy")
        print(f"huge={huge} pageable copy: {n / (time.monotonic() - t0) / 1e9:.1f} GB/s", flush=True)
        staged(ctx, dev, host, n, huge)
        contention(ctx, dev, host, n, huge)
        t0 = time.monotonic()
        hostcopy.free(host, n)
        print(f"huge={huge} free: {time.monotonic() - t0:.3f} s", flush=True)


def staged(ctx, dev: int, host: int, n: int, huge: bool, threads: int = 8, piece: int = 64 << 20) -> None:
    """The alternative to pinning the buffer: CPU threads copy it into a few pinned staging buffers, which
    go by DMA; only the staging buffers are ever pinned (allocated and freed around the copy)."""
    d = vmm.driver()
    t0 = time.monotonic()
    bufs = [[int(vmm.ok(d.cuMemHostAlloc(piece, 0), "cuMemHostAlloc")) for _ in range(2)] for _ in range(threads)]
    t1 = time.monotonic()
    offs = list(range(0, n, piece))

    def work(i: int) -> None:
        vmm.ok(d.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
        stream = vmm.ok(d.cuStreamCreate(1), "cuStreamCreate")
        events = [None, None]
        for k, off in enumerate(offs[i::threads]):
            b = k % 2
            if events[b] is not None:
                vmm.ok(d.cuEventSynchronize(events[b]), "cuEventSynchronize")
            m = min(piece, n - off)
            ctypes.memmove(bufs[i][b], host + off, m)  # ctypes lets the GIL go
            vmm.ok(d.cuMemcpyHtoDAsync(dev + off, bufs[i][b], m, stream), "cuMemcpyHtoDAsync")
            ev = vmm.ok(d.cuEventCreate(0), "cuEventCreate")
            vmm.ok(d.cuEventRecord(ev, stream), "cuEventRecord")
            events[b] = ev
        vmm.ok(d.cuStreamSynchronize(stream), "cuStreamSynchronize")

    ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    t2 = time.monotonic()
    for pair in bufs:
        for b in pair:
            d.cuMemFreeHost(b)
    t3 = time.monotonic()
    print(f"huge={huge} staged ({threads} threads, 2 x {piece >> 20} MiB pinned each): alloc {t1 - t0:.3f} s, "
          f"copy {n / (t2 - t1) / 1e9:.1f} GB/s, free {t3 - t2:.3f} s", flush=True)


def contention(ctx, dev: int, host: int, n: int, huge: bool) -> None:
    """How much a small GPU step (a matrix product and a sync, as one decode step) slows down while another
    thread unpins the copied buffer, as a restored worker's first requests run beside the unpin."""
    import torch

    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)

    def steps(k: int = 50) -> float:
        t = time.monotonic()
        for _ in range(k):
            (a @ a).sum().item()
        return (time.monotonic() - t) / k

    alone = steps()
    unpin = hostcopy.copy(ctx, dev, host, n, to_device=True, gentle=True)
    worker = threading.Thread(target=unpin)
    t0 = time.monotonic()
    worker.start()
    during = steps(20)
    worker.join()
    print(f"huge={huge} a decode-sized step: {alone * 1e3:.2f} ms alone, {during * 1e3:.2f} ms while unpinning "
          f"({time.monotonic() - t0:.3f} s to unpin {n >> 30} GiB on another thread)", flush=True)


if __name__ == "__main__":
    main()
