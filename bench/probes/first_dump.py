"""Why a cold-started worker's first checkpoint dumps slower than its next ones: the same vLLM CPU worker
checkpointed (`--leave-running`) several times in a row, optionally after touching fresh memory first.

    .venv/bin/python bench/probes/first_dump.py [--rounds 3] [--touch GIB]

Starts vLLM's CPU build as bench/vllm_cpu.py does, waits for its first completion, then checkpoints it
`--rounds` times (each artifact removed before the next, `sync` before each), printing each checkpoint's
time, CRIU dump and seal. With --touch, GIB of fresh anonymous memory is written a page at a time and freed
right before the first checkpoint, and the time that took is printed: on a VM whose memory the host backs
only once the guest touches it, that is what the first dump's page cache would otherwise pay.
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "bench")]

from conftest import free_port  # noqa: E402
from vllm_cpu import first_completion  # noqa: E402
from warmstart import registry  # noqa: E402
from warmstart.pipeline import checkpoint, run  # noqa: E402
from warmstart.reference import model  # noqa: E402


def touch(gib: float) -> float:
    t0 = time.monotonic()
    size = int(gib * (1 << 30))
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for off in range(0, size, mmap.PAGESIZE):
        m[off] = 1
    m.close()
    return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--touch", type=float, default=0.0, help="GiB of fresh memory touched before the first")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="warmstart-first-dump-"))
    os.environ["WARMSTART_HOME"] = str(work / "home")
    port = free_port()
    cmd = [str(REPO / ".deps" / "vllm" / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model",
           str(model.ensure()), "--served-model-name", "tiny", "--port", str(port), "--max-model-len", "256",
           "--dtype", "float32", "--kv-cache-memory-bytes", str(64 << 20)]
    rec = run.start("vllm", cmd, engine="vllm")
    try:
        first_completion(port)
        print("| round | touched first | checkpoint | CRIU dump | seal |\n| --- | --- | --- | --- | --- |")
        for i in range(a.rounds):
            os.sync()
            touched = f"{a.touch:g} GiB in {touch(a.touch):.2f} s" if a.touch and i == 0 else "-"
            res = checkpoint.checkpoint(rec.pid, work / "art", record=rec, leave_running=True)
            steps = res.manifest.step_seconds()
            print(f"| {i} | {touched} | {res.seconds:.2f} s | {steps['criu_dump']:.2f} s | {steps['seal']:.2f} s |",
                  flush=True)
            shutil.rmtree(work / "art")
    finally:
        registry.stop(rec.name, grace_s=5.0)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
