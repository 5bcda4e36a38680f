"""How much of a restored vLLM replica's private memory one completion touches: the replica restored in 4 KiB
pages (WARMSTART_HUGE_PAGES=0, so that a page touched is 4 KiB, not 2 MiB), every process's accessed bits cleared
(/proc/PID/clear_refs), one completion asked for, then each process's anonymous memory and what of it is
Referenced (/proc/PID/smaps).

    python3 bench/probes/touched_by_request.py ARTIFACT

Run with the environment the artifact was made in (WARMSTART_HOME, WARMSTART_KEY_DIR), as bench/vllm_cpu.py sets
it. The replica is stopped afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from warmstart import procs
from warmstart.quiesce import engines

_MAP = re.compile(r"^[0-9a-f]+-[0-9a-f]+ ", re.M)


def anon_kib(pid: int) -> tuple[int, int]:
    """(resident, referenced) KiB of the process's anonymous mappings (no file, or a [name] such as [heap])."""
    text = Path(f"/proc/{pid}/smaps").read_text()
    starts = [m.start() for m in _MAP.finditer(text)] + [len(text)]
    rss = ref = 0
    for a, b in zip(starts, starts[1:], strict=False):
        block = text[a:b]
        fields = block.split("\n", 1)[0].split()
        if len(fields) >= 6 and not fields[5].startswith("["):
            continue
        rss += int(re.search(r"^Rss:\s+(\d+)", block, re.M).group(1))  # type: ignore[union-attr]
        ref += int(re.search(r"^Referenced:\s+(\d+)", block, re.M).group(1))  # type: ignore[union-attr]
    return rss, ref


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    args = ap.parse_args()
    r = subprocess.run([sys.executable, "-m", "warmstart", "restore", str(args.artifact), "--json"],
                       capture_output=True, text=True, env={**os.environ, "WARMSTART_HUGE_PAGES": "0"})
    if r.returncode:
        sys.exit(r.stderr.strip())
    (rep,) = json.loads(r.stdout)["replicas"]
    try:
        tree = procs.tree(rep["pid"])
        for pid in tree:
            Path(f"/proc/{pid}/clear_refs").write_text("1\n")
        engine = engines.for_engine("vllm")
        assert engine is not None
        engine.complete(rep["port"], "The quick brown fox")
        total = [0, 0]
        for pid in tree:
            rss, ref = anon_kib(pid)
            total = [total[0] + rss, total[1] + ref]
            print(f"pid {pid}: {rss / 1024:.0f} MB anonymous, {ref / 1024:.0f} MB of it touched")
        print(f"all: {total[1] / 1024:.0f} of {total[0] / 1024:.0f} MB touched by one completion "
              f"({100 * total[1] / max(total[0], 1):.1f}%)")
    finally:
        subprocess.run([sys.executable, "-m", "warmstart", "stop", rep["name"]], capture_output=True)


if __name__ == "__main__":
    main()
