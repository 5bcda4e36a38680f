"""What a VM charges for memory its guest touches for the first time: the rate of writing fresh anonymous memory
against memory already written, and, where a GPU is present, the device-to-host copy into each.

    python3 bench/probes/host_touch.py [--gib 8] [--settle 5]

On a VM whose host backs guest memory only when the guest first touches it (and takes back what the guest
frees, through free page reporting), every checkpoint that copies into new memory pays that rate: the driver's
copy of GPU memory into the process, CRIU's pages into the page cache. Passes, each over --gib GiB:
  fresh        a new mapping, written once (4 KiB pages)
  again        the same mapping written again
  refreshed    unmapped, --settle seconds waited, a new mapping written (what the host took back, paid again)
  fresh huge   a new mapping with MADV_HUGEPAGE, written once
With torch and a GPU, the same bytes are copied from the device into a fresh pageable buffer, then into the same
buffer again, and into a pinned buffer.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import time
from collections.abc import Callable

_libc = ctypes.CDLL(None, use_errno=True)


def _mapping(size: int, huge: bool) -> mmap.mmap:
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge:
        m.madvise(mmap.MADV_HUGEPAGE)
    return m


def _write(m: mmap.mmap) -> float:
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    t0 = time.monotonic()
    ctypes.memset(addr, 1, len(m))
    return time.monotonic() - t0


def host_passes(size: int, settle: float) -> dict[str, float]:
    gb = size / 1e9
    out: dict[str, float] = {}
    m = _mapping(size, huge=False)
    out["fresh"] = gb / _write(m)
    out["again"] = gb / _write(m)
    m.close()
    time.sleep(settle)
    m = _mapping(size, huge=False)
    out["refreshed"] = gb / _write(m)
    m.close()
    time.sleep(settle)
    m = _mapping(size, huge=True)
    out["fresh huge"] = gb / _write(m)
    m.close()
    return out


def gpu_passes(size: int) -> dict[str, float]:
    try:
        import torch
    except ImportError:
        return {}
    if not torch.cuda.is_available():
        return {}
    dev = torch.ones(size, dtype=torch.uint8, device="cuda")
    gb = size / 1e9

    def timed(f: Callable[[], object]) -> float:
        torch.cuda.synchronize()
        t0 = time.monotonic()
        f()
        torch.cuda.synchronize()
        return gb / (time.monotonic() - t0)

    pageable = torch.empty(size, dtype=torch.uint8)  # not written: fresh memory
    out = {"D2H into fresh pageable": timed(lambda: pageable.copy_(dev)),
           "D2H into the same pageable again": timed(lambda: pageable.copy_(dev)),
           "H2D from that pageable": timed(lambda: dev.copy_(pageable))}
    pageable.resize_(0)
    pinned = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    out["D2H into pinned"] = timed(lambda: pinned.copy_(dev))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=8.0)
    ap.add_argument("--settle", type=float, default=5.0, help="seconds between freeing and touching again")
    ap.add_argument("--out", default=os.environ.get("OUT", ""))
    a = ap.parse_args()
    size = int(a.gib * (1 << 30))
    rates = {**host_passes(size, a.settle), **gpu_passes(size)}
    print(f"| {a.gib:g} GiB | GB/s |\n| --- | --- |")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.2f} |")
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "host_touch.json"), "w") as f:
            json.dump({"gib": a.gib, "settle_s": a.settle, "GB_per_s": rates}, f, indent=1)


if __name__ == "__main__":
    main()
