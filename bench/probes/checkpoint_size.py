"""What a CUDA process's checkpoint holds, by stage: how many host bytes the driver's checkpoint adds.

    python3 bench/probes/checkpoint_size.py MODEL_DIR [--stage bare cublas worker ...]

Each stage runs in a child process that builds that much CUDA state and waits; this process then locks and
checkpoints it with the driver API, reads how much the child's anonymous memory grew (the GPU memory the
checkpoint copied into it, which CRIU would then dump), times the restore, and unlocks. The child's own
accounting (driver, torch, host memory by mapping) is printed next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CHILD = r"""
import ctypes, json, os, sys
stage, model = sys.argv[1], sys.argv[2]
from cuda.bindings import driver as d
limits = {}
def set_stack(n):
    assert d.cuCtxSetLimit(d.CUlimit.CU_LIMIT_STACK_SIZE, n)[0] == d.CUresult.CUDA_SUCCESS
def read_limits():
    for k in ("CU_LIMIT_STACK_SIZE", "CU_LIMIT_PRINTF_FIFO_SIZE", "CU_LIMIT_MALLOC_HEAP_SIZE"):
        err, v = d.cuCtxGetLimit(getattr(d.CUlimit, k))
        limits[k] = int(v) if err == d.CUresult.CUDA_SUCCESS else str(err)
if stage.startswith("driver"):
    d.cuInit(0)
    err, dev = d.cuDeviceGet(0)
    err, ctx = d.cuDevicePrimaryCtxRetain(dev)
    d.cuCtxSetCurrent(ctx)
    if "stack" in stage:
        set_stack(16)
    d.cuMemAlloc(1 << 20)
    read_limits()
    import json
    free, total = d.cuMemGetInfo()[1:]
    print("READY " + json.dumps({"device_used_mb": (total - free) / 1e6, "torch_allocated_mb": 0,
          "torch_reserved_mb": 0, "host_anon_mb": 0, "host_top_mb": [], "limits": limits}), flush=True)
    sys.stdin.readline()
    sys.exit(0)
import torch
torch.zeros(1, device="cuda")
if "stack" in stage:
    set_stack(16)
if "transformers" in stage:
    from transformers import AutoTokenizer
    AutoTokenizer.from_pretrained(model)
if stage != "bare":
    a = torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16)
    (a @ a).sum().item()
    del a
if stage == "phases":  # host and GPU memory after each step of the reference worker's start-up
    def mem():
        for ln in open("/proc/self/smaps_rollup"):
            if ln.startswith("Anonymous:"):
                host = int(ln.split()[1]) << 10
        free, total = torch.cuda.mem_get_info()
        return round(host / 1e6), round((total - free) / 1e6)
    from warmstart.reference import decode, load
    from warmstart.gpumem.region import GpuRegion
    steps = [("torch + cuBLAS", mem())]
    tok, cfg = load.tokenizer(model), load.config(model)
    steps.append(("tokenizer", mem()))
    tensors, wregion = load.weights(model, "cuda", "bfloat16")
    steps.append(("weights", mem()))
    kv = GpuRegion(4096 << 20, 0)
    steps.append(("KV region", mem()))
    dec = decode.Decoder(tensors, cfg, kv.tensor(torch), 256, use_graph=False)
    steps.append(("decoder", mem()))
    dec.generate(tok.encode("warm up").ids, 4)
    steps.append(("eager generate", mem()))
    dec._capture()
    steps.append(("graph capture", mem()))
    dec.generate(tok.encode("warm up").ids, 4)
    steps.append(("graphed generate", mem()))
    kv.release(); torch.cuda.empty_cache()
    steps.append(("KV released", mem()))
    print("PHASES (host MB, GPU MB): " + "; ".join(f"{k} {v}" for k, v in steps), flush=True)
if stage.startswith("worker"):
    from warmstart.reference.server import Engine
    from warmstart.worker import lmem
    e = Engine(model, 4096, "cuda", "bfloat16", 256, graph="nograph" not in stage)
    e.complete("warm up", 4)
    e.quiesce()
    saved = lmem.shrink()  # as the SDK does after the worker's quiesce
torch.cuda.synchronize()
if "trim" in stage:
    ctypes.CDLL(None).malloc_trim(0)
free, total = torch.cuda.mem_get_info()
read_limits()
rows = []
with open("/proc/self/smaps") as f:
    cur = ""
    for ln in f:
        p = ln.split()
        if "-" in p[0] and not p[0].endswith(":"):
            cur = " ".join(p[5:]) or "[anon]"
        elif p[0] == "Anonymous:" and int(p[1]):
            rows.append((int(p[1]) << 10, cur))
by = {}
for n, name in rows:
    key = "[heap]" if name == "[heap]" else "[anon]" if name == "[anon]" else "file:" + os.path.basename(name) if name.startswith("/") else name
    by[key] = by.get(key, 0) + n
top = sorted(by.items(), key=lambda kv: -kv[1])[:10]
print("READY " + json.dumps({
    "device_used_mb": (total - free) / 1e6,
    "torch_allocated_mb": torch.cuda.memory_allocated() / 1e6,
    "torch_reserved_mb": torch.cuda.memory_reserved() / 1e6,
    "host_anon_mb": sum(n for n, _ in rows) / 1e6,
    "host_top_mb": [[k, round(v / 1e6, 1)] for k, v in top],
    "anon_maps_mb": sorted((round(n / 1e6, 1) for n, name in rows if name == "[anon]"), reverse=True)[:8],
    "limits": limits,
}), flush=True)
sys.stdin.readline()
if stage.startswith("worker"):
    import time
    t = time.monotonic()
    lmem.regrow(saved)
    e.weights_region.restore()
    t1 = time.monotonic()
    e.region.restore()
    t2 = time.monotonic()
    ok = e.complete("warm up", 4)
    print("RESUMED " + json.dumps({"weights_copy_s": round(t1 - t, 3), "weights_gb": e.weights_region.nbytes / 1e9,
                                    "kv_map_s": round(t2 - t1, 3), "answer": ok[0]}), flush=True)
"""


def anon_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for ln in f:
            if ln.startswith("Anonymous:"):
                return int(ln.split()[1]) << 10
    return 0


def probe(stage: str, model: str) -> dict:
    from warmstart.gpu import driver as cuda

    child = subprocess.Popen([sys.executable, "-c", CHILD, stage, model], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdin is not None
        line = ""
        while not line.startswith("READY "):
            line = child.stdout.readline()
            if line.startswith("PHASES"):
                print(line, end="", flush=True)
            if not line:
                raise RuntimeError(f"stage {stage}: child exited {child.wait()}")
        info = json.loads(line[6:])
        before = anon_bytes(child.pid)
        t0 = time.monotonic()
        cuda.lock(child.pid)
        cuda.checkpoint(child.pid)
        t1 = time.monotonic()
        after = anon_bytes(child.pid)
        cuda.restore(child.pid)
        t2 = time.monotonic()
        cuda.unlock(child.pid)
        info.update(stage=stage, checkpoint_mb=(after - before) / 1e6, image_estimate_mb=after / 1e6,
                    checkpoint_s=round(t1 - t0, 3), restore_s=round(t2 - t1, 3))
        child.stdin.write("\n")
        child.stdin.flush()
        for line in child.stdout:
            if line.startswith("RESUMED "):
                info["resumed"] = json.loads(line[8:])
        child.wait(timeout=60)
        return info
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--stage", nargs="+", default=["driver", "driver-stack", "bare", "bare-stack", "cublas",
                                                    "cublas-transformers", "worker", "worker-nograph"])
    ap.add_argument("--out")
    args = ap.parse_args()
    results = []
    for stage in args.stage:
        r = probe(stage, args.model)
        results.append(r)
        print(f"{stage:24s} GPU used {r['device_used_mb']:8.0f} MB (torch alloc {r['torch_allocated_mb']:.0f}, "
              f"reserved {r['torch_reserved_mb']:.0f}); checkpoint adds {r['checkpoint_mb']:8.0f} MB in "
              f"{r['checkpoint_s']} s, restore {r['restore_s']} s; host anon before {r['host_anon_mb']:.0f} MB; "
              f"image ~{r['image_estimate_mb']:.0f} MB", flush=True)
        if "resumed" in r:
            print("    resumed:", r["resumed"], flush=True)
        print("    host:", ", ".join(f"{k} {v}" for k, v in r["host_top_mb"][:4]), "| largest anon maps:",
              r.get("anon_maps_mb"), "| limits:", r["limits"], flush=True)
    if args.out:
        with open(os.path.join(args.out, "checkpoint_size.json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
