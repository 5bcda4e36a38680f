"""Where a quiesced reference worker's memory is: what the CUDA checkpoint and CRIU would copy.

    python3 bench/probes/gpu_memory.py MODEL_DIR [--kv-cache-mb 4096]

Builds the reference worker's engine in this process (as the server does), quiesces it, and prints the GPU
memory the driver reports for the process next to torch's own accounting, and the process's anonymous host
memory by mapping (largest first), before and after malloc_trim.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess


def gpu_used_mib() -> int:
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True).stdout
    return sum(int(u) for p, u in (ln.split(", ") for ln in out.splitlines() if ln) if int(p) == os.getpid())


def anon_maps(top: int = 8) -> tuple[int, list[tuple[int, str]]]:
    rows, cur, total = [], "", 0
    with open("/proc/self/smaps") as f:
        for ln in f:
            parts = ln.split()
            if "-" in parts[0] and not parts[0].endswith(":"):
                cur = " ".join(parts[5:]) or "[anon]"
                cur = f"{parts[0]} {cur}"
            elif parts[0] == "Anonymous:":
                kb = int(parts[1])
                total += kb
                rows.append((kb, cur))
    return total << 10, [(kb << 10, name) for kb, name in sorted(rows, reverse=True)[:top]]


def report(what: str, torch) -> None:
    anon, top = anon_maps()
    print(f"== {what}")
    print(f"GPU used by this process (driver): {gpu_used_mib()} MiB; torch allocated "
          f"{torch.cuda.memory_allocated() >> 20} MiB, reserved {torch.cuda.memory_reserved() >> 20} MiB")
    print(f"host anonymous memory: {anon / 1e9:.2f} GB; largest:")
    for n, name in top:
        print(f"   {n / 1e6:9.1f} MB  {name}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--kv-cache-mb", type=int, default=4096)
    args = ap.parse_args()
    import torch

    from warmstart.reference.server import Engine

    engine = Engine(args.model, args.kv_cache_mb, "cuda", "bfloat16", 256, graph=True)
    engine.complete("warm up", 4)
    report("warm", torch)
    engine.quiesce()
    report("quiesced", torch)
    ctypes.CDLL(None).malloc_trim(0)
    report("quiesced, after malloc_trim(0)", torch)


if __name__ == "__main__":
    main()
