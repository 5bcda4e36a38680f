"""vLLM benchmark (CPU build, the tiny reference model): cold start vs restore, to the first completion.

    scripts/setup.sh --vllm && .venv/bin/python bench/vllm_cpu.py [--out DIR]

Starts vLLM's OpenAI server under `warmstart run --engine vllm`, times it from launch to its first
completion, checkpoints it, then restores it with the `warmstart restore` command (a fresh process, as a
user would) from a cold and from a warm page cache, and as 2 replicas side by side, then the same warm restores
forked by a `warmstart forkserver` (no Python start or imports of their own); each restore is timed
from the command's start to the replica's first completion, which must equal the cold start's. Needs root
(CRIU, dropping the page cache). Prints a table; writes vllm_cpu.json under --out. Removes its artifact and
the image cache it filled at the end (--keep: keeps them, and prints where).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from warmstart import registry  # noqa: E402
from warmstart.image import keeper  # noqa: E402
from warmstart.pipeline import checkpoint, run  # noqa: E402
from warmstart.quiesce import engines  # noqa: E402
from warmstart.reference import model  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
import guard  # noqa: E402
import hoststate  # noqa: E402

PROMPT = "The quick brown fox"


def drop_caches() -> None:
    subprocess.run(["sync"], check=False)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def first_completion(port: int, deadline_s: float = 900) -> tuple[str, float]:
    """Poll until a completion succeeds; (its text, monotonic time it arrived)."""
    vllm = engines.for_engine("vllm")
    end = time.monotonic() + deadline_s
    while True:
        try:
            return vllm.complete(port, PROMPT), time.monotonic()
        except Exception:
            if time.monotonic() > end:
                raise
            time.sleep(0.02)


def wait_for_keepers(timeout_s: float = 120) -> None:
    """Until no keeper (image/keeper.py: an earlier restore's or the checkpoint's) is still copying into the image
    cache: it would share the cores with the next restore."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and keeper.running():
        time.sleep(0.1)


def restore_once(art: Path, replicas: int, cold: bool, forkserver: Path | None = None) -> dict:
    wait_for_keepers()
    if cold:
        drop_caches()
    env = {**os.environ, "WARMSTART_FORKSERVER": str(forkserver) if forkserver else "0"}
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "warmstart", "restore", str(art), "--replicas", str(replicas), "--json"],
                       capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"restore failed: {r.stderr}")
    t_cmd = time.monotonic() - t0
    reps = json.loads(r.stdout)["replicas"]
    out = []
    with ThreadPoolExecutor(len(reps)) as pool:  # each replica asked at once: one's answer is not another's wait
        answers = list(pool.map(lambda rep: first_completion(rep["port"], 60), reps))
    for rep, (text, t) in zip(reps, answers, strict=True):
        # after_ready_s: from the command's return (the replicas ready) to this completion.
        out.append({"name": rep["name"], "criu_s": rep["criu_s"], "ready_s": rep["ready_s"],
                    "first_completion_s": round(t - t0, 3), "after_ready_s": round(t - t0 - t_cmd, 3), "text": text})
    for rep in reps:
        registry.stop(rep["name"], grace_s=2)
    return {"replicas": replicas, "cold_page_cache": cold, "forkserver": forkserver is not None,
            "command_s": round(t_cmd, 3), "each": out}


def start_forkserver(sock: Path) -> subprocess.Popen[bytes]:
    """`warmstart forkserver` with this bench's environment: the restores after it start as its forks."""
    proc = subprocess.Popen([sys.executable, "-m", "warmstart", "forkserver", "--socket", str(sock)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("warmstart forkserver did not start")
        time.sleep(0.05)
    return proc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vllm-python", default=str(REPO / ".deps" / "vllm" / "bin" / "python"))
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--kv-mib", type=int, default=64)
    ap.add_argument("--no-guard", action="store_true", help="report figures slower than the last recorded run, "
                    "but exit 0")
    ap.add_argument("--keep", action="store_true", help="keep the artifact, its home and its image cache")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="warmstart-vllm-bench-"))
    try:
        run_bench(args, work)
    finally:
        if args.keep:
            print(f"kept: {work} (WARMSTART_HOME={work / 'home'}, WARMSTART_IMAGE_CACHE="
                  f"{os.environ['WARMSTART_IMAGE_CACHE']}, WARMSTART_KEY_DIR={os.environ['WARMSTART_KEY_DIR']})")
        else:
            remove_work(work)


def remove_work(work: Path) -> None:
    """The bench's artifact and home, and the image cache and keys conftest made for this process (1.4 GB
    each run otherwise stay in /tmp): once the keepers copying into that cache are done."""
    from conftest import MADE_HERE

    wait_for_keepers()
    for p in [work, *MADE_HERE]:
        shutil.rmtree(p, ignore_errors=True)


def run_bench(args: argparse.Namespace, work: Path) -> None:
    os.environ["WARMSTART_HOME"] = str(work / "home")
    from conftest import free_port

    port = free_port()
    cmd = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model.ensure()),
           "--served-model-name", "tiny", "--port", str(port), "--max-model-len", "256", "--dtype", "float32",
           "--kv-cache-memory-bytes", str(args.kv_mib << 20)]
    drop_caches()
    t0 = time.monotonic()
    rec = run.start("vllm", cmd, engine="vllm")
    expected, t_first = first_completion(port)
    cold_start = t_first - t0
    print(f"cold start to first completion: {cold_start:.1f} s", flush=True)

    dirty_mb = hoststate.dirty_mb()
    res = checkpoint.checkpoint(rec.pid, work / "art", record=rec)
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}",
        "kernel": platform.release(), "cold_start_s": round(cold_start, 2),
        "dirty_mb_before_checkpoint": dirty_mb, "checkpoint_s": round(res.seconds, 2),
        "image_bytes": res.manifest.image_bytes,
        "steps": res.manifest.step_seconds(), "restores": [],
    }
    for replicas, cold in ((1, True), (1, False), (1, False), (2, False)):
        results["restores"].append(restore_once(work / "art", replicas, cold))
    server = start_forkserver(work / "forkserver" / "s.sock")
    try:
        for replicas in (1, 1, 2):
            results["restores"].append(restore_once(work / "art", replicas, False, work / "forkserver" / "s.sock"))
    finally:
        server.terminate()
        server.wait(60)
    same = all(e["text"] == expected for r in results["restores"] for e in r["each"])
    results["completions_identical"] = same

    results["transforms"] = [t.model_dump() for t in res.manifest.transforms]
    rows = [("cold start to first completion", f"{cold_start:.2f} s"),
            ("dirty page cache before the checkpoint", f"{dirty_mb} MB"),
            ("checkpoint (warm check + quiesce + dump + transforms + checksums)", f"{res.seconds:.2f} s"),
            ("  its steps", ", ".join(f"{k} {v:.2f}" for k, v in res.manifest.step_seconds().items())),
            ("image size", f"{res.manifest.image_bytes / 1e6:.0f} MB")]
    rows += [(f"  {t.transform} {'applied' if t.applied else 'skipped'}", t.reason) for t in res.manifest.transforms]
    for r in results["restores"]:
        what = f"restore x{r['replicas']}, {'cold' if r['cold_page_cache'] else 'warm'} page cache, to first completion"
        what += ", forked by `warmstart forkserver`" if r.get("forkserver") else ""
        firsts = ", ".join(f"{e['first_completion_s']:.2f}" for e in r["each"])
        after = ", ".join(f"{e['after_ready_s']:.2f}" for e in r["each"])
        rows.append((what, f"{firsts} s (CRIU {', '.join(str(round(e['criu_s'], 2)) for e in r['each'])}; "
                           f"first completion {after} s after ready)"))
    best = min(e["first_completion_s"] for r in results["restores"] if r["replicas"] == 1 for e in r["each"])
    rows.append(("speed-up (cold start / best single restore)", f"{cold_start / best:.0f}x"))
    rows.append(("completions identical to the cold start's", "yes" if same else "NO"))
    width = max(len(a) for a, _ in rows)
    table = "\n".join(f"| {a.ljust(width)} | {b} |" for a, b in rows)
    print(table)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "vllm_cpu.json").write_text(json.dumps(results, indent=2))
    if not same:
        raise SystemExit("completions differ")
    raise SystemExit(guard.report("vllm_cpu", figures(results), enforce=not args.no_guard))


def figures(results: dict) -> dict[str, float]:
    """The figures the guard compares: the checkpoint and its steps, each restore's first completion."""
    out = {"checkpoint_s": results["checkpoint_s"], **guard.flat("steps", results["steps"])}
    for i, r in enumerate(results["restores"]):
        kind = f"restore{i}_x{r['replicas']}_{'cold' if r['cold_page_cache'] else 'warm'}"
        kind += "_forkserver" if r.get("forkserver") else ""
        out[f"{kind}.first_completion_s"] = max(e["first_completion_s"] for e in r["each"])
        out[f"{kind}.after_ready_s"] = max(e["after_ready_s"] for e in r["each"])
    return out


if __name__ == "__main__":
    main()
