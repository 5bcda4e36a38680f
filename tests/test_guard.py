"""The benchmarks' regression guard (bench/guard.py): pure logic over recorded lines."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import guard  # noqa: E402


def test_the_last_recorded_line_of_a_benchmark_is_the_baseline(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text("\n".join([guard.record_line("vllm_cpu", {"checkpoint_s": 9.0}), "text",
                              guard.record_line("gpu_1b", {"checkpoint_s": 1.0}),
                              guard.record_line("vllm_cpu", {"checkpoint_s": 4.0, "steps.seal": 1.0})]))
    assert guard.last_recorded("vllm_cpu", doc) == {"checkpoint_s": 4.0, "steps.seal": 1.0}
    assert guard.last_recorded("sglang", doc) is None


def test_only_what_got_slower_by_both_bounds_is_named() -> None:
    before = {"checkpoint_s": 4.0, "steps.seal": 1.0, "restore.first_completion_s": 0.5, "gone": 1.0}
    now = {"checkpoint_s": 5.0, "steps.seal": 1.05, "restore.first_completion_s": 0.55, "new": 9.0}
    assert guard.check(now, before) == ["slower: checkpoint_s 4.00 s -> 5.00 s (+1.00 s, +25%)"]


def test_nested_results_flatten_to_named_figures() -> None:
    assert guard.flat("steps", {"dump": 1, "inner": {"x": 2.5}, "ok": True, "name": "n"}) == \
        {"steps.dump": 1.0, "steps.inner.x": 2.5}
