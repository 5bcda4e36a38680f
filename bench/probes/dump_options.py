"""What makes warmstart's CRIU dump of a CUDA worker slower than the upstream recipe's: one worker, its GPU state
checkpointed once through the driver, then dumped again and again (--leave-running) with each variant's options,
the variants alternated, the page cache dropped between dumps.

    python3 bench/probes/dump_options.py [--shape 8b] [--rounds 2] [--out DIR]

Variants: recipe (the upstream recipe's options), ours (criu/binary.py's dump_args), ours-v2 (CRIU's default
log level instead of -v4), ours+seal (ours with image/behind.py sealing while CRIU writes, a thread per core),
ours+seal4 (four sealing threads). Prints a table; dumps.json under --out. The worker's tokens are checked
after its GPU state is restored at the end. --keep-cache leaves the page cache as it is between dumps (the
model's files in it, as after a cold start); --pipeline then also checkpoints the worker as warmstart does
(`--leave-running`), for its dump step in the same worker.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BENCH))
import gpu as g  # noqa: E402 - bench/gpu.py's measuring helpers
import nosdk  # noqa: E402
from warmstart.artifact import encryption  # noqa: E402
from warmstart.criu import binary as criu  # noqa: E402
from warmstart.gpu import driver  # noqa: E402
from warmstart.image import behind  # noqa: E402
from warmstart.pipeline import checkpoint, run  # noqa: E402

RECIPE = ["--file-locks", "--ext-unix-sk", "--tcp-established", "--leave-running"]


def variant_args(name: str, pid: int, images: Path, log: Path) -> list[str]:
    if name == "recipe":
        return ["dump", "--tree", str(pid), "--images-dir", str(images), "--log-file", str(log), *RECIPE]
    args = criu.dump_args(pid, images, log)
    return [("-v2" if a == "-v4" else a) for a in args] if name == "ours-v2" else args


def dump_once(name: str, pid: int, images: Path, drop: bool) -> dict[str, Any]:
    shutil.rmtree(images, ignore_errors=True)
    images.mkdir(parents=True)
    if drop:
        g.drop_caches()
    log = images.parent / f"{name}.log"
    threads = {"ours+seal": os.cpu_count() or 1, "ours+seal4": 4}.get(name)
    sealing = None
    if threads:
        _, key = encryption.new_artifact_key()
        sealing = behind.Behind(images, key, threads, lambda: None).start()
    t0 = time.monotonic()
    r = subprocess.run([criu.find().path, *variant_args(name, pid, images, log)], env=nosdk._plain_env())
    t1 = time.monotonic()
    sealed = 0
    if sealing:
        begun = sealing.stop()
        sealed = sum(len(f.sealed) for f in begun.values())
        for f in begun.values():
            f.close()
    if r.returncode:
        raise RuntimeError(f"{name}: criu dump exited {r.returncode}: {nosdk._errors(log)}")
    size = sum(p.stat().st_size for p in images.iterdir() if p.is_file())
    return {"variant": name, "criu_s": round(t1 - t0, 2), "after_s": round(time.monotonic() - t1, 2),
            "image_gb": round(size / 1e9, 2), "pieces_sealed": sealed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="8b", choices=sorted(g.SHAPES))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variants", default="recipe,ours,ours-v2,ours+seal,ours+seal4")
    ap.add_argument("--keep-cache", action="store_true")
    ap.add_argument("--pipeline", action="store_true")
    ap.add_argument("--work", type=Path, default=Path("/var/tmp/warmstart-bench/dumps"))
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    name, port = f"dumps-{args.shape}", g.free_port()
    g.stop(name)
    rec = run.start(name, [sys.executable, str(BENCH / "hf_worker.py"), "--model", str(g.ensure_model(args.shape)),
                           "--port", str(port)])
    results: list[dict[str, Any]] = []
    try:
        nosdk.wait_health(port, alive=rec.alive)
        want = nosdk.tokens(port)
        t0 = time.monotonic()
        driver.lock(rec.pid, 60_000)
        driver.checkpoint(rec.pid)
        g.log(f"CUDA lock + checkpoint {time.monotonic() - t0:.2f} s")
        for _ in range(args.rounds):
            for v in args.variants.split(","):
                results.append(dump_once(v, rec.pid, args.work / "images", not args.keep_cache))
                g.log(json.dumps(results[-1]))
        driver.restore(rec.pid)
        driver.unlock(rec.pid)
        same = nosdk.tokens(port) == want
        if args.pipeline:
            shutil.rmtree(args.work / "images", ignore_errors=True)
            ck = checkpoint.checkpoint(rec.pid, args.work / "art", record=rec, leave_running=True, quiesce=False)
            steps = ck.manifest.step_seconds()
            results.append({"variant": "pipeline", "criu_s": round(steps["criu_dump"], 2), "steps": steps,
                            "image_gb": round(ck.manifest.image_bytes / 1e9, 2)})
            g.log(json.dumps(results[-1]))
            same = same and nosdk.tokens(port) == want
    finally:
        shutil.rmtree(args.work, ignore_errors=True)
        g.stop(name)
    (args.out / "dumps.json").write_text(json.dumps({"facts": g.gpu_facts(), "tokens_same": same,
                                                    "keep_cache": args.keep_cache,
                                                    "dumps": results}, indent=2))
    print("| variant | CRIU dump s (each) | median | image GB |\n|---|---|---|---|")
    for v in args.variants.split(",") + (["pipeline"] if args.pipeline else []):
        each = [r["criu_s"] for r in results if r["variant"] == v]
        gb = next(r["image_gb"] for r in results if r["variant"] == v)
        print(f"| {v} | {', '.join(map(str, each))} | {statistics.median(each):.2f} | {gb} |")
    print(f"tokens after the GPU state was restored: {'same' if same else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
