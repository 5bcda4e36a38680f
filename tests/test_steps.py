"""The step runner (pipeline/steps.py) on plain functions: order, timing, undo in reverse, settling, a failed
step's own undo, cancellation from another thread, and a full disk turned into one environment error."""

from __future__ import annotations

import errno
import threading

import pytest

from warmstart.errors import EnvironmentProblem, Interrupted
from warmstart.pipeline.steps import Cancel, Runner, Step, interruptible


def _steps(log: list[str], fail: str | None = None, **extra: object) -> list[Step]:
    def do(name: str) -> None:
        log.append(name)
        if name == fail:
            raise RuntimeError(name)

    names = ["a", "b", "c"]
    return [Step(n, n, lambda n=n: do(n), undo=lambda n=n: log.append(f"undo {n}"),  # type: ignore[misc]
                 **(extra if n == fail else {})) for n in names]  # type: ignore[arg-type]


def test_steps_run_in_order_and_are_timed() -> None:
    log: list[str] = []
    r = Runner("t")
    r.execute(_steps(log))
    assert log == ["a", "b", "c"] and [t.step for t in r.timings] == ["a", "b", "c"]


def test_a_failure_undoes_the_completed_steps_in_reverse() -> None:
    log: list[str] = []
    with pytest.raises(RuntimeError):
        Runner("t").execute(_steps(log, fail="c"))
    assert log == ["a", "b", "c", "undo b", "undo a"]


def test_a_step_marked_so_is_undone_when_it_fails_itself() -> None:
    log: list[str] = []
    with pytest.raises(RuntimeError):
        Runner("t").execute(_steps(log, fail="b", undo_if_failed=True))
    assert log == ["a", "b", "undo b", "undo a"]


def test_a_settling_step_drops_earlier_undos() -> None:
    log: list[str] = []
    steps = [Step("q", "q", lambda: log.append("q"), undo=lambda: log.append("undo q")),
             Step("r", "r", lambda: log.append("r"), settles=("q",)),
             Step("x", "x", lambda: (_ for _ in ()).throw(RuntimeError("x")))]
    with pytest.raises(RuntimeError):
        Runner("t").execute(steps)
    assert log == ["q", "r"]


def test_a_cancel_from_another_thread_stops_at_the_next_step() -> None:
    log: list[str] = []
    cancel = Cancel()
    steps = [Step("a", "a", lambda: log.append("a"), undo=lambda: log.append("undo a")),
             Step("b", "b", lambda: threading.Thread(target=cancel.set, args=("the test",)).start() or log.append("b")),
             Step("c", "c", lambda: log.append("c"))]
    with pytest.raises(Interrupted, match="t interrupted by the test"), interruptible(cancel):
        Runner("t", cancel=cancel).execute(steps)
    assert log == ["a", "b", "undo a"]


def test_signals_are_left_alone_off_the_main_thread() -> None:
    errors: list[BaseException] = []

    def body() -> None:
        try:
            with interruptible(Cancel()):
                pass
        except BaseException as e:  # noqa: BLE001 - signal.signal raises ValueError off the main thread
            errors.append(e)

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert errors == []


def test_a_full_disk_is_an_environment_error_naming_the_step_and_file() -> None:
    def full() -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "/ckpt/manifest.json")

    with pytest.raises(EnvironmentProblem, match="commit failed: no space left writing /ckpt/manifest.json"):
        Runner("t").execute([Step("commit", "writing", full)])
    with pytest.raises(PermissionError):  # other OSErrors are left as they are
        Runner("t").execute([Step("x", "x", lambda: (_ for _ in ()).throw(PermissionError(13, "no")))])
