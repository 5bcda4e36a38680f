"""How fast packed bf16 pieces unpack on the GPU: torch (bf16pack.unpack) against the kernel (bf16kernel), by
piece size and threads issuing them (no file, no copy).

    python3 bench/probes/bf16pack.py [--gb 4]
"""

from __future__ import annotations

import argparse
import threading
import time

from warmstart.gpumem import bf16kernel
from warmstart.gpumem import bf16pack
from warmstart.gpumem import vmm


def unpack_kernel(packed, p, piece) -> None:
    """warmstart.gpumem.bf16kernel: one launch per piece (two with escapes)."""
    import torch
    from cuda.bindings import driver as d

    vmm.ok(d.cuCtxSetCurrent(vmm.primary_context(0)), "cuCtxSetCurrent")  # a thread of its own
    k = bf16kernel.get(0)
    assert k is not None, "the kernel could not be built (see above)"
    k.unpack(packed.data_ptr(), piece.data_ptr(), piece.numel(), p, d.CUstream(torch.cuda.current_stream().cuda_stream))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=4)
    args = ap.parse_args()
    import torch

    n = int(args.gb * (1 << 30)) // (32 << 20) * (32 << 20)
    src = (torch.randn(n // 2, device="cuda") * 0.02).to(torch.bfloat16).view(torch.uint8)
    dst = torch.empty_like(src)
    for piece in (8 << 20, 16 << 20, 32 << 20):
        plans = [bf16pack.plan(src[at: at + piece]) for at in range(0, n, piece)]
        packed = []
        for k, p in enumerate(plans):
            out = torch.empty(bf16pack.packed_size(piece, p.escapes), dtype=torch.uint8, device="cuda")
            bf16pack.pack(src[k * piece: (k + 1) * piece], p, out)
            packed.append(out)
        for threads, fn in ((1, bf16pack.unpack), (8, bf16pack.unpack), (1, unpack_kernel), (8, unpack_kernel)):
            streams = [torch.cuda.Stream() for _ in range(threads)]
            torch.cuda.synchronize()

            def work(i: int) -> None:
                with torch.cuda.stream(streams[i]):
                    for k in range(i, len(plans), threads):
                        fn(packed[k], plans[k], dst[k * piece: (k + 1) * piece])

            t0 = time.monotonic()
            pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
            for t in pool:
                t.start()
            for t in pool:
                t.join()
            t1 = time.monotonic()
            torch.cuda.synchronize()
            t2 = time.monotonic()
            ok = torch.equal(src, dst)
            print(f"{fn.__name__} {piece >> 20:2d} MiB pieces, {threads} threads: {n / (t2 - t0) / 1e9:6.1f} GB/s "
                  f"(issuing took {t1 - t0:.3f} s of {t2 - t0:.3f}), {'equal' if ok else 'DIFFER'}", flush=True)
            dst.zero_()
    try:
        from cuda.bindings import nvrtc

        print("nvrtc", nvrtc.nvrtcVersion(), flush=True)
    except Exception as e:  # noqa: BLE001 - a probe: say what it was
        print(f"nvrtc: {type(e).__name__}: {e}", flush=True)


if __name__ == "__main__":
    main()
