"""The restore pipeline, as the list of its steps; pipeline/restore_job.py and pipeline/replicas.py do them.

verify (manifest, host, GPU plan, checksums: every refusal) ─► claim (names, ports) ─► [a container's rootfs
diff, into a placeholder] ─► inflate ─► CRIU restore (each replica) ─► bring up (CUDA restore, weights, resume:
replicas side by side)

Replicas restore concurrently, each into its own pid, mount and network namespaces reachable on its own host
port (`restore`), or one into a running process's namespaces (`restore_into`). If anything fails or the call
is interrupted, every replica it started is killed and its names released.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from warmstart import gates
from warmstart.errors import UsageError
from warmstart.pipeline.replicas import FreshReplicas, IntoProcess
from warmstart.pipeline.restore_job import KEEP_THREAD, ReplicaResult, RestoreJob, RestoreResult
from warmstart.pipeline.steps import Cancel, Progress, Runner, Step, interruptible, quiet
from warmstart.replica import joinns

__all__ = ["KEEP_THREAD", "ReplicaResult", "RestoreResult", "restore", "restore_into"]


def _run(job: RestoreJob, where: FreshReplicas | IntoProcess) -> RestoreResult:
    runner = Runner("restore", job.progress, job.cancel)
    brought: list[ReplicaResult] = []
    try:
        with interruptible(runner.cancel):
            runner.execute([
                Step("verify", "checking the artifact against this host", job.check, undo=job.stop_reading),
                Step("claim", "claiming names and ports", where.claim, undo=where.release, undo_if_failed=True),
                Step("rootfs", "putting back what the container wrote", job.apply_rootfs),
                Step("inflate", "preparing the image", job.prepare_image, undo=job.drop_inflated),
                Step("criu_restore", "restoring (CRIU)", where.start, undo=where.kill, undo_if_failed=True),
                Step("bring_up", "bringing the replicas up", lambda: brought.extend(where.bring_up())),
            ])
    finally:
        job.finish()
        where.close()
    result = job.result(brought, runner.timings)
    if runner.cancel.is_set():  # too late to undo: the replicas serve, and the caller is told
        result.late_interrupt = runner.cancel.reason
    return result


def restore(artifact: Path, *, name: str | None = None, replicas: int = 1, port: int | None = None,
            timeout_s: float = 120.0, verify_cache: bool = True, gpu_device: str | None = None,
            progress: Progress = quiet, cancel: Cancel | None = None, insecure_unsigned: bool = False,
            skip_gates: Collection[str] = (), detach_cache_copy: bool = False) -> RestoreResult:
    """Restore `replicas` replicas of an artifact, each in namespaces of its own. detach_cache_copy: images
    inflated for it are copied into the raw-image cache by a process of their own, not a thread of this one
    (for a caller about to exit, which then need not wait for the copy)."""
    if replicas < 1:
        raise UsageError(f"--replicas must be at least 1, not {replicas}", "pass --replicas 1 or more")
    job = RestoreJob(artifact, gpu_device, replicas, verify_cache, timeout_s, progress, cancel=cancel or Cancel(),
                     insecure_unsigned=insecure_unsigned, skip_gates=gates.parse_skip(skip_gates),
                     detach_keep=detach_cache_copy)
    return _run(job, FreshReplicas(job, replicas, port, name))


def restore_into(artifact: Path, target: int, *, name: str | None = None, timeout_s: float = 120.0,
                 verify_cache: bool = True, gpu_device: str | None = None, progress: Progress = quiet,
                 cancel: Cancel | None = None, insecure_unsigned: bool = False,
                 skip_gates: Collection[str] = ()) -> RestoreResult:
    """Restore one replica into the namespaces of a running process (a pod's placeholder) instead of new ones."""
    skip = gates.parse_skip(skip_gates)
    joinns.check_target(target)
    job = RestoreJob(artifact, gpu_device, 1, verify_cache, timeout_s, progress, root=f"/proc/{target}/root",
                     cancel=cancel or Cancel(), insecure_unsigned=insecure_unsigned, skip_gates=skip)
    return _run(job, IntoProcess(job, target, name))
