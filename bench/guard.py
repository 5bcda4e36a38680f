"""The benchmarks' regression guard: a run's figures against the last ones recorded in docs/benchmarks.md.

Each recorded run leaves one line in docs/benchmarks.md, `<!-- guard NAME {json} -->`, the flat figures
(seconds) a later run of the same benchmark is compared with: `figures()` makes them from a run's results,
`check()` names every one that got slower by more than the tolerance, and by how much. bench/vllm_cpu.py and
bench/gpu.py print that and exit 3 when something got slower (--no-guard: report only), and print the line to
record with their results.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
TOLERANCE = 0.15  # slower by more than this fraction ...
FLOOR_S = 0.1  # ... and by more than this many seconds: one run's noise is below both
_LINE = re.compile(r"^<!-- guard (?P<name>[a-z0-9_]+) (?P<body>\{.*\}) -->$")


def last_recorded(name: str, doc: Path = DOC) -> dict[str, float] | None:
    found = None
    for line in doc.read_text().splitlines():
        m = _LINE.match(line.strip())
        if m and m["name"] == name:
            found = {k: float(v) for k, v in json.loads(m["body"]).items()}
    return found


def flat(prefix: str, values: Mapping[str, object]) -> dict[str, float]:
    """The numbers of a (nested) mapping as 'prefix.key' -> seconds."""
    out: dict[str, float] = {}
    for k, v in values.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, Mapping):
            out.update(flat(key, v))
        elif isinstance(v, int | float) and not isinstance(v, bool):
            out[key] = float(v)
    return out


def check(now: Mapping[str, float], before: Mapping[str, float], tolerance: float = TOLERANCE,
          floor_s: float = FLOOR_S) -> list[str]:
    """One line for each figure that got slower than `before` by more than both bounds, slowest first."""
    worse = [(now[k] - b, k, b) for k, b in before.items() if k in now
             and now[k] - b > floor_s and now[k] > b * (1 + tolerance)]
    return [f"slower: {k} {b:.2f} s -> {b + d:.2f} s (+{d:.2f} s, +{d / b:.0%})" if b > 0 else
            f"slower: {k} 0 s -> {d:.2f} s" for d, k, b in sorted(worse, reverse=True)]


def record_line(name: str, figures: Mapping[str, float]) -> str:
    return f"<!-- guard {name} {json.dumps({k: round(v, 3) for k, v in sorted(figures.items())})} -->"


def report(name: str, figures: Mapping[str, float], enforce: bool) -> int:
    """Print the comparison and the line to record; the exit status the benchmark should end with."""
    before = last_recorded(name)
    print(record_line(name, figures))
    if before is None:
        print(f"guard: nothing recorded for {name} in {DOC.name} yet: add the line above with the results")
        return 0
    lines = check(figures, before)
    for line in lines:
        print(f"guard: {line}")
    if not lines:
        print(f"guard: no figure slower than the last recorded {name} run (by {TOLERANCE:.0%} and {FLOOR_S} s)")
    return 3 if lines and enforce else 0
