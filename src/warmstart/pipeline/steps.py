"""The step runner: a pipeline is an ordered list of named steps, each with its undo.

`Runner.execute` runs the steps in order, times each into `timings` (which the manifest and results carry),
and, on any failure or cancellation, runs the undo of every completed step in reverse before re-raising. A
step may *settle* earlier ones: once it has run, their undo is no longer wanted (the worker a checkpoint
resumed early needs no resume on failure).

Cancellation is a `Cancel` token: any thread may set it, and `interruptible` sets it on SIGINT, SIGTERM or
SIGHUP while a pipeline runs on the main thread (signal handlers can only be installed there; a caller that
runs pipelines in other threads, as the Kubernetes agent does, installs none and may pass its own token). The
runner checks it between steps and says at once that it is stopping; the long steps (the image passes,
checksums, inflating) check it every chunk. CRIU's dump is let finish: killing it while its parasite code is in
the worker can take the worker down.
"""

from __future__ import annotations

import errno
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from warmstart.artifact.manifest import StepTiming
from warmstart.errors import EnvironmentProblem, Interrupted

Progress = Callable[[str], None]


def quiet(_: str) -> None:
    pass


@dataclass(frozen=True)
class Step:
    name: str  # as recorded in timings: quiesce, cuda_checkpoint, criu_dump, ...
    label: str  # the progress line
    run: Callable[[], object]
    undo: Callable[[], None] | None = None
    when: bool = True  # a step that does not apply to this worker is skipped, and not timed
    settles: tuple[str, ...] = ()  # once this step has run, these steps' undo is dropped
    # Undo this step even when it fails: what it started may be half done (a quiesce request the worker may
    # still act on, the first of several replicas).
    undo_if_failed: bool = False


class Cancel:
    """Asks a running pipeline to stop, from any thread: at its next step boundary, or sooner inside a long step
    that calls `check` (the image passes check every chunk)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""
        self._listeners: list[Callable[[str], None]] = []

    def set(self, reason: str = "its caller") -> None:
        first = not self._event.is_set()
        self.reason = self.reason or reason
        self._event.set()
        for listen in self._listeners if first else []:
            listen(self.reason)

    def on_set(self, listen: Callable[[str], None]) -> None:
        self._listeners.append(listen)

    def checker(self, what: str) -> Callable[[], None]:
        """A callable for long loops: raises Interrupted once this is set."""
        return lambda: self.check(what)

    def is_set(self) -> bool:
        return self._event.is_set()

    def check(self, what: str) -> None:
        if self.is_set():
            raise Interrupted(f"{what} interrupted by {self.reason}", "what it had started was undone; run it again")


@dataclass
class Runner:
    what: str  # "checkpoint", "restore": names the pipeline in an interruption's message
    progress: Progress = quiet
    cancel: Cancel = field(default_factory=Cancel)
    timings: list[StepTiming] = field(default_factory=list)
    _undo: list[tuple[str, Callable[[], None]]] = field(default_factory=list)

    def execute(self, steps: Iterable[Step]) -> None:
        self.cancel.on_set(lambda why: self.progress(f"{why}: stopping the {self.what} and undoing what it started"))
        try:
            for step in steps:
                if step.when:
                    self.cancel.check(self.what)
                    self._run(step)
        except BaseException:
            self.unwind()
            raise

    def _run(self, step: Step) -> None:
        self.progress(step.label)
        t0 = time.monotonic()
        try:
            step.run()
        except OSError as e:
            self._keep_undo_of_failed(step)
            problem = _environment_error(step, e)
            if problem is None:
                raise
            raise problem from e
        except BaseException:
            self._keep_undo_of_failed(step)
            raise
        finally:
            self.timings.append(StepTiming(step=step.name, seconds=round(time.monotonic() - t0, 4)))
        if step.settles:
            self._undo = [(n, u) for n, u in self._undo if n not in step.settles]
        if step.undo:
            self._undo.append((step.name, step.undo))

    def _keep_undo_of_failed(self, step: Step) -> None:
        if step.undo and step.undo_if_failed:
            self._undo.append((step.name, step.undo))

    def unwind(self) -> None:
        """Undo the completed steps, newest first. An undo that fails does not stop the others: the step
        that failed first is what the caller reports."""
        while self._undo:
            _, undo = self._undo.pop()
            try:
                undo()
            except Exception as e:  # noqa: BLE001 - reported, then the next undo runs
                self.progress(f"warning: undoing a step failed: {e}")

    def seconds(self, name: str) -> float:
        return sum(t.seconds for t in self.timings if t.step == name)


_FULL = {errno.ENOSPC: "no space left", errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system"}


def _environment_error(step: Step, e: OSError) -> EnvironmentProblem | None:
    """A full or read-only disk is this host's problem, not a bug: one line naming the step, the file and the
    fix (exit 3). Any other OSError stays what it is."""
    if e.errno not in _FULL:
        return None
    where = f" writing {e.filename}" if e.filename else ""
    return EnvironmentProblem(f"{step.name} failed: {_FULL[e.errno]}{where}",
                              "free space there (or write the artifact to another disk with -o), then run it again")


@contextmanager
def interruptible(cancel: Cancel) -> Iterator[Cancel]:
    """SIGINT, SIGTERM and SIGHUP set `cancel` instead of raising mid-step, while the block runs on the main
    thread; elsewhere nothing is installed and the caller's own token is the only way to stop."""
    if threading.current_thread() is not threading.main_thread():
        yield cancel
        return
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.signal(s, lambda n, _f: cancel.set(signal.Signals(n).name)) for s in sigs}
    try:
        yield cancel
    finally:
        for s, h in old.items():
            signal.signal(s, h)
