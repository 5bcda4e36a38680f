"""warmstart's public Python API, for orchestrators that embed it; the CLI, the demo and the agent use it too.

    from warmstart import Cancel, checkpoint, restore, run

    worker = run("llm", ["python", "-m", "warmstart.reference.server", "--port", "8000"], wait=True)
    done = checkpoint("llm", "/ckpt/llm", leave_running=True)
    replicas = restore("/ckpt/llm", replicas=2)

Every call may run on any thread; a `Cancel` passed in stops it at its next step, undoing what it started
(on the main thread SIGINT, SIGTERM and SIGHUP do the same). Failures are `warmstart.errors.WarmstartError`s,
each with the problem, the fix and an exit code (docs/api.md).
"""

from __future__ import annotations

import tempfile
from collections.abc import Collection
from os import PathLike
from pathlib import Path

from warmstart import registry
from warmstart.artifact import store
from warmstart.errors import Interrupted, UsageError
from warmstart.image import inflated
from warmstart.pipeline import checkpoint as checkpoint_pipeline
from warmstart.pipeline import lock
from warmstart.pipeline import restore as restore_pipeline
from warmstart.pipeline import run as run_pipeline
from warmstart.pipeline.checkpoint import CheckpointResult
from warmstart.pipeline.restore import ReplicaResult, RestoreResult
from warmstart.pipeline.steps import Cancel, Progress, interruptible, quiet
from warmstart.registry import WorkerRecord

__all__ = ["Cancel", "CheckpointResult", "Progress", "ReplicaResult", "RestoreResult", "WorkerRecord",
           "checkpoint", "gc", "restore", "restore_into", "run", "stop", "workers"]


def run(name: str | None, command: list[str], *, engine: str = "plain", wait: bool = False,
        timeout_s: float = 300.0) -> WorkerRecord:
    """Start a worker under management (in a shape CRIU can checkpoint); with `wait`, return once it is warm."""
    if not command:
        raise UsageError("no command to run", "pass it after --, e.g. `warmstart run -- python server.py`")
    default = engine if engine not in ("plain", "reference") else Path(command[0]).name.lower()
    rec = run_pipeline.start(name or registry.free_name(default), command, engine=engine)
    if wait:
        cancel = Cancel()
        try:
            with interruptible(cancel):  # SIGINT, SIGTERM and SIGHUP end the wait (on the main thread)
                info = run_pipeline.wait_ready(rec, timeout_s, cancel.checker("warmstart run --wait"))
        except (Interrupted, KeyboardInterrupt):
            registry.stop(rec.name, grace_s=2.0)  # interrupted: what was started is undone (errors.py, 130)
            raise
        if info.port and not rec.port:
            rec.port = info.port
            registry.save(rec)  # `warmstart ps` shows the port it learned
    return rec


def checkpoint(worker: str | int, out: str | PathLike[str], *, leave_running: bool = False,
               timeout_s: float = 30.0, quiesce: bool = True, engine: str | None = None,
               progress: Progress = quiet, cancel: Cancel | None = None,
               insecure_unsigned: bool = False, rootfs_exclude: Collection[str] = ()) -> CheckpointResult:
    """Checkpoint a managed worker (by name) or any process tree (by root pid) into the new directory `out`,
    signed with this host's key (insecure_unsigned: not signed). A worker in an overlay container takes what
    its container wrote over its image along, minus rootfs_exclude (and WARMSTART_ROOTFS_EXCLUDE)."""
    rec = registry.get(worker) if isinstance(worker, str) else None
    if rec and not rec.alive():
        raise UsageError(f"worker {worker!r} is not running", "start it again with `warmstart run`")
    pid = rec.pid if rec else int(worker)
    return checkpoint_pipeline.checkpoint(pid, Path(out), record=rec, leave_running=leave_running,
                                          quiesce_timeout_s=timeout_s, quiesce=quiesce, engine=engine,
                                          progress=progress, cancel=cancel, insecure_unsigned=insecure_unsigned,
                                          rootfs_exclude=rootfs_exclude)


def restore(artifact: str | PathLike[str], *, name: str | None = None, replicas: int = 1, port: int | None = None,
            timeout_s: float = 120.0, gpu: str | None = None, progress: Progress = quiet,
            cancel: Cancel | None = None, insecure_unsigned: bool = False,
            skip_gates: Collection[str] = (), detach_cache_copy: bool = False) -> RestoreResult:
    """Restore an artifact as `replicas` replicas, each in namespaces of its own, on host ports from `port`.
    The artifact must be signed by a key this host trusts, unless insecure_unsigned. skip_gates: pre-restore
    gates to bypass (warmstart.gates.GATES; experts only: the restored process may crash), each announced
    through `progress` as a warning line if it would have refused. detach_cache_copy: what the restore
    inflated goes into this node's image cache from a process of its own (for a caller about to exit)."""
    return restore_pipeline.restore(Path(artifact), name=name, replicas=replicas, port=port, timeout_s=timeout_s,
                                    gpu_device=gpu, progress=progress, cancel=cancel,
                                    insecure_unsigned=insecure_unsigned, skip_gates=skip_gates,
                                    detach_cache_copy=detach_cache_copy)


def restore_into(artifact: str | PathLike[str], target: int, *, name: str | None = None, timeout_s: float = 120.0,
                 gpu: str | None = None, progress: Progress = quiet, cancel: Cancel | None = None,
                 insecure_unsigned: bool = False, skip_gates: Collection[str] = ()) -> RestoreResult:
    """Restore one replica into the namespaces of the running process `target` (a placeholder container's)."""
    return restore_pipeline.restore_into(Path(artifact), target, name=name, timeout_s=timeout_s, gpu_device=gpu,
                                         progress=progress, cancel=cancel, insecure_unsigned=insecure_unsigned,
                                         skip_gates=skip_gates)


def stop(name: str, grace_s: float = 5.0) -> None:
    """Stop a worker or replica (SIGTERM, then SIGKILL after grace_s) and forget it."""
    registry.stop(name, grace_s=grace_s)


def gc() -> list[Path]:
    """Remove what killed checkpoints and restores left behind (staging directories, inflated images, lock
    files of processes that are gone); returns what was removed. Checkpoints and restores do it too."""
    removed = store.remove_stale_partials()
    for where in {Path("/dev/shm"), Path(tempfile.gettempdir())}:
        removed += inflated.remove_stale(where)
    lock.remove_stale()
    return removed


def workers() -> list[WorkerRecord]:
    """The managed workers and restored replicas, running or exited."""
    return registry.all_records()
