"""A cold restore of a sealed artifact whose raw images this node's cache holds on disk, two ways, alternating:
the sealed images opened (decrypted into /dev/shm, as before 2026-12-03) and the cache's cold raw images
linked (image/cache.py's `_cheaper`, the default since). The page cache is dropped before each restore, once
every keeper has finished.

    python3 bench/probes/cold_open.py ARTIFACT [--rounds 3]

Run as root with the environment the artifact was made in (WARMSTART_HOME, WARMSTART_KEY_DIR,
WARMSTART_IMAGE_CACHE), as bench/vllm_cpu.py sets it; its first restore fills the cache.
"""

from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path

from warmstart import api
from warmstart.image import cache, keeper


def settle() -> None:
    while keeper.running():
        time.sleep(0.1)
    subprocess.run(["sync"], check=False)
    time.sleep(2)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    default = cache._OPEN_COST
    print("| image | restore s | CRIU s | steps |\n|---|---|---|---|")
    for _ in range(args.rounds):
        for how in ("sealed opened", "raw linked"):
            settle()
            cache._OPEN_COST = -2.0 if how == "sealed opened" else default  # -2: never cheaper than opening
            t0 = time.monotonic()
            res = api.restore(args.artifact)
            took = time.monotonic() - t0
            steps = ", ".join(f"{s.step} {s.seconds:.3f}" for s in res.steps)
            print(f"| {how} | {took:.3f} | {res.replicas[0].criu_s:.3f} | {steps} |", flush=True)
            for r in res.replicas:
                api.stop(r.name)


if __name__ == "__main__":
    main()
