"""The checkpoint pipeline, as the list of its steps. pipeline/checkpoint_job.py holds what each one does.

inspect (every refusal, nothing changed) ─► stage ─► quiesce ─► CUDA checkpoint ─► CRIU dump ─► [a container's
rootfs diff] ─► [resume the source] ─► zero pages ─► compress and encrypt ─► checksum ─► commit ─► [stop the source]

On any failure or interruption the completed steps are undone in reverse: the worker is resumed, its GPU
state restored, the staging directory removed, so a failed checkpoint leaves the worker serving as before.
With `leave_running` the worker serves again as soon as CRIU has its image; the image's transforms then run
on files alone.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from warmstart import config, procs
from warmstart.artifact import encryption, signing
from warmstart.artifact.manifest import Manifest
from warmstart.image import rootfs
from warmstart.pipeline import source as source_mod
from warmstart.pipeline.checkpoint_job import CheckpointJob, compress_on, encrypt_on, zero_pages_on
from warmstart.pipeline.lock import worker_lock
from warmstart.pipeline.steps import Cancel, Progress, Runner, Step, interruptible, quiet
from warmstart.registry import WorkerRecord


@dataclass(frozen=True)
class CheckpointResult:
    artifact: Path
    manifest: Manifest
    seconds: float
    paused_s: float | None = None  # with leave_running: from the quiesce (or dump) to the worker serving again


def checkpoint(pid: int, out: Path, *, record: WorkerRecord | None = None, leave_running: bool = False,
               quiesce_timeout_s: float = 30.0, quiesce: bool = True, engine: str | None = None,
               progress: Progress = quiet, cancel: Cancel | None = None,
               insecure_unsigned: bool = False, rootfs_exclude: Collection[str] = ()) -> CheckpointResult:
    """rootfs_exclude: container paths left out of what the worker's container wrote over its image."""
    procs.require_alive(pid)
    rootfs.check_exclude(rootfs_exclude)
    with worker_lock(pid):
        return _checkpoint(pid, out, record, leave_running, quiesce_timeout_s, quiesce, engine, progress,
                           cancel or Cancel(), insecure_unsigned, tuple(rootfs_exclude))


def _checkpoint(pid: int, out: Path, record: WorkerRecord | None, leave_running: bool, quiesce_timeout_s: float,
                quiesce: bool, engine: str | None, progress: Progress, cancel: Cancel,
                insecure_unsigned: bool, rootfs_exclude: tuple[str, ...]) -> CheckpointResult:
    t0 = time.monotonic()
    runner = Runner("checkpoint", progress, cancel)
    sign = not (insecure_unsigned or config.current().insecure_unsigned)
    if sign:
        signing.signing_key()  # made or checked before anything changes
    if encrypt_on():
        encryption.master_key()
    source = source_mod.inspect(pid, record, engine, quiesce, quiesce_timeout_s, progress)
    job = CheckpointJob(source, out, quiesce_timeout_s, progress, runner.timings, sign=sign,
                        stop=runner.cancel.checker("checkpoint"), rootfs_exclude=rootfs_exclude)
    q, gpu = source.quiescer, bool(source.cuda_pids)
    after_dump = ("quiesce", "cuda_checkpoint")  # the source serves again: nothing of it to undo any more
    with interruptible(runner.cancel):
        runner.execute([
            Step("stage", "staging the artifact", job.stage, undo=job.unstage),
            Step("quiesce", f"quiescing {q.name if q else ''}", job.quiesce, undo=job.cancel_quiesce, when=bool(q),
                 undo_if_failed=True),
            Step("record", "recording the process tree", job.record_tree),
            Step("cuda_checkpoint", f"checkpointing GPU state of {len(source.cuda_pids)} CUDA process(es)",
                 job.cuda_checkpoint, undo=job.cuda_undo, when=gpu),
            Step("working_set", "recording the pages of mapped files the worker uses", job.capture_working_set),
            Step("criu_dump", "dumping process tree (CRIU)", job.dump, undo=job.drop_begun),
            Step("rootfs", "recording what the container wrote over its image", job.capture_rootfs),
            Step("cuda_restore", "restoring GPU state of the source", job.resume_gpu,
                 when=leave_running and gpu, settles=after_dump),
            Step("resume", "resuming worker", job.resume_worker, when=leave_running, settles=after_dump),
            Step("zero_pages", "taking pages of zeros out of the image", job.drop_zero_pages, when=zero_pages_on()),
            Step("compress", "compressing the pages images", job.compress, when=compress_on() and not encrypt_on()),
            Step("seal", "encrypting the image" + (", compressed where it pays" if compress_on() else ""), job.seal,
                 when=encrypt_on()),
            Step("checksum", "checksumming images", job.checksum),
            Step("commit", "writing the manifest", job.commit),
        ])
    job.raise_resume_error()
    assert job.manifest is not None
    if not leave_running:
        job.stop_source()
    return CheckpointResult(job.stage_dir.final, job.manifest, time.monotonic() - t0, job.paused_s)
