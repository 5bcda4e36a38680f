"""No-SDK benchmark: CUDA processes that know nothing of warmstart, against the upstream recipe in the same run.

    python bench/nosdk.py --shape 1b [--shape 8b] [--reach] --work /var/tmp/warmstart-bench --out $OUT

Per shape, a Hugging Face transformers worker (bench/hf_worker.py: random Llama weights, bf16, greedy
`model.generate`) is started cold, then:
- warmstart: `checkpoint(leave_running=True, quiesce=False)`, each step timed, the time the worker was paused;
  restores to /health and to the first token from a warm and a cold page cache, and warm with 4 KiB pages
  (how the driver's restore rate depends on the pages CRIU put its saved memory in);
- the upstream recipe on the same worker: CUDA lock + checkpoint through the driver, plain `criu dump`;
  plain `criu restore`, then CUDA restore + unlock; cold, then warm;
- floors: bytes / bandwidth measured in this run (disk and page-cache reads, host-to-device pageable and
  pinned).
Greedy tokens are compared with the cold start's after every restore. --reach also checkpoints and restores
two CUDA programs without PyTorch (bench/reach/: the driver API through cuda-bindings, and a CUDA C program
built with nvcc) and a CUDA C program on managed memory. Needs root and an NVIDIA GPU; writes results JSON
and a table under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import traceback
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from warmstart import registry
from warmstart.criu import binary as criu
from warmstart.gpu import driver
from warmstart.image import cache, keeper, workingset
from warmstart.pipeline import checkpoint, restore, run
from warmstart.pipeline.restore import KEEP_THREAD

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import gpu as g  # noqa: E402 - bench/gpu.py's measuring helpers
import hoststate  # noqa: E402

PROMPT = "Restore the worker and keep every token the same"
TOKENS = 32
log = g.log


def http(port: int, path: str, body: dict[str, Any] | None = None, timeout: float = 300) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", data=data, timeout=timeout) as r:
        return json.loads(r.read()) if body is not None else r.status


def wait_health(port: int, timeout: float = 600, alive: Callable[[], bool] = lambda: True) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if http(port, "/health", timeout=5) == 200:
                return
        except OSError:
            if not alive():
                raise RuntimeError(f"the worker on port {port} exited") from None
        time.sleep(0.02)
    raise RuntimeError(f"no /health on port {port} within {timeout} s")


def tokens(port: int, n: int = TOKENS) -> list[int]:
    return list(http(port, "/generate", {"prompt": PROMPT, "tokens": n})["ids"])


def timed_serving(port: int, t0: float, want: list[int]) -> dict[str, Any]:
    """From t0 (the restore's start): /health, the first token, then whether the greedy tokens match."""
    wait_health(port)
    health = time.monotonic() - t0
    tokens(port, 1)
    first = time.monotonic() - t0
    return {"health_s": round(health, 2), "first_token_s": round(first, 2), "tokens_match": tokens(port) == want}


def ws_restore(art: Path, name: str, cold: bool, want: list[int], env: dict[str, str] | None = None) -> dict[str, Any]:
    dropped = g.drop_caches() if cold else False
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    read0, t0 = g.disk_bytes_read(), time.monotonic()
    try:
        rr = restore.restore(art, name=name, timeout_s=600)
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    r = rr.replicas[0]
    assert r.port is not None
    out = {"cold_page_cache": dropped, "criu_s": round(r.criu_s, 2), "cuda_s": round(r.cuda_s, 2),
           "ready_s": round(r.ready_s, 2), "verify_s": round(rr.verify_s, 2), "inflate_s": round(rr.inflate_s, 2),
           **timed_serving(r.port, t0, want), "disk_read_bytes": g.disk_bytes_read() - read0}
    g.stop(r.name)
    return out


def wait_for_cache_copies(timeout_s: float = 300) -> None:
    """Until the copies into the image cache are done: restores' (pipeline/restore_job.py's KEEP_THREAD) and
    keepers' (image/keeper.py, which a checkpoint starts for an image it sealed in place)."""
    for t in threading.enumerate():
        if t.name == KEEP_THREAD:
            t.join()

    end = time.monotonic() + timeout_s
    while keeper.running() and time.monotonic() < end:
        time.sleep(0.1)


def upstream_checkpoint(pid: int, images: Path) -> dict[str, Any]:
    """NVIDIA's recipe: cuda-checkpoint --action lock, --action checkpoint (the same driver calls), then plain
    CRIU dump, which ends the process."""
    images.mkdir(parents=True)
    t0 = time.monotonic()
    driver.lock(pid, 60_000)
    driver.checkpoint(pid)
    t1 = time.monotonic()
    r = subprocess.run([criu.find().path, "dump", "--tree", str(pid), "--images-dir", str(images), "--log-file",
                        "dump.log", "--file-locks", "--ext-unix-sk", "--tcp-established"], env=_plain_env())
    if r.returncode:
        raise RuntimeError(f"criu dump exited {r.returncode}: {_errors(images / 'dump.log')}")
    t2 = time.monotonic()
    size = sum(p.stat().st_size for p in images.iterdir() if p.is_file())
    return {"seconds": round(t2 - t0, 2), "cuda_s": round(t1 - t0, 2), "criu_s": round(t2 - t1, 2), "image_bytes": size}


def _errors(log: Path) -> str:
    """CRIU's error lines, or the log's last lines where it has none."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"(no log: {e})"
    return " | ".join([ln for ln in lines if "Error" in ln][-6:] or lines[-6:])


def _plain_env() -> dict[str, str]:
    """The patched CRIU with its page-read settings unset reads as upstream CRIU does."""
    return {k: v for k, v in os.environ.items() if not k.startswith("CRIU_PAGE_READ")}


def upstream_restore(images: Path, port: int, cold: bool, want: list[int]) -> dict[str, Any]:
    dropped = g.drop_caches() if cold else False
    pidfile = images / "restored.pid"
    pidfile.unlink(missing_ok=True)
    t0 = time.monotonic()
    r = subprocess.run([criu.find().path, "restore", "--images-dir", str(images), "--log-file", "restore.log",
                        "--file-locks", "--ext-unix-sk", "--tcp-established", "--tcp-close", "--restore-detached",
                        "--pidfile", str(pidfile)], env=_plain_env())
    if r.returncode:
        raise RuntimeError(f"criu restore exited {r.returncode}: {_errors(images / 'restore.log')}")
    t1 = time.monotonic()
    pid = int(pidfile.read_text())
    driver.restore(pid)
    driver.unlock(pid)
    t2 = time.monotonic()
    out = {"cold_page_cache": dropped, "criu_s": round(t1 - t0, 2), "cuda_s": round(t2 - t1, 2),
           **timed_serving(port, t0, want)}
    _kill(pid)
    return out


def _kill(pid: int) -> None:
    try:
        os.kill(pid, 9)
    except ProcessLookupError:
        return
    for _ in range(600):  # until it is gone, and with it its GPU memory
        try:
            os.waitpid(pid, os.WNOHANG)  # a worker this process started stays a zombie, holding its pid
        except ChildProcessError:
            pass
        if not Path(f"/proc/{pid}").exists():
            return
        time.sleep(0.05)


def floors(art: Path, bw: dict[str, float], image_bytes: int, gpu_bytes: int, ws_bytes: int) -> dict[str, Any]:
    images = [p for p in (art / "images").iterdir() if p.is_file()]
    threads = criu.read_threads()
    g.read_bandwidth(images, threads)  # brings back what the cold restores and the restored workers evicted
    b = {**bw, "page_cache_threads": g.read_bandwidth(images, threads)}
    if g.drop_caches():
        b["disk_threads"] = g.read_bandwidth(images, threads)
    out: dict[str, Any] = {"bandwidth": b}
    for kind in ("pageable", "pinned"):
        h2d = gpu_bytes / b[f"h2d_{kind}"]
        out[f"warm_{kind}_s"] = round(image_bytes / b["page_cache_threads"] + h2d, 2)
        if "disk_threads" in b:
            out[f"cold_{kind}_s"] = round((image_bytes + ws_bytes) / b["disk_threads"] + h2d, 2)
    return out


def attempt(res: dict[str, Any], key: str, fn: Callable[[], Any]) -> Any:
    """One measurement; a failure is recorded (and printed) and the run goes on with the next."""
    try:
        res[key] = fn()
        log(f"{key}: {res[key]}")
        return res[key]
    except Exception as e:  # noqa: BLE001 - a bench records what failed and measures the rest
        res[key] = {"error": f"{type(e).__name__}: {e}"}
        named = re.search(r"log: (/\S+?\.log)", str(e))
        if named:
            res[key]["log"] = _errors(Path(named.group(1)))
        log(f"{key} FAILED: {e}\n{traceback.format_exc()}")
        return None


def bench_shape(key: str, work: Path, bw: dict[str, float]) -> dict[str, Any]:
    model_dir = g.ensure_model(key)
    weights = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    res: dict[str, Any] = {"shape": key, "weights_bytes": weights}
    name, port = f"nosdk-{key}", g.free_port()
    g.stop(name)
    g.drop_caches()
    t0 = time.monotonic()
    rec = run.start(name, [sys.executable, str(BENCH / "hf_worker.py"), "--model", str(model_dir), "--port", str(port)])
    wait_health(port, alive=rec.alive)
    tokens(port, 1)
    res["cold_start_to_first_token_s"] = round(time.monotonic() - t0, 2)
    want = tokens(port)
    log(f"{key}: cold start {res['cold_start_to_first_token_s']} s")
    # Dirty pages left by anything before the first dump slow it (docs/benchmarks.md, runs 65-66): written back
    # first, so that neither side of the comparison pays for them.
    res["dirty_mb_before_checkpoint"] = hoststate.dirty_mb()
    os.sync()
    art = work / f"nosdk-{key}"
    shutil.rmtree(art, ignore_errors=True)

    def ws_checkpoint() -> dict[str, Any]:
        ck = checkpoint.checkpoint(rec.pid, art, record=rec, leave_running=True, quiesce=False)
        m = ck.manifest
        return {"seconds": round(ck.seconds, 2), "paused_s": round(ck.paused_s or 0, 2), "image_bytes": m.image_bytes,
                "gpu_bytes": sum(x.memory_bytes for x in m.gpus), "steps": m.step_seconds(),
                "working_set_bytes": workingset.total_bytes(m.working_set), "zero_bytes_dropped": m.zero_bytes_dropped,
                "transforms": [f"{t.transform} {'applied' if t.applied else 'skipped'} {t.image or ''}: {t.reason}"
                               for t in m.transforms]}

    ck = attempt(res, "warmstart_checkpoint", ws_checkpoint)
    res["tokens_match_after_leave_running"] = tokens(port) == want
    if ck:  # while the source serves: the disk then holds one image at a time besides the model
        # Warm: once the checkpoint's keeper has opened the image (sealed in place) into the node's cache.
        wait_for_cache_copies()
        attempt(res, "warmstart_restore_warm", lambda: ws_restore(art, f"{name}-warm", False, want))
        attempt(res, "warmstart_restore_warm_4k", lambda: ws_restore(art, f"{name}-4k", False, want,
                                                                     {"WARMSTART_HUGE_PAGES": "0"}))
        attempt(res, "warmstart_restore_cold", lambda: ws_restore(art, f"{name}-cold", True, want))
        attempt(res, "floor", lambda: floors(art, bw, ck["image_bytes"], ck["gpu_bytes"], ck["working_set_bytes"]))
    shutil.rmtree(art, ignore_errors=True)
    cache.clear()
    up = work / f"upstream-{key}"
    shutil.rmtree(up, ignore_errors=True)
    if attempt(res, "upstream_checkpoint", lambda: upstream_checkpoint(rec.pid, up)):
        _kill(rec.pid)  # the dump ended it; its pid must be free for the upstream restore
        attempt(res, "upstream_restore_cold", lambda: upstream_restore(up, port, True, want))
        attempt(res, "upstream_restore_warm", lambda: upstream_restore(up, port, False, want))
    g.stop(name)
    shutil.rmtree(up, ignore_errors=True)
    return res


def ask_line(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        return s.makefile().readline().strip()


def reach_one(label: str, command: list[str], port: int, work: Path) -> dict[str, Any]:
    """Start a CUDA program, ask it once, checkpoint it (no quiesce), restore it, ask the replica."""
    name = f"reach-{label}"
    g.stop(name)
    rec = run.start(name, command)
    deadline = time.monotonic() + 120
    while True:
        try:
            before = ask_line(port)
            break
        except OSError:
            if not rec.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{label} did not serve: {Path(rec.log).read_text()[-500:]}") from None
            time.sleep(0.1)
    art = work / name
    shutil.rmtree(art, ignore_errors=True)
    out: dict[str, Any] = {"before": before}
    t0 = time.monotonic()
    try:
        ck = checkpoint.checkpoint(rec.pid, art, record=rec, quiesce=False)
    except Exception as e:  # noqa: BLE001 - what warmstart tells the user is the result here
        out.update(checkpoint_error=f"{type(e).__name__}: {e}", failed_after_s=round(time.monotonic() - t0, 2),
                   source_still_serving=rec.alive() and bool(ask_line(port)))
        g.stop(name)
        return out
    out.update(checkpoint_s=round(ck.seconds, 2), image_bytes=ck.manifest.image_bytes)
    t0 = time.monotonic()
    rr = restore.restore(art, name=f"{name}-r", timeout_s=300)
    r = rr.replicas[0]
    assert r.port is not None
    after = ask_line(r.port)
    out.update(restore_ready_s=round(r.ready_s, 2), answered_s=round(time.monotonic() - t0, 2), after=after,
               cuda_s=round(r.cuda_s, 2))
    b, a = before.split(), after.split()
    # The same checksum of device memory, and the device-side counter went on (the restore's readiness check
    # connects too, and counts as a request) instead of starting again.
    out["state_kept"] = b[0] == a[0] and int(a[1]) > int(b[1])
    g.stop(r.name)
    shutil.rmtree(art, ignore_errors=True)
    return out


def reach(work: Path, counter: Path) -> dict[str, Any]:
    res: dict[str, Any] = {}
    p = g.free_port()
    attempt(res, "cuda_bindings_driver_api", lambda: reach_one(
        "driver-api", [sys.executable, str(BENCH / "reach" / "driver_api.py"), str(p), "1024"], p, work))
    p = g.free_port()
    attempt(res, "cuda_c_nvcc", lambda: reach_one("cuda-c", [str(counter), str(p), "1024"], p, work))
    p = g.free_port()
    attempt(res, "cuda_c_managed_memory", lambda: reach_one("cuda-managed", [str(counter), str(p), "256", "--managed"],
                                                           p, work))
    return res


def table(results: list[dict[str, Any]], facts: dict[str, str]) -> str:
    rows = [f"GPU: {facts['gpu']} ({facts['memory']}), driver {facts['driver']}, {time.strftime('%Y-%m-%d')}", "",
            "| HF worker, no SDK | " + " | ".join(r["shape"] for r in results) + " |",
            "|---" * (len(results) + 1) + "|"]

    def row(label: str, f: Callable[[dict[str, Any]], str]) -> None:
        rows.append(g.table_row(label, results, f))

    gb = lambda n: f"{n / 1e9:.2f} GB"  # noqa: E731
    row("cold start to first token", lambda r: f"{r['cold_start_to_first_token_s']} s")
    row("warmstart checkpoint: time / paused / image", lambda r: f"{r['warmstart_checkpoint']['seconds']} s / "
        f"{r['warmstart_checkpoint']['paused_s']} s / {gb(r['warmstart_checkpoint']['image_bytes'])}")
    row("  steps", lambda r: ", ".join(f"{k} {v}" for k, v in r["warmstart_checkpoint"]["steps"].items()))
    row("upstream checkpoint: time (CUDA / CRIU) / image", lambda r: f"{r['upstream_checkpoint']['seconds']} s "
        f"({r['upstream_checkpoint']['cuda_s']} / {r['upstream_checkpoint']['criu_s']}) / "
        f"{gb(r['upstream_checkpoint']['image_bytes'])}")
    for label, k in (("warm", "warmstart_restore_warm"), ("warm, 4 KiB pages", "warmstart_restore_warm_4k"),
                     ("cold", "warmstart_restore_cold")):
        row(f"warmstart restore, {label}: /health, first token (CRIU / CUDA)", lambda r, k=k: f"{r[k]['health_s']} s, "
            f"{r[k]['first_token_s']} s ({r[k]['criu_s']} / {r[k]['cuda_s']})")
    for label, k in (("warm", "upstream_restore_warm"), ("cold", "upstream_restore_cold")):
        row(f"upstream restore, {label}: /health, first token (CRIU / CUDA)", lambda r, k=k: f"{r[k]['health_s']} s, "
            f"{r[k]['first_token_s']} s ({r[k]['criu_s']} / {r[k]['cuda_s']})")
    row("floor warm / cold, GPU bytes at H2D pageable", lambda r: f"{r['floor']['warm_pageable_s']} s / "
        f"{r['floor'].get('cold_pageable_s', '-')} s")
    row("floor warm / cold, GPU bytes at H2D pinned", lambda r: f"{r['floor']['warm_pinned_s']} s / "
        f"{r['floor'].get('cold_pinned_s', '-')} s")
    row("bandwidth: page cache / disk / H2D pageable / pinned (GB/s)", lambda r: " / ".join(
        f"{r['floor']['bandwidth'][k] / 1e9:.1f}" if k in r["floor"]["bandwidth"] else "-"
        for k in ("page_cache_threads", "disk_threads", "h2d_pageable", "h2d_pinned")))
    def matched(r: dict[str, Any]) -> str:
        done = [v["tokens_match"] for v in r.values() if isinstance(v, dict) and "tokens_match" in v]
        return f"{sum(done)} of {len(done)} restores" + ("" if r["tokens_match_after_leave_running"] else
                                                         "; NOT after --leave-running")
    row("greedy tokens match", matched)
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", action="append", choices=sorted(g.SHAPES), default=[])
    ap.add_argument("--reach", action="store_true")
    ap.add_argument("--counter", type=Path, default=Path(".deps/reach/counter"), help="bench/reach/counter.cu, built")
    ap.add_argument("--work", type=Path, default=Path("/var/tmp/warmstart-bench"))
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    facts = g.gpu_facts()
    hb = g.h2d_bandwidth()
    bw = {"h2d_pageable": hb["pageable"], "h2d_pinned": hb["pinned"]}
    log(f"{facts}; H2D pageable {bw['h2d_pageable'] / 1e9:.1f} GB/s, pinned {bw['h2d_pinned'] / 1e9:.1f} GB/s")
    doc: dict[str, Any] = {"facts": facts, "results": []}
    try:
        if args.reach:
            doc["reach"] = reach(args.work, args.counter.resolve())
        for key in args.shape:
            doc["results"].append(bench_shape(key, args.work, bw))
            (args.out / "nosdk.json").write_text(json.dumps(doc, indent=2, default=str))
    finally:
        for n in [r.name for r in registry.all_records()]:
            g.stop(n)
        (args.out / "nosdk.json").write_text(json.dumps(doc, indent=2, default=str))
    text = table(doc["results"], facts) if doc["results"] else ""
    for k, v in doc.get("reach", {}).items():
        text += f"\nreach {k}: {json.dumps(v)}"
    (args.out / "nosdk-table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
