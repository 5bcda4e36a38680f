"""GPU benchmark: the reference worker at the TinyLlama-1.1B and Llama-3-8B shapes (random bf16 weights).

    python bench/gpu.py --shape 1b [--shape 8b] --work /var/tmp/warmstart-bench --out $OUT

Per shape: cold start to first token (weights from a cold page cache), checkpoint time and image size with
and without the KV-cache release, restore to ready and to first token from a cold and a warm page cache,
3 replicas side by side on the one GPU, and whether greedy tokens match the cold start's. Each restore is
set next to its floor: bytes moved / bandwidth measured on this machine in the same run. Needs root (CRIU,
dropping the page cache) and an NVIDIA GPU. Prints a table; writes results.json and the table under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from warmstart import demo, paths, registry
from warmstart.artifact.manifest import SAVED_DIR
from warmstart.pipeline import checkpoint
from warmstart.criu import binary as criu
from warmstart.pipeline import run
from warmstart.pipeline import restore
from warmstart.image import workingset
from warmstart.errors import UsageError
from warmstart.reference import model

sys.path.insert(0, str(Path(__file__).resolve().parent))
import guard  # noqa: E402

SHAPES = {"1b": model.LLAMA_1B, "8b": model.LLAMA_8B}
KV_MB = {"1b": 4096, "8b": 4096}
PROMPT = "Restore the worker and keep every token the same"
TOKENS = 32


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def drop_caches() -> bool:
    if "torch" in sys.modules:
        raise RuntimeError("this process has torch loaded: the libraries it maps would stay cached")
    for t in threading.enumerate():
        if t.name == restore.KEEP_THREAD:  # a restore still copying its inflated image into the cache
            t.join()
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_bandwidth(paths: list[Path], threads: int) -> float:
    """Bytes/s reading these files (as a restore does), with `threads` readers."""
    from concurrent.futures import ThreadPoolExecutor

    piece = 64 << 20  # files are cut into pieces so that one large pages image is read by all the threads
    pieces = [(p, off) for p in paths for off in range(0, p.stat().st_size, piece)]
    fds = {p: os.open(p, os.O_RDONLY) for p in paths}

    def read(item: tuple[Path, int]) -> int:
        buf = bytearray(16 << 20)
        n, (p, off) = 0, item
        while n < piece and (got := os.preadv(fds[p], [buf], off + n)):
            n += got
        return n

    t = time.monotonic()
    try:
        with ThreadPoolExecutor(threads) as pool:
            total = sum(pool.map(read, pieces))
    finally:
        for fd in fds.values():
            os.close(fd)
    return total / (time.monotonic() - t)


def h2d_bandwidth() -> dict[str, float]:
    """Host-to-device bytes/s from pageable and pinned memory (2 GiB), in a child so we hold no CUDA context."""
    code = (
        "import torch,time,json\n"
        "n=2<<30\n"
        "out={}\n"
        "for kind in ('pageable','pinned'):\n"
        "    h=torch.empty(n,dtype=torch.uint8,pin_memory=kind=='pinned'); h.fill_(1)\n"
        "    d=torch.empty(n,dtype=torch.uint8,device='cuda'); d.copy_(h); torch.cuda.synchronize()\n"
        "    t=time.perf_counter(); d.copy_(h); torch.cuda.synchronize(); out[kind]=n/(time.perf_counter()-t)\n"
        "print(json.dumps(out))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def gpu_facts() -> dict[str, str]:
    r = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                       capture_output=True, text=True)
    name, driver, mem = [x.strip() for x in r.stdout.splitlines()[0].split(",")]
    return {"gpu": name, "driver": driver, "memory": mem}


def ensure_model(key: str) -> Path:
    """The model directory for a shape, built in a child if missing. This process never imports torch: the
    library pages a process maps stay in the page cache when it is dropped, and would make "cold" runs warm."""
    code = (f"from warmstart.reference import model; "
            f"print(model.ensure(model.LLAMA_{key.upper()}, 'bfloat16', device='cuda'))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"building the {key} model failed: {r.stderr.strip()[-2000:]}")
    return Path(r.stdout.strip().splitlines()[-1])


def stop(name: str) -> None:
    try:
        registry.stop(name)
    except UsageError:
        pass  # not running


def first_token(port: int) -> float:
    t = time.monotonic()
    demo.complete(port, PROMPT, 1, timeout_s=300)
    return time.monotonic() - t


def cold_start(key: str, model_dir: Path, name: str, pack: bool) -> tuple[dict, int]:
    port = free_port()
    cold_cache = drop_caches()
    t0 = time.monotonic()
    rec = run.start(name, [sys.executable, "-m", "warmstart.reference.server", "--port", str(port), "--model",
                               str(model_dir), "--device", "cuda", "--kv-cache-mb", str(KV_MB[key]),
                               "--max-len", "256", *([] if pack else ["--no-pack"])], engine="reference")
    run.wait_ready(rec, 600)
    demo.complete(port, PROMPT, 1, timeout_s=300)
    cold = time.monotonic() - t0
    return {"cold_start_to_first_token_s": round(cold, 2), "cold_page_cache": cold_cache}, port


def disk_bytes_read() -> int:
    """Bytes read from the block devices so far (/proc/diskstats; whole disks, not their partitions)."""
    total = 0
    for line in Path("/proc/diskstats").read_text().splitlines():
        f = line.split()
        if len(f) > 5 and not f[2].startswith(("loop", "ram")) and Path(f"/sys/block/{f[2]}").exists():
            total += int(f[5]) * 512
    return total


class DiskTimeline:
    """Bytes read from disk, sampled every 50 ms while a restore runs: shows when the disk was busy and how fast."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._t0, self._b0 = time.monotonic(), disk_bytes_read()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.samples.append((round(time.monotonic() - self._t0, 3), disk_bytes_read() - self._b0))

    def stop(self) -> list[tuple[float, int]]:
        self._stop.set()
        self._thread.join()
        return self.samples


def rates(samples: list[tuple[float, int]], step: float = 0.25) -> list[float]:
    """GB/s in each `step` seconds of the timeline."""
    out, last_t, last_b = [], 0.0, 0
    for t, b in samples:
        if t - last_t >= step - 1e-6:
            out.append(round((b - last_b) / (t - last_t) / 1e9, 2))
            last_t, last_b = t, b
    return out


def restore_once(art: Path, name: str, cold: bool, replicas: int, want: str, env: dict[str, str] | None = None,
                 logs: Path | None = None) -> dict:
    """env: the page-read settings (criu.restore_env) for this restore only. logs: where to append CRIU's log."""
    dropped = drop_caches() if cold else False
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    read0 = disk_bytes_read()
    timeline = DiskTimeline()
    t0 = time.monotonic()
    try:
        rr = restore.restore(art, name=name, replicas=replicas, timeout_s=600)
        # Bytes off the disk over the restore's whole time: near the disk bandwidth measured later, the restore
        # kept the disk busy; well below it, the disk sat idle part of the time, or was slower then.
        read_s, read_bytes = time.monotonic() - t0, disk_bytes_read() - read0
    finally:
        timeline.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    out = {"cold_page_cache": dropped, "replicas": [], "disk_read_bytes": read_bytes, "verify_s": round(rr.verify_s, 3),
           "inflate_s": round(rr.inflate_s, 3),
           "disk_read_rate": round(read_bytes / read_s) if read_s > 0 else 0,
           "disk_gbps_per_250ms": rates(timeline.samples)}
    for r in rr.replicas:
        ft = time.monotonic()
        demo.complete(r.port, PROMPT, 1, timeout_s=300)
        first = time.monotonic() - t0
        text = demo.complete(r.port, PROMPT, TOKENS, timeout_s=300)
        out["replicas"].append({"criu_s": round(r.criu_s, 2), "cuda_s": round(r.cuda_s, 2), "ready_s": round(r.ready_s, 2),
                                "after_cuda_s": round(r.ready_s - r.criu_s - r.cuda_s, 2),
                                "first_token_s": round(first, 2), "one_token_request_s": round(time.monotonic() - ft, 3),
                                "tokens_match": text == want})
    for r, rep in zip(rr.replicas, out["replicas"]):
        log = paths.worker_dir(r.name) / run.LOG
        log_lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        rep["worker_resume"] = next((ln for ln in reversed(log_lines) if ln.startswith("resume:")), None)
        criu_log = paths.worker_dir(r.name) / "restore.log"
        if logs and criu_log.exists():
            # One file for all restores: the device returns at most 8 files from $OUT.
            with open(logs / "criu-cold-restores.log", "a") as f:
                f.write(f"===== {r.name}\n{criu_log.read_text(errors='replace')}")
        stop(r.name)
    return out


def bench_shape(key: str, work: Path, bw: dict, ab: bool, pack: bool, out: Path, colds: int) -> dict:
    t = time.monotonic()
    model_dir = ensure_model(key)
    weights = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    log(f"{key}: model ready ({weights / 1e9:.2f} GB of bf16 weights, {time.monotonic() - t:.0f} s)")
    res: dict = {"shape": key, "weights_bytes": weights, "weights_packed": pack}
    name = f"bench-{key}"
    stop(name)
    cold, port = cold_start(key, model_dir, name, pack)
    res["cold"] = cold
    want = demo.complete(port, PROMPT, TOKENS, timeout_s=300)
    log(f"{key}: cold start {cold['cold_start_to_first_token_s']} s")

    art_full = work / f"{key}-with-kv"
    shutil.rmtree(art_full, ignore_errors=True)
    rec = registry.get(name)
    ck = checkpoint.checkpoint(rec.pid, art_full, record=rec, leave_running=True, quiesce=False)
    res["checkpoint_without_kv_release"] = {"seconds": round(ck.seconds, 2), "image_bytes": ck.manifest.image_bytes,
                                            "steps": ck.manifest.step_seconds(), "paused_s": round(ck.paused_s or 0, 2)}
    log(f"{key}: checkpoint keeping the KV cache: {ck.seconds:.2f} s, {ck.manifest.image_bytes / 1e9:.2f} GB "
        f"({ck.manifest.step_seconds()})")
    # How any CUDA process comes back: no quiesce, its weights and KV cache in CRIU's image.
    res["restore_kv_kept_warm"] = restore_once(art_full, f"{name}-kept", cold=False, replicas=1, want=want)
    log(f"{key}: restore of the KV-kept checkpoint, warm page cache: {res['restore_kv_kept_warm']}")
    shutil.rmtree(art_full)
    res["tokens_match_after_leave_running"] = demo.complete(port, PROMPT, TOKENS, timeout_s=300) == want

    art = work / key
    shutil.rmtree(art, ignore_errors=True)
    ck = checkpoint.checkpoint(rec.pid, art, record=rec, leave_running=False)
    m = ck.manifest
    gpu_bytes = sum(g.memory_bytes for g in m.gpus)
    # CRIU's part and the files the worker saved outside it (its kept weights region, read back on resume).
    saved_bytes = sum(f.size for f in m.files if f.path.startswith(SAVED_DIR + "/"))
    res["checkpoint"] = {"seconds": round(ck.seconds, 2), "image_bytes": m.image_bytes, "gpu_bytes": gpu_bytes,
                         "saved_bytes": saved_bytes, "working_set_bytes": workingset.total_bytes(m.working_set),
                         "zero_bytes_dropped": m.zero_bytes_dropped,
                         "compressed_raw_bytes": m.compressed_raw_bytes, "compressed_bytes": m.compressed_bytes,
                         "steps": m.step_seconds(), "transforms": [t.model_dump() for t in m.transforms]}
    log(f"{key}: checkpoint with KV release: {ck.seconds:.2f} s, {m.image_bytes / 1e9:.2f} GB ({m.step_seconds()})")
    for t in m.transforms:
        log(f"{key}:   {t.transform} {'applied' if t.applied else 'skipped'} {t.image or ''}: {t.reason}")

    images = [art / f.path for f in m.files]
    res["restore_warm"] = restore_once(art, f"{name}-warm", cold=False, replicas=1, want=want)
    log(f"{key}: restore, warm page cache: {res['restore_warm']}")
    res["restore_cold"] = restore_once(art, f"{name}-cold", cold=True, replicas=1, want=want, logs=out)
    log(f"{key}: restore, cold page cache: {res['restore_cold']}")
    res["restore_cold_again"] = [restore_once(art, f"{name}-cold{i}", cold=True, replicas=1, want=want, logs=out)
                                 for i in range(1, colds)]
    for again in res["restore_cold_again"]:
        log(f"{key}: restore, cold page cache, again: {again}")
    res["restore_3_replicas_warm"] = restore_once(art, f"{name}-x3", cold=False, replicas=3, want=want)
    log(f"{key}: 3 replicas: {res['restore_3_replicas_warm']}")
    # The same warm restore as CRIU reads without scripts/criu/parallel-page-reads.patch, and with threads only.
    one = {"WARMSTART_READ_THREADS": "1", "WARMSTART_HUGE_PAGES": "0"}
    for label, cold, env in (("warm_1_thread_4k", False, one), ("warm_threads_4k", False, {"WARMSTART_HUGE_PAGES": "0"}),
                             ("cold_1_thread_4k", True, one)) if ab else ():
        res[f"restore_{label}"] = restore_once(art, f"{name}-{label.replace('_', '-')}", cold=cold, replicas=1,
                                               want=want, env=env)
        log(f"{key}: restore, {label}: {res[f'restore_{label}']}")

    # Floors: the bytes a restore must move at the bandwidths measured now: the artifact read with as many
    # threads as the patched CRIU uses, the driver copying the checkpointed GPU memory from pageable memory, and
    # the worker's kept weights region: read from its saved file by pinned staging buffers, whose DMA overlaps
    # the reads (warmstart.gpumem.filecopy), or, with no saved file, copied back from host memory in pinned
    # pieces (warmstart.gpumem.hostcopy).
    threads = int(criu.restore_env()["CRIU_PAGE_READ_THREADS"])  # as many as the restores read with
    res["bandwidth"] = {"page_cache_1_thread": read_bandwidth(images, 1),
                        "page_cache_threads": read_bandwidth(images, threads), **bw}
    if drop_caches():
        res["bandwidth"]["disk_threads"] = read_bandwidth(images, threads)
    b = res["bandwidth"]
    h2d = b["h2d_pageable"]
    res["criu_threaded_reads"] = criu.find().threaded_reads
    kept = 0.0 if saved_bytes else weights / b["h2d_pinned"]
    res["floor_warm_s"] = round(m.image_bytes / b["page_cache_threads"] + gpu_bytes / h2d + kept, 2)
    if "disk_threads" in b:
        # From a cold disk the worker's libraries are read too: the pages it had touched (image/workingset.py).
        disk_bytes = m.image_bytes + res["checkpoint"]["working_set_bytes"]
        res["floor_cold_s"] = round(disk_bytes / b["disk_threads"] + gpu_bytes / h2d + kept, 2)
    shutil.rmtree(art, ignore_errors=True)
    return res


def table_row(label: str, results: list[dict], f) -> str:
    """One markdown row: `f` of each result, "-" where the result lacks what it reads."""
    cells = []
    for r in results:
        try:
            cells.append(f(r))
        except (KeyError, IndexError, TypeError):
            cells.append("-")
    return f"| {label} | " + " | ".join(cells) + " |"


def table(results: list[dict], facts: dict) -> str:
    rows = [f"GPU: {facts['gpu']} ({facts['memory']}), driver {facts['driver']}, {time.strftime('%Y-%m-%d')}", "",
            "| | " + " | ".join(r["shape"] for r in results) + " |", "|---" * (len(results) + 1) + "|"]

    def row(label: str, f) -> None:
        rows.append(table_row(label, results, f))

    gb = lambda n: f"{n / 1e9:.2f} GB"  # noqa: E731
    row("weights (bf16)", lambda r: gb(r["weights_bytes"]))
    row("weights saved packed (bf16pack)", lambda r: "yes" if r.get("weights_packed", False) else "no")
    row("cold start to first token", lambda r: f"{r['cold']['cold_start_to_first_token_s']} s")
    row("checkpoint, KV kept: time / image / the worker paused for", lambda r: f"{r['checkpoint_without_kv_release']['seconds']} s / "
        f"{gb(r['checkpoint_without_kv_release']['image_bytes'])} / {r['checkpoint_without_kv_release']['paused_s']} s")
    row("  restore of that image to ready, warm (CRIU / CUDA / rest)", lambda r: "{ready_s} s ({criu_s} / {cuda_s} / "
        "{after_cuda_s})".format(**r["restore_kv_kept_warm"]["replicas"][0]))
    row("checkpoint, KV released: time / image", lambda r: f"{r['checkpoint']['seconds']} s / {gb(r['checkpoint']['image_bytes'])}")
    row("  of which GPU memory (the CUDA checkpoint) / saved by the worker (kept weights)",
        lambda r: f"{gb(r['checkpoint']['gpu_bytes'])} / {gb(r['checkpoint'].get('saved_bytes', 0))}")
    row("  libraries' working set, read ahead when cold", lambda r: gb(r["checkpoint"]["working_set_bytes"]))
    row("  pages of zeros taken out of CRIU's image", lambda r: gb(r["checkpoint"]["zero_bytes_dropped"]))
    row("  pages images stored compressed: raw / stored", lambda r: f"{gb(r['checkpoint']['compressed_raw_bytes'])} / "
        f"{gb(r['checkpoint']['compressed_bytes'])}")
    row("  inflating them before CRIU, warm / cold", lambda r: f"{r['restore_warm']['inflate_s']} s / "
        f"{r['restore_cold']['inflate_s']} s")
    for label, key in (("warm page cache", "restore_warm"), ("cold page cache", "restore_cold")):
        row(f"restore to ready, {label} (CRIU / CUDA / rest)", lambda r, k=key: f"{r[k]['replicas'][0]['ready_s']} s "
            f"({r[k]['replicas'][0]['criu_s']} / {r[k]['replicas'][0]['cuda_s']} / {r[k]['replicas'][0]['after_cuda_s']})")
        row(f"restore to first token, {label}", lambda r, k=key: f"{r[k]['replicas'][0]['first_token_s']} s")
    row("  cold again: ready (CRIU / CUDA / rest)", lambda r: ", ".join(
        f"{a['replicas'][0]['ready_s']} s ({a['replicas'][0]['criu_s']} / {a['replicas'][0]['cuda_s']} / "
        f"{a['replicas'][0]['after_cuda_s']})" for a in r["restore_cold_again"]) or "-")
    row("  CUDA restore, warm / cold", lambda r: f"{r['restore_warm']['replicas'][0]['cuda_s']} s / "
        f"{r['restore_cold']['replicas'][0]['cuda_s']} s")
    row("floor, warm / cold", lambda r: f"{r['floor_warm_s']} s / {r.get('floor_cold_s', '-')} s")
    row("cold restore: bytes read from disk / rate while it ran",
        lambda r: f"{gb(r['restore_cold']['disk_read_bytes'])} / {r['restore_cold']['disk_read_rate'] / 1e9:.1f} GB/s")
    row("warm, CRIU reading with 1 thread, 4 KiB pages: ready (CRIU)", lambda r: f"{r['restore_warm_1_thread_4k']['replicas'][0]['ready_s']} s "
        f"({r['restore_warm_1_thread_4k']['replicas'][0]['criu_s']} s)")
    row("warm, threads, 4 KiB pages: ready (CRIU)", lambda r: f"{r['restore_warm_threads_4k']['replicas'][0]['ready_s']} s "
        f"({r['restore_warm_threads_4k']['replicas'][0]['criu_s']} s)")
    row("cold, CRIU reading with 1 thread, 4 KiB pages: ready (CRIU)", lambda r: f"{r['restore_cold_1_thread_4k']['replicas'][0]['ready_s']} s "
        f"({r['restore_cold_1_thread_4k']['replicas'][0]['criu_s']} s)")
    row("3 replicas, each ready", lambda r: ", ".join(f"{x['ready_s']}" for x in r["restore_3_replicas_warm"]["replicas"]) + " s")
    row("speed-up, cold start / warm restore to first token",
        lambda r: f"{r['cold']['cold_start_to_first_token_s'] / r['restore_warm']['replicas'][0]['first_token_s']:.1f}x")
    row("greedy tokens match (all restores)", lambda r: "yes" if all(
        x["tokens_match"] for k in ("restore_kv_kept_warm", "restore_warm", "restore_cold", "restore_3_replicas_warm", "restore_warm_1_thread_4k",
                                    "restore_warm_threads_4k", "restore_cold_1_thread_4k") if k in r for x in r[k]["replicas"])
        and r["tokens_match_after_leave_running"] else "NO")
    row("bandwidth: page cache 1 thread / N threads / disk N threads / H2D pageable / H2D pinned", lambda r: " / ".join(
        f"{r['bandwidth'][k] / 1e9:.1f}" if k in r["bandwidth"] else "-"
        for k in ("page_cache_1_thread", "page_cache_threads", "disk_threads", "h2d_pageable", "h2d_pinned")) + " GB/s")
    row("CRIU with threaded page reads", lambda r: "yes" if r["criu_threaded_reads"] else "NO")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", action="append", choices=sorted(SHAPES), required=True)
    ap.add_argument("--work", type=Path, default=Path("/var/tmp/warmstart-bench"))
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    ap.add_argument("--ab", action="store_true", help="also restore as CRIU without the page-read patch does")
    ap.add_argument("--no-pack", action="store_true", help="the worker saves its bf16 weights unpacked")
    ap.add_argument("--cold", type=int, default=1, metavar="N", help="restores from a cold page cache (default 1)")
    ap.add_argument("--no-guard", action="store_true", help="report figures slower than the last recorded run, "
                    "but exit 0")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    facts = gpu_facts()
    hb = h2d_bandwidth()
    bw = {"h2d_pageable": hb["pageable"], "h2d_pinned": hb["pinned"]}
    log(f"{facts}; H2D pageable {bw['h2d_pageable'] / 1e9:.1f} GB/s, pinned {bw['h2d_pinned'] / 1e9:.1f} GB/s")
    results = []
    tag = "-".join(args.shape) + ("-unpacked" if args.no_pack else "")
    for key in args.shape:
        try:
            results.append(bench_shape(key, args.work, bw, args.ab, not args.no_pack, args.out, args.cold))
        finally:
            for n in [r.name for r in registry.all_records()]:
                stop(n)
        (args.out / f"results-{tag}.json").write_text(json.dumps({"facts": facts, "results": results},
                                                                                  indent=2, default=str))
    text = table(results, facts)
    (args.out / f"table-{tag}.md").write_text(text + "\n")
    print(text)
    raise SystemExit(guard.report(f"gpu_{tag.replace('-', '_')}", figures(results), enforce=not args.no_guard))


def figures(results: list[dict]) -> dict[str, float]:
    """What the guard compares, per shape: the checkpoint and its steps, each restore to ready and first token."""
    out: dict[str, float] = {}
    for r in results:
        s = r["shape"]
        out[f"{s}.checkpoint_s"] = r["checkpoint"]["seconds"]
        out.update(guard.flat(f"{s}.checkpoint.steps", r["checkpoint"]["steps"]))
        for kind in ("restore_warm", "restore_cold"):
            rep = r[kind]["replicas"][0]
            out[f"{s}.{kind}.ready_s"] = rep["ready_s"]
            out[f"{s}.{kind}.first_token_s"] = rep["first_token_s"]
    return out


if __name__ == "__main__":
    main()
