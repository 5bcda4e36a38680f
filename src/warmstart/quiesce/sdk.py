"""Quiescing a worker that uses the SDK (warmstart.worker): requests through its control directory."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from warmstart.errors import WorkerError
from warmstart.quiesce import control
from warmstart.quiesce.base import QuiesceReport
from warmstart.worker import protocol


def saved_settings(saved: Path | None) -> dict[str, str]:
    return {protocol.SAVED_DIR: str(saved)} if saved else {}


class Lease:
    """Renews the worker's quiesce lease (protocol.LEASE) from a thread while the checkpoint lives: if this
    process dies, the worker resumes by itself within LEASE_S seconds."""

    def __init__(self, control_dir: Path) -> None:
        self.path = control_dir / protocol.LEASE
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _renew(self) -> bool:
        try:
            protocol.write_json(self.path, {"until": time.time() + protocol.LEASE_S, "pid": os.getpid()})
            return True
        except OSError:
            return False  # the worker's directory is gone: nothing to hold

    def start(self) -> None:
        self._renew()

        def loop() -> None:
            while not self._stop.wait(protocol.LEASE_S / 5) and self._renew():
                pass

        self._thread = threading.Thread(target=loop, name="warmstart-lease", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self.path.unlink(missing_ok=True)


class SdkQuiescer:
    name = "worker"
    saves_files = True

    def __init__(self, control_dir: Path, pid: int, timeout_s: float) -> None:
        self.control_dir, self.pid, self.timeout_s = control_dir, pid, timeout_s
        self.seq = 0
        self.saved: Path | None = None
        self.lease = Lease(control_dir)

    def quiesce(self, saved: Path | None) -> QuiesceReport:
        self.saved = saved
        self.lease.start()
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
        try:
            control.wait_ack(self.control_dir, self.seq + 1, self.timeout_s, self.pid, "resume")
        finally:
            self.lease.stop()

    def release(self) -> None:
        self.lease.stop()

    def cancel(self) -> None:
        self.lease.stop()
        try:
            control.send(self.control_dir, self.seq + 1, protocol.CANCEL, saved_settings(self.saved))
            if self._kept():
                control.wait_ack(self.control_dir, self.seq + 1, self.timeout_s, self.pid, "resume")
        except (OSError, WorkerError):
            pass  # the worker is gone or failed to resume
