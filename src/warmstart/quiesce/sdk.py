"""Quiescing a worker that uses the SDK (warmstart.worker): requests through its control directory."""

from __future__ import annotations

from pathlib import Path

from warmstart.errors import WorkerError
from warmstart.quiesce import control
from warmstart.quiesce.base import QuiesceReport
from warmstart.worker import protocol


def saved_settings(saved: Path | None) -> dict[str, str]:
    return {protocol.SAVED_DIR: str(saved)} if saved else {}


class SdkQuiescer:
    name = "worker"
    saves_files = True

    def __init__(self, control_dir: Path, pid: int, timeout_s: float) -> None:
        self.control_dir, self.pid, self.timeout_s = control_dir, pid, timeout_s
        self.seq = 0
        self.saved: Path | None = None

    def quiesce(self, saved: Path | None) -> QuiesceReport:
        self.saved = saved
        self.seq = control.last_seq(self.control_dir) + 1
        control.send(self.control_dir, self.seq, protocol.QUIESCE, saved_settings(saved))
        ack = control.wait_ack(self.control_dir, self.seq, self.timeout_s, self.pid, "quiesce")
        return QuiesceReport(control_seq=self.seq, gpu_bytes_to_remap=int(ack.get("gpu_bytes_to_remap") or 0),
                             weights=list(ack.get("weights") or []))

    def _kept(self) -> Path | None:
        return self.saved if self.saved and self.saved.is_dir() and any(self.saved.iterdir()) else None

    def resume(self) -> None:
        """The worker reads what it saved back from the staging directory, and acknowledges before anything
        there is moved."""
        settings = {"restored": False, **saved_settings(self._kept())}
        control.send(self.control_dir, self.seq + 1, protocol.RESUME, settings)
        control.wait_ack(self.control_dir, self.seq + 1, self.timeout_s, self.pid, "resume")

    def cancel(self) -> None:
        try:
            control.send(self.control_dir, self.seq + 1, protocol.CANCEL, saved_settings(self.saved))
            if self._kept():
                control.wait_ack(self.control_dir, self.seq + 1, self.timeout_s, self.pid, "resume")
        except (OSError, WorkerError):
            pass  # the worker is gone or failed to resume
