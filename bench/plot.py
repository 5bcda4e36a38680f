"""Plot the GPU benchmark: cold start vs restore (warm and cold page cache) vs the restore's floor, per shape.

    .venv/bin/python bench/plot.py bench/results/gpu_1b_8b_run39_h200_encrypted.json [MORE.json] [-o PNG]

Reads what bench/gpu.py recorded (results[].shape, cold, restore_warm, restore_cold, floor_warm_s, floor_cold_s,
facts) and draws, for each shape, time to first token of a cold start and of a restore from a warm and from a
cold page cache, each restore with its floor (the bytes it must move / the rates measured in the same run). Each
file is one row of panels. Writes docs/benchmarks.png unless -o says otherwise. Needs matplotlib (the `plot`
extra: `.venv/bin/pip install -e '.[plot]'`).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHAPES = {"1b": "TinyLlama-1.1B shape", "8b": "Llama-3-8B shape"}
COLOURS = {"cold start": "#9e9e9e", "restore, warm page cache": "#1f77b4", "restore, cold page cache": "#ff7f0e"}


@dataclass(frozen=True)
class Shape:
    label: str
    weights_gb: float
    cold_start_s: float
    restores: dict[str, tuple[float, float | None]]  # bar -> (first token s, floor s or None)


@dataclass(frozen=True)
class Run:
    title: str
    shapes: list[Shape]


def _first_token(res: dict[str, Any], key: str) -> float:
    return float(res[key]["replicas"][0]["first_token_s"])


def _shape(res: dict[str, Any]) -> Shape:
    floor_cold = res.get("floor_cold_s")  # missing where the run could not drop the page cache
    return Shape(
        label=SHAPES.get(res["shape"], res["shape"]), weights_gb=res.get("weights_bytes", 0) / 1e9,
        cold_start_s=float(res["cold"]["cold_start_to_first_token_s"]),
        restores={"restore, warm page cache": (_first_token(res, "restore_warm"), float(res["floor_warm_s"])),
                  "restore, cold page cache": (_first_token(res, "restore_cold"),
                                               None if floor_cold is None else float(floor_cold))})


def _recorded_on(path: Path) -> str:
    """The date the file was committed, else its modification date."""
    r = subprocess.run(["git", "log", "--diff-filter=A", "-1", "--format=%cs", "--", str(path)], cwd=REPO,
                       capture_output=True, text=True)
    return r.stdout.strip() or time.strftime("%Y-%m-%d", time.localtime(path.stat().st_mtime))


def _fail(line: str, code: int = 2) -> SystemExit:
    """One line on stderr: what is wrong and what to do; exit 2 (bad input) or 3 (this environment)."""
    print(f"error: {line}", file=sys.stderr)
    return SystemExit(code)


def load(path: Path) -> Run:
    """The run in one bench/gpu.py results file, or exit 2 with one line naming what is wrong."""
    try:
        data = json.loads(path.read_text())
        facts, shapes = data["facts"], [_shape(r) for r in data["results"]]
    except OSError as e:
        raise _fail(f"cannot read {path}: {e.strerror} — name a file in bench/results/") from None
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise _fail(f"{path} is not a bench/gpu.py result ({type(e).__name__}: {e}) — name a "
                         "gpu_*.json file in bench/results/ that has both warm and cold restores") from None
    if not shapes:
        raise _fail(f"{path} holds no results — name another file in bench/results/")
    run = re.search(r"run(\d+)", path.name)
    title = (f"{facts.get('gpu', '?')} ({facts.get('memory', '?')}, driver {facts.get('driver', '?')}), "
             f"{'run ' + run.group(1) if run else path.stem}, recorded {_recorded_on(path)} ({path.name})")
    return Run(title, shapes)


def _speedup(cold: float, value: float) -> str:
    x = cold / value
    return f"{x:.0f}x faster" if x >= 10 else f"{x:.1f}x faster"


def _panel(ax: Any, shape: Shape) -> None:
    names = ["cold start", *shape.restores]
    values = [shape.cold_start_s, *(t for t, _ in shape.restores.values())]
    floors = [None, *(f for _, f in shape.restores.values())]
    bars = ax.bar([n.replace(", ", "\n") for n in names], values, color=[COLOURS[n] for n in names], width=0.6)
    for bar, value, floor in zip(bars, values, floors, strict=True):
        x = bar.get_x() + bar.get_width() / 2
        text = f"{value:.2f} s" if floor is None else (f"{value:.2f} s (floor {floor:.2f} s)\n"
                                                        f"{_speedup(shape.cold_start_s, value)}")
        ax.annotate(text, (x, value), xytext=(0, 3), textcoords="offset points", ha="center", va="bottom",
                    fontsize=8.5)
        if floor is not None:
            ax.hlines(floor, bar.get_x() - 0.05, bar.get_x() + bar.get_width() + 0.05, colors="black",
                      linestyles="--", linewidth=1.5, label="floor")
    ax.set_title(f"{shape.label} ({shape.weights_gb:.1f} GB of bf16 weights)", fontsize=10)
    ax.set_ylabel("seconds to first token")
    ax.set_ylim(0, shape.cold_start_s * 1.15)
    ax.tick_params(axis="x", labelsize=9)
    ax.spines[["top", "right"]].set_visible(False)
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles[:1], ["floor: the bytes to move / the rates measured"], loc="upper right", fontsize=8,
              frameon=False)


def plot(runs: list[Run], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = max(len(r.shapes) for r in runs)
    fig = plt.figure(figsize=(5.6 * cols, 4.6 * len(runs) + 0.6), layout="constrained")
    fig.suptitle("warmstart: cold start against restore, and the restore's floor", fontsize=13, fontweight="bold")
    for sub, run in zip(fig.subfigures(len(runs), 1, squeeze=False)[:, 0], runs, strict=True):
        sub.suptitle(run.title, fontsize=9.5, style="italic")
        for ax, shape in zip(sub.subplots(1, cols, squeeze=False)[0], [*run.shapes, *[None] * cols], strict=False):
            if shape is None:
                ax.set_visible(False)
            else:
                _panel(ax, shape)
    fig.supxlabel("Bars: time to first token of the reference worker (bench/gpu.py). Floor: the bytes the restore "
                  "must read and copy to the GPU, at the rates measured in the same run.", fontsize=8)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", type=Path, help="bench/gpu.py results files (bench/results/gpu_*.json)")
    ap.add_argument("-o", "--out", type=Path, default=REPO / "docs" / "benchmarks.png", help="the PNG to write")
    args = ap.parse_args(argv)
    runs = [load(p) for p in args.results]
    try:
        plot(runs, args.out)
    except ImportError:
        raise _fail("matplotlib is missing — .venv/bin/pip install -e '.[plot]'", 3) from None
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
