"""Where one checkpoint spends its time: each progress line stamped, and the steps' timings.

    python3 bench/probes/checkpoint_steps.py WORKER OUT [--leave-running] [--profile FILE]

WORKER is a managed worker's name or pid (`warmstart run`); OUT the artifact's directory. --profile writes
cProfile's statistics of the checkpoint to FILE (read them with `python3 -m pstats FILE`).
"""

from __future__ import annotations

import argparse
import cProfile
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("worker")
    ap.add_argument("out")
    ap.add_argument("--leave-running", action="store_true")
    ap.add_argument("--profile")
    args = ap.parse_args()
    from warmstart import api

    worker: str | int = int(args.worker) if args.worker.isdigit() else args.worker
    t0 = time.monotonic()
    prof = cProfile.Profile() if args.profile else None
    if prof:
        prof.enable()
    res = api.checkpoint(worker, args.out, leave_running=args.leave_running,
                         progress=lambda m: print(f"{time.monotonic() - t0:7.3f} {m}", flush=True))
    if prof:
        prof.disable()
        prof.dump_stats(args.profile)
    print(f"{time.monotonic() - t0:7.3f} done")
    print("steps:", ", ".join(f"{s.step} {s.seconds:.3f}" for s in res.manifest.steps))


if __name__ == "__main__":
    main()
