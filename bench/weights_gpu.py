"""Weight-service benchmark on the GPU: the reference worker mapping its weights from `warmstart weights serve`.

    python bench/weights_gpu.py --shape 8b --work /var/tmp/warmstart-bench --out $OUT

For the shape: image size and checkpoint time with weights and KV cache released; restore to first token with
the weights resident in the service (warm and cold page cache for the image), with the service restarted so
the weights load from the page cache during the restore, and from a cold disk; the service's load rate; and a
worker killed and brought back while the service keeps its weights. Greedy tokens must match the cold start's.
Needs root and an NVIDIA GPU. Prints a table; writes weights_gpu.json under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu import KV_MB, PROMPT, SHAPES, TOKENS, drop_caches, ensure_model, free_port, gpu_facts, log, read_bandwidth, stop  # noqa: E402
from warmstart import demo, registry  # noqa: E402
from warmstart.pipeline import restore  # noqa: E402
from warmstart.pipeline import checkpoint
from warmstart.pipeline import run
from warmstart.weights import client as weights  # noqa: E402


class Service:
    def __init__(self, sock: Path, logfile: Path) -> None:
        self.sock, self.logfile, self.proc = sock, logfile, None

    def start(self) -> None:
        self.sock.unlink(missing_ok=True)
        self.proc = subprocess.Popen([sys.executable, "-m", "warmstart", "weights", "serve", "--device", "cuda:0",
                                      "--socket", str(self.sock)], stdout=open(self.logfile, "a"),
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not self.sock.exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit(f"weight service did not start: {self.logfile.read_text()[-2000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait()
            self.proc = None

    def load_s(self) -> float:
        sets = weights.request(str(self.sock), {"op": "status"})[0]["sets"]
        return sets[0]["load_s"] if sets else 0.0


def restore_to_first_token(art: Path, name: str, want: str) -> dict:
    t0 = time.monotonic()
    rr = restore.restore(art, name=name, timeout_s=600)
    r = rr.replicas[0]
    demo.complete(r.port, PROMPT, 1, timeout_s=300)
    first = time.monotonic() - t0
    text = demo.complete(r.port, PROMPT, TOKENS, timeout_s=300)
    stop(r.name)
    return {"criu_s": round(r.criu_s, 2), "cuda_s": round(r.cuda_s, 2), "ready_s": round(r.ready_s, 2),
            "first_token_s": round(first, 2), "tokens_match": text == want}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="8b", choices=sorted(SHAPES))
    ap.add_argument("--work", default="/var/tmp/warmstart-bench")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    key = args.shape
    model_dir = ensure_model(key)
    files = sorted(model_dir.glob("*.safetensors"))
    wbytes = sum(f.stat().st_size for f in files)
    svc = Service(work / "weights.sock", work / "weights-service.log")
    res: dict = {"shape": key, "weights_bytes": wbytes, **gpu_facts(), "date": time.strftime("%Y-%m-%d")}
    name = f"wbench-{key}"
    stop(name)
    try:
        svc.start()
        drop_caches()
        port = free_port()
        t0 = time.monotonic()
        rec = run.start(name, [sys.executable, "-m", "warmstart.reference.server", "--port", str(port), "--model",
                                   str(model_dir), "--device", "cuda", "--kv-cache-mb", str(KV_MB[key]),
                                   "--max-len", "256", "--weights-socket", str(svc.sock)], engine="reference")
        run.wait_ready(rec, 900)
        demo.complete(port, PROMPT, 1, timeout_s=300)
        res["cold_start_to_first_token_s"] = round(time.monotonic() - t0, 2)
        res["service_load_cold_disk_s"] = svc.load_s()
        want = demo.complete(port, PROMPT, TOKENS, timeout_s=300)
        log(f"{key}: cold start with the service {res['cold_start_to_first_token_s']} s "
            f"(weights {wbytes / 1e9:.1f} GB loaded from a cold disk in {res['service_load_cold_disk_s']:.2f} s)")

        art = work / f"{key}-weights"
        shutil.rmtree(art, ignore_errors=True)
        ck = checkpoint.checkpoint(rec.pid, art, record=rec)
        m = ck.manifest
        res["checkpoint"] = {"seconds": round(ck.seconds, 2), "image_bytes": m.image_bytes,
                             "gpu_bytes": sum(g.memory_bytes for g in m.gpus), "steps": m.step_seconds()}
        log(f"{key}: checkpoint {ck.seconds:.2f} s, image {m.image_bytes / 1e9:.2f} GB")

        res["restore_resident_warm"] = restore_to_first_token(art, f"{name}-a", want)
        log(f"{key}: weights resident, warm page cache: {res['restore_resident_warm']}")
        drop_caches()
        res["restore_resident_cold"] = restore_to_first_token(art, f"{name}-b", want)
        log(f"{key}: weights resident, cold page cache: {res['restore_resident_cold']}")
        res["restore_resident_again"] = restore_to_first_token(art, f"{name}-c", want)  # killed, brought back
        log(f"{key}: brought back again (service kept the weights): {res['restore_resident_again']}")

        svc.stop()
        read_bandwidth(files, 8)  # the weight files in the page cache
        svc.start()
        res["restore_load_page_cache"] = restore_to_first_token(art, f"{name}-d", want)
        res["service_load_page_cache_s"] = svc.load_s()
        log(f"{key}: weights loaded from the page cache during the restore: {res['restore_load_page_cache']} "
            f"(load {res['service_load_page_cache_s']:.2f} s = {wbytes / res['service_load_page_cache_s'] / 1e9:.1f} GB/s)")

        svc.stop()
        drop_caches()
        svc.start()
        res["restore_load_cold_disk"] = restore_to_first_token(art, f"{name}-e", want)
        res["service_load_cold_disk_during_restore_s"] = svc.load_s()
        log(f"{key}: weights loaded from a cold disk during the restore: {res['restore_load_cold_disk']} "
            f"(load {res['service_load_cold_disk_during_restore_s']:.2f} s)")
        shutil.rmtree(art, ignore_errors=True)
    finally:
        for n in list(registry.all_records()):
            if n.name.startswith(name):
                stop(n.name)
        svc.stop()

    gb = 1e9
    rows = [
        ("weights", f"{wbytes / gb:.2f} GB"),
        ("cold start to first token (service loads from cold disk)", f"{res['cold_start_to_first_token_s']} s"),
        ("checkpoint (KV + weights released)", f"{res['checkpoint']['seconds']} s"),
        ("image (GPU part)", f"{res['checkpoint']['image_bytes'] / gb:.2f} GB ({res['checkpoint']['gpu_bytes'] / gb:.2f} GB)"),
        ("restore, weights resident, warm page cache", f"{res['restore_resident_warm']['first_token_s']} s"),
        ("restore, weights resident, cold page cache", f"{res['restore_resident_cold']['first_token_s']} s"),
        ("killed and brought back, weights resident", f"{res['restore_resident_again']['first_token_s']} s"),
        ("restore + weight load from page cache", f"{res['restore_load_page_cache']['first_token_s']} s "
                                                  f"(load {res['service_load_page_cache_s']:.2f} s)"),
        ("weight load rate from page cache", f"{wbytes / res['service_load_page_cache_s'] / gb:.1f} GB/s"),
        ("restore + weight load from cold disk", f"{res['restore_load_cold_disk']['first_token_s']} s "
                                                 f"(load {res['service_load_cold_disk_during_restore_s']:.2f} s)"),
        ("greedy tokens match", str(all(v["tokens_match"] for k, v in res.items() if k.startswith("restore_")))),
    ]
    table = "\n".join(f"| {a} | {b} |" for a, b in rows)
    print(f"{res['gpu']}, driver {res['driver']}, {res['date']}\n{table}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "weights_gpu.json").write_text(json.dumps(res, indent=2))
    (Path(args.out) / "weights_gpu.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
