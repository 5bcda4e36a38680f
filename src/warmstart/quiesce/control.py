"""The host side of the quiesce/resume protocol (see warmstart.worker.protocol)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from warmstart import procs
from warmstart.errors import QuiesceTimeout, WorkerError
from warmstart.worker import protocol as p


@dataclass(frozen=True)
class WorkerInfo:
    pid: int
    engine: str
    model: str | None
    port: int | None


def worker_info(control_dir: Path, pid: int | None = None) -> WorkerInfo | None:
    """The worker's announcement, if it joined the protocol (and is the process we think it is)."""
    data = p.read_json(control_dir / p.WORKER)
    if not data or (pid is not None and data.get("pid") != pid):
        return None
    return WorkerInfo(pid=int(data["pid"]), engine=str(data.get("engine", "custom")),
                      model=data.get("model"), port=data.get("port"))


def last_seq(control_dir: Path) -> int:
    req = p.read_json(control_dir / p.REQUEST)
    return int(req["seq"]) if req else 0


def send(control_dir: Path, seq: int, op: str, settings: dict[str, Any] | None = None) -> None:
    p.write_json(control_dir / p.REQUEST, {"seq": seq, "op": op, "settings": settings or {}})


def wait_ack(control_dir: Path, seq: int, timeout_s: float, pid: int | None, what: str) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        ack = p.read_json(control_dir / p.ACK)
        if ack and ack.get("seq") == seq:
            if not ack.get("ok"):
                raise WorkerError(f"worker failed to {what}: {ack.get('error')}", "see the worker's log")
            return ack
        if pid is not None and not procs.alive(pid):
            raise WorkerError(f"worker (pid {pid}) died while asked to {what}", "see the worker's log")
        if time.monotonic() > deadline:
            raise QuiesceTimeout(
                f"worker did not acknowledge '{what}' within {timeout_s:g} s",
                "check the worker is healthy (its log), or raise --timeout",
            )
        time.sleep(0.002)
