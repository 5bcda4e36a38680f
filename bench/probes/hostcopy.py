"""How fast warmstart.worker.hostcopy moves a kept region between host and GPU memory, by settings.

    python3 bench/probes/hostcopy.py [--gb 8]

Host memory as a restored process has it (written, huge pages or not); prints GB/s per piece size (the
copy; the unpinning after it is off the critical path), next to one whole-buffer registration and the
driver's pageable copy, and what freeing costs.
"""

from __future__ import annotations

import argparse
import ctypes
import time

from warmstart.worker import hostcopy, vmm


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
        t0 = time.monotonic()
        hostcopy.free(host, n)
        print(f"huge={huge} free: {time.monotonic() - t0:.3f} s", flush=True)


if __name__ == "__main__":
    main()
