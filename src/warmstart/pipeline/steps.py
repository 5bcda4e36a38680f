"""Timing and progress for pipeline steps, and deferring Ctrl-C until a step that must not be cut is done."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from warmstart.artifact.manifest import StepTiming
from warmstart.errors import WarmstartError

Progress = Callable[[str], None]


def quiet(_: str) -> None:
    pass


class Interrupted(WarmstartError):
    exit_code = 130


@dataclass
class Timer:
    progress: Progress = quiet
    steps: list[StepTiming] = field(default_factory=list)

    @contextmanager
    def step(self, name: str, label: str) -> Iterator[None]:
        self.progress(label)
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.steps.append(StepTiming(step=name, seconds=round(time.monotonic() - t0, 4)))

    def total(self) -> float:
        return sum(s.seconds for s in self.steps)


@contextmanager
def deferred_signals() -> Iterator[list[int]]:
    """Record SIGINT/SIGTERM/SIGHUP instead of acting on them; the caller checks the list between steps."""
    got: list[int] = []
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.signal(s, lambda n, _f: got.append(n)) for s in sigs}
    try:
        yield got
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def check_interrupted(got: list[int], what: str) -> None:
    if got:
        raise Interrupted(f"{what} interrupted by {signal.Signals(got[0]).name}", "nothing was written; run it again")
