"""Where one restore of an artifact spends its time: each progress line stamped, the steps' timings, and the
stored images that took longest to open (image/inflated.py).

    python3 bench/probes/restore_steps.py ARTIFACT [--cold] [--no-cache]

--cold drops the page cache first (root); --no-cache points WARMSTART_IMAGE_CACHE at an empty directory, so
sealed images are opened rather than linked from this node's cache. The replica is stopped afterwards. Run
with the environment the artifact was made in (WARMSTART_HOME, WARMSTART_KEY_DIR), as bench/vllm_cpu.py sets it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--cold", action="store_true")
    ap.add_argument("--no-cache", action="store_true")
    args = ap.parse_args()
    if args.no_cache:
        os.environ["WARMSTART_IMAGE_CACHE"] = tempfile.mkdtemp(prefix="warmstart-no-cache-")
    if args.cold:
        subprocess.run(["sync"], check=False)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")

    from warmstart import api
    from warmstart.image import codec, inflated

    opened: list[tuple[float, str]] = []
    plain = codec.inflate

    def timed(src: Path, dst: Path, *a: object, **k: object) -> int:
        t = time.monotonic()
        n = plain(src, dst, *a, **k)  # type: ignore[arg-type]
        opened.append((time.monotonic() - t, src.name))
        return n

    inflated.inflate = timed  # type: ignore[assignment]
    t0 = time.monotonic()
    res = api.restore(args.artifact, progress=lambda m: print(f"{time.monotonic() - t0:7.3f} {m}", flush=True))
    print(f"{time.monotonic() - t0:7.3f} done")
    print("steps:", ", ".join(f"{s.step} {s.seconds:.3f}" for s in res.steps))
    print("slowest opens:", ", ".join(f"{n} {s:.3f}" for s, n in sorted(opened, reverse=True)[:6]),
          f"(all {sum(s for s, _ in opened):.3f} s)")
    for r in res.replicas:
        print(f"replica {r.name}: CRIU {r.criu_s:.3f} s, CUDA {r.cuda_s:.3f} s, ready at {r.ready_s:.3f} s")
        api.stop(r.name)


if __name__ == "__main__":
    main()
