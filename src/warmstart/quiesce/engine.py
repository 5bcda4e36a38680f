"""Quiescing an inference engine warmstart did not write, through its adapter's HTTP calls."""

from __future__ import annotations

from pathlib import Path

from warmstart import linux
from warmstart.errors import WorkerError
from warmstart.quiesce.base import QuiesceReport
from warmstart.quiesce.http import Engine, Quiesced


class EngineQuiescer:
    """Calls go to the engine's port in the worker's own network namespace (a container's engine answers on
    its own loopback)."""

    saves_files = False

    def __init__(self, adapter: Engine, pid: int, port: int, command: list[str], on_gpu: bool,
                 timeout_s: float) -> None:
        self.adapter, self.pid, self.port = adapter, pid, port
        self.command, self.on_gpu, self.timeout_s = command, on_gpu, timeout_s
        self.name = adapter.name
        self.done = Quiesced()

    def quiesce(self, saved: Path | None) -> QuiesceReport:
        self.done = linux.in_network_of(
            self.pid, lambda: self.adapter.quiesce(self.port, self.command, self.on_gpu, self.timeout_s))
        return QuiesceReport(kv_released=self.done.kv_released)

    def resume(self) -> None:
        linux.in_network_of(self.pid, lambda: self.adapter.resume(self.port, self.done, self.timeout_s))

    def release(self) -> None:
        pass

    def cancel(self) -> None:
        try:
            self.resume()
        except WorkerError:
            pass  # the engine died
