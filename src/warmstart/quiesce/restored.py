"""A restored replica's resume, by the mechanism its source was quiesced with: an SDK worker acknowledges the
resume request that waits in its control directory; an engine answers health, then is woken; a plain process
accepts connections on its port."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from warmstart.artifact.manifest import WorkerIdentity
from warmstart.errors import WorkerError
from warmstart.quiesce import control, engines
from warmstart.quiesce.http import Quiesced
from warmstart.worker import protocol

InNet = Callable[[Callable[[], Any]], Any]  # runs a call in the network the replica's port is reached from


def request_resume(worker: WorkerIdentity, control_dir: Path, settings: dict[str, Any]) -> None:
    """For an SDK worker: the resume request, written before the process exists, so that the worker finds it
    on its first poll after the restore."""
    if worker.sdk:
        control.send(control_dir, worker.control_seq + 1, protocol.RESUME, settings)


def _wait_port(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.005)
    raise WorkerError(f"restored worker does not accept connections on port {port}", "see the replica's log")


def wait_serving(worker: WorkerIdentity, pid: int, control_dir: Path, port: int | None,
                 alive: Callable[[], bool], deadline: float, in_net: InNet) -> None:
    def left() -> float:
        return max(1.0, deadline - time.monotonic())

    adapter = None if worker.sdk else engines.for_engine(worker.engine)
    if worker.sdk:
        control.wait_ack(control_dir, worker.control_seq + 1, left(), pid, "resume")
    elif adapter and port:
        def wake() -> None:
            adapter.wait_healthy(port, left(), alive=alive)
            adapter.resume(port, Quiesced(kv_released=worker.kv_released), left())

        in_net(wake)
    elif port:
        in_net(lambda: _wait_port(port, deadline))
