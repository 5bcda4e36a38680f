"""The worker a checkpoint takes: everything known about it, and every refusal, before anything changes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from warmstart import linux, procs, registry
from warmstart.artifact.manifest import WorkerIdentity
from warmstart.criu import binary as criu
from warmstart.criu import shm
from warmstart.errors import WorkerError
from warmstart.gpu import processes as gpu
from warmstart.pipeline.steps import Progress
from warmstart.quiesce import control, engines
from warmstart.quiesce.base import Quiescer
from warmstart.quiesce.engine import EngineQuiescer
from warmstart.quiesce.http import Engine
from warmstart.quiesce.sdk import SdkQuiescer
from warmstart.registry import WorkerRecord


@dataclass
class Source:
    pid: int
    criu: criu.Criu
    identity: WorkerIdentity
    quiescer: Quiescer | None
    inner: int  # its pid in its own pid namespace: the one CRIU dumps
    enter: int | None  # a container's process is dumped by a CRIU inside its namespaces (entered through pid)
    shm_root: Path  # its /dev/shm, as seen from here
    shm_use: shm.ShmUse
    cuda_pids: list[int]
    record: WorkerRecord | None

    @property
    def in_own_mounts(self) -> bool:
        return os.readlink(f"/proc/{self.pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt")


def _log_path_of(pid: int) -> str | None:
    try:
        target = os.readlink(f"/proc/{pid}/fd/1")
    except OSError:
        return None
    return target if target.startswith("/") and os.path.isfile(target) else None


def _refuse_io_uring(pid: int) -> None:
    uring = procs.io_uring_fds(pid)
    if uring:
        holder, fd = uring[0]
        raise WorkerError(
            f"process {holder} holds an io_uring instance (fd {fd}), which CRIU cannot dump",
            "start the worker with `warmstart run` (it refuses io_uring to the worker) "
            "or set sysctl kernel.io_uring_disabled=2 before starting it",
        )


def _identity(pid: int, record: WorkerRecord | None, control_dir: Path | None,
              info: control.WorkerInfo | None, engine: str | None) -> WorkerIdentity:
    return WorkerIdentity(
        pid=pid,
        command=procs.cmdline(pid),
        cwd=os.readlink(f"/proc/{pid}/cwd"),
        name=record.name if record else None,
        engine=info.engine if info else (record.engine if record else engine or "plain"),
        model=info.model if info else None,
        sdk=info is not None,
        control_dir=str(control_dir) if control_dir else None,
        log_path=record.log if record else _log_path_of(pid),
        port=info.port if info else None,
    )


def _check_engine(pid: int, adapter: Engine, identity: WorkerIdentity, record: WorkerRecord | None,
                  progress: Progress) -> int:
    """An engine that is not serving yet is refused while it is exactly as it was. Returns its port."""
    port = record.port if record and record.port else adapter.port(identity.command)
    identity.port = port
    progress(f"checking {adapter.name} is warm on port {port}")
    linux.in_network_of(pid, lambda: adapter.check_warm(port))
    identity.model = linux.in_network_of(pid, lambda: adapter.model(port))
    identity.private_dirs = adapter.private_dirs(procs.environ(pid))
    return port


def inspect(pid: int, record: WorkerRecord | None, engine: str | None, quiesce: bool, timeout_s: float,
            progress: Progress) -> Source:
    procs.require_alive(pid)
    binary = criu.find()
    _refuse_io_uring(pid)
    # The control directory comes from this tool's own record, never from the process's environment: the
    # process could name any directory there, and root writes into it.
    record = record or registry.by_pid(pid)
    control_dir = Path(record.control_dir) if record else None
    info = control.worker_info(control_dir, pid) if control_dir else None
    identity = _identity(pid, record, control_dir, info, engine)
    cuda_pids = gpu.cuda_pids(pid)
    quiescer: Quiescer | None = None
    adapter = None if info else engines.for_engine(identity.engine)
    if info and control_dir:
        if quiesce:
            quiescer = SdkQuiescer(control_dir, pid, timeout_s)
        else:
            identity.control_seq = control.last_seq(control_dir)  # the restore's resume must come after it
    elif adapter:
        port = _check_engine(pid, adapter, identity, record, progress)
        quiescer = EngineQuiescer(adapter, pid, port, identity.command, bool(cuda_pids), timeout_s)
    inner = procs.nspid(pid)[-1]
    enter = pid if inner != pid else None
    return Source(pid=pid, criu=binary, identity=identity, quiescer=quiescer, inner=inner, enter=enter,
                  shm_root=Path(f"/proc/{pid}/root/dev/shm") if enter else shm.SHM,
                  shm_use=shm.used_by(procs.tree(pid)), cuda_pids=cuda_pids, record=record)
