"""Several replicas restored at once, in 2 MiB against 4 KiB pages: the kernel time each way.

    .venv/bin/python bench/probes/replica_pages.py ARTIFACT [--replicas 2] [--rounds 4]
    .venv/bin/python bench/probes/replica_pages.py --touch 1.5 [--rounds 2]

With an artifact: `warmstart restore ARTIFACT --replicas N --json` alternately with WARMSTART_HUGE_PAGES=1 and
=0 (the rest of the environment as given: WARMSTART_HOME, the keys and the cache the artifact was made with),
each replica stopped after; prints each round's command time, CRIU's time per replica, and the host's user and
system CPU seconds meanwhile (/proc/stat). With --touch GIB: fresh anonymous memory touched a page at a time,
one process and then two at once, with and without MADV_HUGEPAGE: the first-touch cost CRIU's restore pays.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import subprocess
import sys
import time
from multiprocessing import Pool


def cpu_seconds() -> tuple[float, float]:
    fields = [int(x) for x in open("/proc/stat").readline().split()[1:4]]
    tick = os.sysconf("SC_CLK_TCK")
    return (fields[0] + fields[1]) / tick, fields[2] / tick


def restore_round(artifact: str, replicas: int, huge: str) -> str:
    env = {**os.environ, "WARMSTART_HUGE_PAGES": huge, "WARMSTART_FORKSERVER": "0"}
    (u0, s0), t0 = cpu_seconds(), time.monotonic()
    r = subprocess.run([sys.executable, "-m", "warmstart", "restore", artifact, "--replicas", str(replicas),
                        "--json"], capture_output=True, text=True, env=env)
    took, (u1, s1) = time.monotonic() - t0, cpu_seconds()
    if r.returncode != 0:
        raise SystemExit(f"restore failed: {r.stderr.strip()}")
    reps = json.loads(r.stdout)["replicas"]
    for rep in reps:
        subprocess.run([sys.executable, "-m", "warmstart", "stop", rep["name"]], env=env, capture_output=True)
    criu = ", ".join(f"{rep['criu_s']:.2f}" for rep in reps)
    return f"| {'2 MiB' if huge == '1' else '4 KiB'} | {took:.2f} s | {criu} s | {u1 - u0:.2f} s | {s1 - s0:.2f} s |"


def touch(args: tuple[int, bool]) -> tuple[float, float]:
    size, huge = args
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge:
        m.madvise(mmap.MADV_HUGEPAGE)
    t0, c0 = time.monotonic(), os.times()
    for i in range(0, size, 4096):
        m[i] = 1
    return time.monotonic() - t0, os.times().system - c0.system


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact", nargs="?")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--touch", type=float, help="GiB of fresh memory per process, instead of restores")
    a = ap.parse_args()
    if a.touch:
        print("| pages | processes | each: seconds (system) |\n| --- | --- | --- |")
        for _ in range(a.rounds):
            for huge in (True, False):
                for n in (1, 2):
                    with Pool(n) as pool:
                        res = pool.map(touch, [(int(a.touch * 2**30), huge)] * n)
                    each = ", ".join(f"{t:.2f} ({s:.2f})" for t, s in res)
                    print(f"| {'2 MiB' if huge else '4 KiB'} | {n} | {each} |", flush=True)
        return
    if not a.artifact:
        ap.error("give an ARTIFACT, or --touch GIB")
    print(f"| pages | restore x{a.replicas} | CRIU each | user CPU | system CPU |\n| --- | --- | --- | --- | --- |")
    for _ in range(a.rounds):
        for setting in ("1", "0"):
            print(restore_round(a.artifact, a.replicas, setting), flush=True)
            time.sleep(1)


if __name__ == "__main__":
    main()
