"""The checkpoint pipeline: quiesce -> (CUDA lock + checkpoint) -> CRIU dump (+ /dev/shm) -> artifact.

Quiesce goes through the SDK's control directory, or, for an engine started with `--engine`, through its
adapter's HTTP calls (which first check the engine is warm). Any failure or interruption unwinds: the staged
directory is removed and the worker is resumed, so a failed checkpoint leaves the worker running as before.
With `leave_running`, the worker is resumed as soon as CRIU has its image: taking zero pages out, compressing
and checksumming work on the image files alone, and took most of an 8B worker's checkpoint.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

from warmstart import __version__, host, paths, procs, registry
from warmstart.quiesce import engines
from warmstart.artifact import store
from warmstart.artifact.manifest import IMAGES_DIR, SAVED_DIR, SHM_DIR, CriuSettings, Manifest, WeightsRef, WorkerIdentity
from warmstart.quiesce import control
from warmstart.criu import binary as criu
from warmstart.gpu import processes as gpu
from warmstart.image import cache, codec, inflated
from warmstart.replica import joinns
from warmstart.criu import shm
from warmstart.image import workingset
from warmstart.image import zeropages
from warmstart.quiesce.http import Engine, Quiesced
from warmstart.pipeline.steps import Progress, Timer, check_interrupted, deferred_signals, quiet
from warmstart.errors import WarmstartError, WorkerError
from warmstart.registry import WorkerRecord
from warmstart.worker import protocol


T = TypeVar("T")


@dataclass(frozen=True)
class CheckpointResult:
    artifact: Path
    manifest: Manifest
    seconds: float
    paused_s: float | None = None  # with leave_running: from the quiesce (or dump) to the worker serving again


def _control_dir_of(pid: int) -> Path | None:
    """A worker's control directory, from its environment (works for workers not started by us too)."""
    value = procs.environ(pid).get(protocol.ENV_CONTROL_DIR)
    return Path(value) if value else None


def _log_path_of(pid: int) -> str | None:
    try:
        target = os.readlink(f"/proc/{pid}/fd/1")
    except OSError:
        return None
    return target if target.startswith("/") and os.path.isfile(target) else None


def checkpoint(
    pid: int,
    out: Path,
    *,
    record: WorkerRecord | None = None,
    leave_running: bool = False,
    quiesce_timeout_s: float = 30.0,
    quiesce: bool = True,
    engine: str | None = None,
    progress: Progress = quiet,
) -> CheckpointResult:
    t_start = time.monotonic()
    procs.require_alive(pid)
    binary = criu.find()
    uring = procs.io_uring_fds(pid)
    if uring:
        holder, fd = uring[0]
        raise WorkerError(
            f"process {holder} holds an io_uring instance (fd {fd}), which CRIU cannot dump",
            "start the worker with `warmstart run` (it refuses io_uring to the worker) "
            "or set sysctl kernel.io_uring_disabled=2 before starting it",
        )
    control_dir = Path(record.control_dir) if record else _control_dir_of(pid)
    info = control.worker_info(control_dir, pid) if control_dir else None
    identity = WorkerIdentity(
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
    adapter = None if info else engines.for_engine(identity.engine)
    if adapter:
        # Refuse before anything changes: an engine that is not serving yet stays exactly as it was.
        port = identity.port = record.port if record and record.port else adapter.port(identity.command)
        progress(f"checking {adapter.name} is warm on port {identity.port}")
        in_net(pid, lambda: adapter.check_warm(port))
        identity.model = in_net(pid, lambda: adapter.model(port))
        identity.private_dirs = adapter.private_dirs(procs.environ(pid))
    tree = procs.tree(pid)
    # A process in a pid namespace of its own (a container's) is dumped by a CRIU running inside its pid and
    # mount namespaces, under its pid there; its /dev/shm is reached through /proc/<pid>/root.
    inner = procs.nspid(pid)[-1]
    enter = pid if inner != pid else None
    shm_root = Path(f"/proc/{pid}/root/dev/shm") if enter else shm.SHM
    shm_use = shm.used_by(tree)
    cuda_pids = gpu.cuda_pids(pid)
    timer = Timer(progress)
    staging = store.stage(out)
    # Outside the staging directory, so it survives a failed dump (the error names it).
    log = paths.home() / "logs" / f"dump-{pid}-{int(time.time())}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    quiesced_seq = 0
    saved: Path | None = None
    engine_paused: Quiesced | None = None
    gpu_states: list = []
    hook_env: dict[str, str] = {}
    resumed = False  # the source serves again (leave_running): nothing of it to unwind any more
    resume_error: Exception | None = None
    paused_s: float | None = None
    try:
        with deferred_signals() as got:
            t_pause = time.monotonic()
            if info and control_dir and not quiesce:
                identity.control_seq = control.last_seq(control_dir)  # the restore's resume must come after it
            elif info and control_dir:
                saved = _saved_dir(staging, pid)
                quiesced_seq = control.last_seq(control_dir) + 1
                with timer.step("quiesce", "quiescing worker"):
                    control.send(control_dir, quiesced_seq, protocol.QUIESCE, _saved_settings(saved))
                    ack = control.wait_ack(control_dir, quiesced_seq, quiesce_timeout_s, pid, "quiesce")
                identity.control_seq = quiesced_seq
                identity.gpu_bytes_to_remap = int(ack.get("gpu_bytes_to_remap") or 0)
                identity.weights = [WeightsRef(**w) for w in ack.get("weights") or []]
            elif adapter and identity.port:
                with timer.step("quiesce", f"quiescing {adapter.name}"):
                    engine_paused = in_net(pid, lambda: adapter.quiesce(port, identity.command, bool(cuda_pids),
                                                                        quiesce_timeout_s))
                identity.kv_released = engine_paused.kv_released
            check_interrupted(got, "checkpoint")
            identity.listen_ports = procs.listening_tcp_ports(pid)
            identity.ids = procs.inner_ids(procs.tree(pid))
            if cuda_pids:
                gpu_states = gpu.describe(cuda_pids)
                with timer.step("cuda_checkpoint", f"checkpointing GPU state of {len(cuda_pids)} CUDA process(es)"):
                    gpu.suspend(cuda_pids, int(quiesce_timeout_s * 1000))
            with timer.step("working_set", "recording the pages of mapped files the worker uses"):
                working_set = workingset.capture(procs.tree(pid))
            script = staging.tmp / "shm-hook.sh" if shm_use else None
            if script:
                hook_env = shm.hook(shm_use, staging.tmp / SHM_DIR, script, shm_root)
            with timer.step("criu_dump", "dumping process tree (CRIU)"):
                criu.run(binary, criu.dump_args(inner, staging.images, log, str(script) if script else None), log,
                         "dump", env=hook_env, enter=enter)
            os.replace(log, staging.tmp / "dump.log")
            if hook_env:
                shm.remove_remaps(shm.created_remaps(hook_env, shm_root), shm_root)
                hook_env = {}
            if leave_running:
                resumed = True
                try:
                    _resume_source(timer, pid, cuda_pids, control_dir if quiesced_seq else None, quiesced_seq + 1,
                                   saved, adapter if engine_paused else None, identity.port, engine_paused,
                                   quiesce_timeout_s)
                except Exception as e:  # noqa: BLE001 - the artifact is whole: finish it, then report this
                    resume_error = e
                paused_s = time.monotonic() - t_pause
            zero_bytes = 0
            if os.environ.get("WARMSTART_ZERO_PAGES", "1") != "0":
                with timer.step("zero_pages", "taking pages of zeros out of the image"):
                    try:
                        zero_bytes = zeropages.drop(staging.images)
                    except zeropages.ImageError as e:
                        progress(f"warning: pages of zeros stay in the image ({e})")
            packed = (0, 0)
            if os.environ.get("WARMSTART_COMPRESS", "1") != "0":
                with timer.step("compress", "compressing the pages images"):
                    packed = codec.compress(staging.images, os.cpu_count() or 1, progress, keep=staging.tmp / "raw")
            if saved and not any(saved.iterdir()):
                saved.rmdir()  # the worker saved nothing there
            if script:
                script.unlink()
            check_interrupted(got, "checkpoint")
            manifest = Manifest(
                warmstart_version=__version__,
                worker=identity,
                host=host.current(binary.version),
                criu=CriuSettings(version=binary.version, dump_args=criu.dump_args(pid, Path("IMAGES"), Path("LOG"))),
                gpus=gpu_states,
                working_set=working_set,
                zero_bytes_dropped=zero_bytes,
                compressed_raw_bytes=packed[0],
                compressed_bytes=packed[1],
                **_gpu_versions(cuda_pids),
            )
            with timer.step("checksum", "checksumming images"):
                manifest.files = store.checksum(staging)
            _cache_raw_images(staging.tmp / "raw", manifest)
            manifest.image_bytes = store.stored_bytes(staging.tmp, manifest.files)
            manifest.steps = list(timer.steps)
            store.commit(staging, manifest)
            store.remember_verified(staging.final, manifest)
    except BaseException:
        if cuda_pids and not resumed and _gpu_state_is(cuda_pids[0], "checkpointed"):
            gpu.resume(cuda_pids)
        if quiesced_seq and control_dir and not resumed:
            # Before the staging directory goes: the worker reads what it saved back from it.
            _resume_quietly(control_dir, quiesced_seq + 1, saved, pid, quiesce_timeout_s)
        store.discard(staging)
        if adapter and engine_paused and identity.port and not resumed:
            _resume_engine_quietly(pid, adapter, identity.port, engine_paused, quiesce_timeout_s)
        raise
    finally:
        if hook_env:
            shm.remove_remaps(shm.created_remaps(hook_env, shm_root), shm_root)
    if resume_error:
        problem = f"the checkpoint {staging.final} is complete, but its source worker did not resume: "
        if isinstance(resume_error, WarmstartError):
            raise type(resume_error)(problem + resume_error.problem, resume_error.fix) from resume_error
        raise WorkerError(problem + str(resume_error), "see the worker's log") from resume_error
    if not leave_running:
        procs.terminate(pid, procs.start_time(pid), grace_s=2.0)
        if record:
            registry.remove(record.name)
    return CheckpointResult(staging.final, manifest, time.monotonic() - t_start, paused_s)


def _resume_source(timer: Timer, pid: int, cuda_pids: list[int], control_dir: Path | None, seq: int,
                   saved: Path | None, adapter: Engine | None, port: int | None, paused: Quiesced | None,
                   timeout_s: float) -> None:
    """The checkpointed worker serves again (leave_running), once CRIU has its image. An SDK worker reads what it
    saved back from the staging directory, and acknowledges before anything there is moved."""
    if cuda_pids:
        with timer.step("cuda_restore", "restoring GPU state of the source"):
            gpu.resume(cuda_pids)
    if control_dir:
        with timer.step("resume", "resuming worker"):
            kept = saved if saved and any(saved.iterdir()) else None
            control.send(control_dir, seq, protocol.RESUME, {"restored": False, **_saved_settings(kept)})
            control.wait_ack(control_dir, seq, timeout_s, pid, "resume")
    if adapter and paused and port:
        with timer.step("resume", f"resuming {adapter.name}"):
            in_net(pid, lambda: adapter.resume(port, paused, timeout_s))


def _cache_raw_images(raw: Path, manifest: Manifest) -> None:
    """The raw images of those compressed go to the image cache, keyed by the compressed files' checksums: this
    node restores the artifact without inflating them while they are in its page cache."""
    if not raw.is_dir():
        return
    keys = {f.path: f.sha256 for f in manifest.files}
    for p in raw.iterdir():
        key = keys.get(f"{IMAGES_DIR}/{p.name}{codec.SUFFIX}")
        if key:
            cache.cache_raw(p, key)
    shutil.rmtree(raw, ignore_errors=True)


def _gpu_versions(cuda_pids: list[int]) -> dict[str, str | None]:
    """The manifest's driver_version and cuda_version; none for a CPU worker."""
    if not cuda_pids:
        return {}
    from warmstart.gpu import driver as cuda

    return {"driver_version": cuda.driver_version(), "cuda_version": cuda.cuda_version()}


def _gpu_state_is(pid: int, want: str) -> bool:
    from warmstart.gpu import driver as cuda

    return cuda.state_name(pid) == want


def in_net(pid: int, fn: Callable[[], T]) -> T:
    """fn() in the worker's network namespace: a container's engine answers on its own loopback."""
    if os.readlink(f"/proc/{pid}/ns/net") == os.readlink("/proc/self/ns/net"):
        return fn()
    return joinns.in_network_of(pid, fn)


def _resume_engine_quietly(pid: int, adapter: Engine, port: int, paused: Quiesced, timeout_s: float) -> None:
    try:
        in_net(pid, lambda: adapter.resume(port, paused, timeout_s))
    except WorkerError:
        pass  # the engine died; the checkpoint's own error says what went wrong first


def _saved_dir(staging: store.Staging, pid: int) -> Path | None:
    """A directory in the artifact for what the worker saves outside its image (kept GPU regions), if the worker
    sees the same files we do (not a container's worker: it keeps everything in memory, so in CRIU's image)."""
    if os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt"):
        return None
    d = staging.tmp / SAVED_DIR
    d.mkdir()
    uid, gid = procs.owner(pid)
    if (uid, gid) != (os.getuid(), os.getgid()):
        os.chown(d, uid, gid)  # the worker writes the files
    return d


def _saved_settings(saved: Path | None) -> dict[str, str]:
    return {protocol.SAVED_DIR: str(saved)} if saved else {}


def _resume_quietly(control_dir: Path, seq: int, saved: Path | None, pid: int, timeout_s: float) -> None:
    try:
        control.send(control_dir, seq, protocol.CANCEL, _saved_settings(saved))
        if saved and any(saved.iterdir()):
            control.wait_ack(control_dir, seq, timeout_s, pid, "resume")
    except (OSError, WorkerError):
        pass  # the worker is gone or failed to resume; the checkpoint's own error says what went wrong first

