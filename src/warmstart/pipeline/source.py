"""The worker a checkpoint takes: everything known about it, and every refusal, before anything changes."""

from __future__ import annotations

import os
import time
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


def _seen_by_worker(pid: int, record: WorkerRecord | None, control_dir: Path | None) -> tuple[str | None, str | None]:
    """(log, control directory) as the worker names them: a replica's are its source's, with its own bound over."""
    if record and record.kind == "replica":
        return record.worker_log or record.log, record.worker_control_dir or record.control_dir
    return (record.log if record else _log_path_of(pid)), (str(control_dir) if control_dir else None)


def _identity(pid: int, record: WorkerRecord | None, control_dir: Path | None,
              info: control.WorkerInfo | None, engine: str | None) -> WorkerIdentity:
    log, control_seen = _seen_by_worker(pid, record, control_dir)
    return WorkerIdentity(
        pid=pid,
        command=procs.cmdline(pid),
        cwd=os.readlink(f"/proc/{pid}/cwd"),
        name=record.name if record else None,
        engine=info.engine if info else (record.engine if record else engine or "plain"),
        model=info.model if info else None,
        sdk=info is not None,
        control_dir=control_seen,
        log_path=log,
        port=info.port if info else None,
    )


def _check_engine(pid: int, adapter: Engine, identity: WorkerIdentity, record: WorkerRecord | None,
                  progress: Progress) -> int:
    """An engine that is not serving yet is refused while it is exactly as it was. Returns its port: the one it
    listens on in its own network namespace (a replica's record holds the host port forwarded to it)."""
    port = record.port if record and record.port and record.kind == "run" else adapter.port(identity.command)
    identity.port = port
    progress(f"checking {adapter.name} is warm on port {port}")
    linux.in_network_of(pid, lambda: adapter.check_warm(port))
    identity.model = linux.in_network_of(pid, lambda: adapter.model(port))
    identity.private_dirs = adapter.private_dirs(procs.environ(pid))
    return port


_ATTACH_GRACE_S = 1.0


def _wait_warm(pid: int, record: WorkerRecord | None, control_dir: Path, timeout_s: float,
               progress: Progress) -> control.WorkerInfo | None:
    """A worker this tool started that has neither joined the SDK nor opened a listening port may still be
    starting: wait for one of them (up to timeout_s), so that its artifact does not restore into a replica
    nobody can reach. One that shows neither is checkpointed as it is, with a warning."""
    info = control.worker_info(control_dir, pid)
    if info or not record or record.kind != "run" or engines.for_engine(record.engine):
        return info  # an engine is checked by its adapter instead
    deadline = time.monotonic() + timeout_s
    waited = False
    while not procs.listening_tcp_ports(pid):
        info = control.worker_info(control_dir, pid)
        if info:
            return info
        if time.monotonic() > deadline:
            progress(f"warning: worker {record.name} has not joined the SDK nor opened a listening port after "
                     f"{timeout_s:g} s; checkpointing it as a plain process")
            return None
        if not waited:
            progress(f"waiting for worker {record.name} to be warm (SDK or a listening port)")
            waited = True
        procs.require_alive(pid)
        time.sleep(0.05)
    # It listens: an SDK worker attaches right after binding its port (the reference server does), so it gets
    # a moment to do so before it is taken for a plain process.
    grace = time.monotonic() + _ATTACH_GRACE_S
    while (info := control.worker_info(control_dir, pid)) is None and time.monotonic() < grace:
        time.sleep(0.02)
    return info


def inspect(pid: int, record: WorkerRecord | None, engine: str | None, quiesce: bool, timeout_s: float,
            progress: Progress) -> Source:
    procs.require_alive(pid)
    binary = criu.find()
    _refuse_io_uring(pid)
    # The control directory comes from this tool's own record, never from the process's environment: the
    # process could name any directory there, and root writes into it.
    record = record or registry.by_pid(pid)
    control_dir = Path(record.control_dir) if record else None
    info = _wait_warm(pid, record, control_dir, timeout_s, progress) if control_dir else None
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
