"""Managed workers and restored replicas, one JSON record each under the state directory."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from warmstart import paths, procs
from warmstart.errors import UsageError
from warmstart.worker import protocol

RECORD = "worker.json"


class WorkerRecord(BaseModel):
    name: str
    kind: Literal["run", "replica"]
    pid: int  # host pid of the worker's root process
    started: int  # its kernel start time, so a reused pid is never mistaken for it
    command: list[str]
    engine: str = "plain"
    log: str
    control_dir: str
    created: float = Field(default_factory=time.time)
    holder_pid: int | None = None  # replicas: pid 1 of the replica's namespaces (host pid)
    holder_started: int | None = None
    artifact: str | None = None
    replica: int | None = None
    port: int | None = None
    # replicas: the log and control directory as the worker itself names them (its source's, over which the
    # replica's own `log` and `control_dir` are bound), for a checkpoint of the replica to record
    worker_log: str | None = None
    worker_control_dir: str | None = None

    def alive(self) -> bool:
        return procs.alive(self.pid, self.started)

    def state(self) -> str:
        """running, exited, or quiesced: held by a checkpoint (or left so by one that died, until its lease runs
        out and the worker resumes by itself)."""
        if not self.alive():
            return "exited"
        d = Path(self.control_dir)
        req, ack = protocol.read_json(d / protocol.REQUEST), protocol.read_json(d / protocol.ACK)
        if not (ack and ack.get("op") == protocol.QUIESCE and ack.get("ok")):
            return "running"
        if req and int(req.get("seq", 0)) > int(ack.get("seq", 0)):
            return "quiesced (asked to resume)"
        lease = protocol.read_json(d / protocol.LEASE)
        if lease and float(lease.get("until", 0)) > time.time():
            return "quiesced"
        return "quiesced (its checkpoint is gone: resuming)"


def save(rec: WorkerRecord) -> None:
    d = paths.state_dir("workers", paths.check_name(rec.name))
    tmp = d / f".{RECORD}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, rec.model_dump_json(indent=2).encode())
    finally:
        os.close(fd)
    os.replace(tmp, d / RECORD)


def get(name: str) -> WorkerRecord:
    path = paths.worker_dir(name) / RECORD
    if not path.is_file():
        raise UsageError(f"no worker named {name!r}", "list workers with `warmstart ps`")
    return WorkerRecord.model_validate_json(path.read_text())


def all_records() -> list[WorkerRecord]:
    out: list[WorkerRecord] = []
    root = paths.workers_dir()
    if not root.is_dir():
        return out
    for d in sorted(root.iterdir()):
        try:
            out.append(WorkerRecord.model_validate_json((d / RECORD).read_text()))
        except (FileNotFoundError, ValueError):
            continue
    return out


def claim(name: str) -> None:
    """Make `name` usable for a new worker: free if unused or its worker is gone, else an error."""
    try:
        rec = get(name)
    except UsageError:
        shutil.rmtree(paths.worker_dir(name), ignore_errors=True)
        return
    if rec.alive():
        raise UsageError(f"a worker named {name!r} is running (pid {rec.pid})",
                         f"stop it with `warmstart stop {name}` or pick another --name")
    shutil.rmtree(paths.worker_dir(name), ignore_errors=True)


def remove(name: str) -> None:
    shutil.rmtree(paths.worker_dir(name), ignore_errors=True)


def stop(name: str, grace_s: float = 5.0) -> None:
    """Terminate a worker or replica (SIGTERM, then SIGKILL), its namespace holder with it, and forget it."""
    rec = get(name)
    procs.terminate(rec.pid, rec.started, grace_s=grace_s)
    if rec.holder_pid:
        procs.terminate(rec.holder_pid, rec.holder_started, grace_s=1.0)
    remove(name)


def forget(name: str) -> None:
    """Drop the record but keep the directory: a failed replica's logs explain the failure."""
    (paths.worker_dir(name) / RECORD).unlink(missing_ok=True)


def by_pid(pid: int) -> WorkerRecord | None:
    """The running worker this tool started or restored whose root process is pid."""
    return next((r for r in all_records() if r.pid == pid and r.alive()), None)


def free_name(base: str) -> str:
    names = {r.name for r in all_records() if r.alive()}
    if base not in names:
        return base
    i = 1
    while f"{base}-{i}" in names:
        i += 1
    return f"{base}-{i}"
