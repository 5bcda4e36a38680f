"""The restore pipeline: verify -> per replica: namespaces -> CRIU restore -> (CUDA restore) -> resume.

Resume is the SDK's control message, or an engine adapter's HTTP call once the engine answers health.

Replicas restore concurrently, each into its own pid, mount and network namespaces, reachable on its own
host port. If any replica fails, every replica started by this call is killed and its state removed.
"""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from warmstart import host, paths, procs, registry
from warmstart.quiesce import engines
from warmstart.artifact import store
from warmstart.artifact.manifest import IMAGES_DIR, SAVED_DIR, SHM_DIR, Manifest
from warmstart.quiesce import control
from warmstart.criu import binary as criu
from warmstart.gpu import processes as gpu
from warmstart.image import cache, codec, inflated
from warmstart.replica import joinns
from warmstart.pipeline import run as launch
from warmstart.image import readahead
from warmstart.replica import sandbox
from warmstart.image import workingset
from warmstart.image.readahead import Readahead
from warmstart.pipeline.steps import Progress, quiet
from warmstart.quiesce.http import Engine, Quiesced
from warmstart.errors import ArtifactError, IncompatibleArtifact, StepFailed, UsageError, WorkerError
from warmstart.registry import WorkerRecord
from warmstart.worker import protocol


@dataclass
class ReplicaResult:
    name: str
    replica: int
    port: int | None
    pid: int  # host pid of the restored worker
    holder_pid: int
    criu_s: float
    cuda_s: float  # the driver's restore of its GPU state (0 for a CPU worker)
    ready_s: float  # from the start of `restore` to this replica answering


@dataclass
class RestoreResult:
    artifact: Path
    manifest: Manifest
    verify_s: float
    replicas: list[ReplicaResult]
    seconds: float
    inflate_s: float = 0.0  # inflating compressed pages images before CRIU (image/inflated.py)


def _replica_names(base: str, count: int) -> list[str]:
    names = [base] if count == 1 else [f"{base}-{i}" for i in range(count)]
    for n in names:
        registry.claim(n)
    return names


def _inner_port(m: Manifest) -> int | None:
    if m.worker.port:
        return m.worker.port
    return m.worker.listen_ports[0] if m.worker.listen_ports else None


def _prefetch_weights(m: Manifest, after: Readahead | None) -> Future | None:
    """Ask the weight services to load the worker's weights now, while CRIU restores the process.

    after: the image's readahead, when the image is not cached. The weights and the image are often on one
    disk; the process restore needs the image first, and the weights are needed only at the end."""
    if not m.worker.weights:
        return None
    from warmstart.weights import client as weights

    def load() -> None:
        if after:
            after.wait()
        for ref in m.worker.weights:
            weights.request(ref.socket, {"op": "prefetch", "files": ref.files, "hash": ref.hash})

    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(load)
    pool.shutdown(wait=False)
    return future


def _weights_ready(future: Future | None, deadline: float) -> None:
    if future is None:
        return
    try:
        future.result(timeout=max(1.0, deadline - time.monotonic()))
    except Exception as e:
        raise WorkerError(f"the worker's weights are not available: {e}",
                          "start `warmstart weights serve` with the same weight files, then restore again") from None


def _wait_port(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.005)
    raise WorkerError(f"restored worker does not accept connections on port {port}", "see the replica's log")


KEEP_THREAD = "keep-inflated"  # copies a restore's inflated images into the cache after it returns


@dataclass
class _Prepared:
    """What both restore paths know once nothing can refuse any more."""

    artifact: Path
    manifest: Manifest
    binary: criu.Criu
    gpu_map: dict[str, str]
    adapter: Engine | None
    inner_port: int | None
    t0: float
    verify_s: float
    readahead: Readahead | None = None  # readers of an image that is not in the page cache, while CRIU runs
    weights: Future | None = None  # the weight services loading the worker's weights
    inflated: inflated.Inflated | None = None  # the image as CRIU reads it, if some of it is stored compressed
    inflate_s: float = 0.0
    replicas: int = 1
    criu_done: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    keeping: threading.Thread | None = None  # copies the inflated images into the cache, then removes them

    def before_criu(self, progress: Progress) -> None:
        """Right before CRIU starts: the weights' load (after the image's readahead, if the image is read), and
        the compressed pages images inflated."""
        self.weights = _prefetch_weights(self.manifest, self.readahead)
        if codec.compressed(self.artifact / IMAGES_DIR):
            progress("inflating the compressed pages images")
            t = time.monotonic()
            try:
                keys = {Path(f.path).name: f.sha256 for f in self.manifest.files if f.path.endswith(codec.SUFFIX)}
                self.inflated = inflated.Inflated(self.artifact / IMAGES_DIR, criu.read_threads(), keys)
            except codec.ImageError as e:
                raise ArtifactError(f"artifact {self.artifact}: {e}",
                                    "copy the artifact again or checkpoint again") from None
            except OSError as e:
                raise StepFailed(f"cannot inflate the artifact's compressed pages images: {e}",
                                 "make room in /dev/shm, or set TMPDIR to a directory with room") from None
            self.inflate_s = time.monotonic() - t

    @property
    def criu_images(self) -> Path:
        """The images directory CRIU reads."""
        return self.inflated.path if self.inflated else self.artifact / IMAGES_DIR

    def sandbox_images(self, work: Path) -> tuple[Path, tuple[str, str] | None]:
        """The same, for CRIU in a sandbox whose work directory is `work`, with the bind it needs to see
        images inflated into /dev/shm (sandbox.SandboxSpec.images)."""
        if not self.inflated:
            return self.criu_images, None
        (work / "images").mkdir(exist_ok=True)
        return work / "images", (str(self.inflated.path), str(work / "images"))


    def restored_by_criu(self) -> None:
        """One replica's CRIU has read the image. Once all have, the inflated images go, and the readahead
        has nothing left to do unless the worker has saved files."""
        with self.lock:
            self.criu_done += 1
            if self.criu_done < self.replicas:
                return
        self.drop_inflated(keep=True)
        if not self.saved:
            self.stop_reading()

    def stop_reading(self) -> None:
        if self.readahead:
            self.readahead.stop()

    def drop_inflated(self, keep: bool = False) -> None:
        """Once every CRIU has read the image: the memory the inflated images hold goes back. With `keep` (the
        CRIUs read them), they are copied into the raw-image cache first, in a thread that outlives the restore
        call: the copy (~0.7 s for 0.84 GB) must not delay reporting the workers ready, and the thread is not a
        daemon, so a `warmstart restore` process exits only once it is done."""
        if not self.inflated:
            return
        with self.lock:
            start = keep and self.keeping is None
            if start:
                self.keeping = threading.Thread(target=self.inflated.remove, kwargs={"keep": True},
                                                name=KEEP_THREAD)
        if start:
            assert self.keeping is not None
            self.keeping.start()
        elif not self.keeping:
            self.inflated.remove()

    @property
    def saved(self) -> Path | None:
        """What the worker saved outside its image (kept GPU regions), read by each replica as it resumes."""
        return self.artifact / SAVED_DIR if (self.artifact / SAVED_DIR).is_dir() else None

    def resume_settings(self, replica: int, name: str, port: int | None) -> dict[str, Any]:
        saved = {protocol.SAVED_DIR: str(self.saved)} if self.saved else {}
        return {"restored": True, "replica": replica, "name": name, "port": port, **saved}

    @property
    def shm_src(self) -> Path | None:
        return self.artifact / SHM_DIR if (self.artifact / SHM_DIR).is_dir() else None


def _prepare(artifact: Path, gpu_device: str | None, replicas: int, verify_cache: bool,
             progress: Progress, root: str = "") -> _Prepared:
    """Everything that can refuse the restore, before any process starts: host, GPU plan, checksums. Once the
    host is known to fit, the readahead of a cold image starts, beside the rest of the checks (root: where the
    worker's files are seen from here)."""
    t0 = time.monotonic()
    artifact = artifact.absolute()
    manifest = store.load(artifact)
    binary = criu.find()
    problems = host.check_compatible(manifest.host, host.current(binary.version))
    if problems:
        raise IncompatibleArtifact(f"artifact {artifact} cannot be restored here: " + "; ".join(problems),
                                   "restore it on a host like the one it was made on, or checkpoint on this one")
    criu.restore_env()  # its settings are checked before anything starts
    saved = artifact / SAVED_DIR
    ahead = readahead.start_if_cold(artifact / IMAGES_DIR, criu.read_threads(),
                                    then=tuple(sorted(saved.iterdir())) if saved.is_dir() else (),
                                    ranges=workingset.pieces(manifest.working_set, root))
    try:
        gpu_map = gpu.plan_here(manifest.gpus, manifest.driver_version, gpu_device, replicas,
                                manifest.worker.gpu_bytes_to_remap)
        progress("verifying artifact checksums")
        store.verify(artifact, manifest, use_cache=verify_cache)
    except BaseException:
        if ahead:
            ahead.stop()
        raise
    w = manifest.worker
    return _Prepared(artifact, manifest, binary, gpu_map,
                     engines.for_engine(w.engine) if not w.sdk else None, _inner_port(manifest),
                     t0, time.monotonic() - t0, readahead=ahead, replicas=replicas)


def _bring_up(p: _Prepared, rec: WorkerRecord, deadline: float,
              in_net: Callable[[Callable[[], Any]], Any] = lambda fn: fn()) -> float:
    """After CRIU: CUDA restore, the weights, then the resume (SDK ack, engine adapter, or the port answering).
    Returns the seconds the CUDA restore took.

    in_net runs a call in the network the worker's port is reached from (a placeholder's, for --into)."""
    w = p.manifest.worker

    def left() -> float:
        return max(1.0, deadline - time.monotonic())

    t = time.monotonic()
    if p.manifest.gpus:
        gpu.resume(gpu.host_pids(rec.pid, [g.pid for g in p.manifest.gpus]), gpu_map=p.gpu_map)
    cuda_s = time.monotonic() - t
    _weights_ready(p.weights, deadline)
    port, adapter = rec.port, p.adapter
    if w.sdk:
        control.wait_ack(Path(rec.control_dir), w.control_seq + 1, left(), rec.pid, "resume")
    elif adapter and port:
        in_net(lambda: (adapter.wait_healthy(port, left(), alive=rec.alive),
                        adapter.resume(port, Quiesced(kv_released=w.kv_released), left())))
    elif port:
        in_net(lambda: _wait_port(port, deadline))
    return cuda_s


def restore(
    artifact: Path,
    *,
    name: str | None = None,
    replicas: int = 1,
    port: int | None = None,
    timeout_s: float = 120.0,
    verify_cache: bool = True,
    gpu_device: str | None = None,
    progress: Progress = quiet,
) -> RestoreResult:
    if replicas < 1:
        raise UsageError(f"--replicas must be at least 1, not {replicas}", "pass --replicas 1 or more")
    p = _prepare(artifact, gpu_device, replicas, verify_cache, progress)
    artifact, manifest, inner, t0 = p.artifact, p.manifest, p.inner_port, p.t0
    w = manifest.worker
    try:
        base = paths.check_name(name) if name else registry.free_name(f"{w.name or 'worker'}-restored")
        names = _replica_names(base, replicas)
        listeners = [sandbox.bind_host_port(port + i if port else 0) for i in range(replicas)] if inner else []
    except BaseException:
        p.stop_reading()
        raise
    host_ports: list[int | None] = [s.getsockname()[1] for s in listeners] or [None] * replicas

    started: list[tuple[str, sandbox.Sandbox]] = []
    try:
        p.before_criu(progress)
        for i, rname in enumerate(names):
            rdir, rcontrol, rlog = launch.prepare_dirs(rname)
            host_port = host_ports[i]
            if w.sdk:
                # Waiting in the replica's control directory before the process exists, so the worker
                # finds it on its first poll after the restore.
                control.send(rcontrol, w.control_seq + 1, protocol.RESUME, p.resume_settings(i, rname, host_port))
            binds = []
            if w.control_dir:
                binds.append((str(rcontrol), w.control_dir))
            if w.log_path:
                binds.append((str(rlog), w.log_path))
            for k, private in enumerate(w.private_dirs):
                own = rdir / "private" / str(k)
                own.mkdir(parents=True, exist_ok=True)
                binds.append((str(own), private))
            pidfile = rdir / "restored.pid"
            log = rdir / "restore.log"
            images, images_bind = p.sandbox_images(rdir)
            spec = sandbox.SandboxSpec(
                criu_bin=p.binary,
                restore_args=criu.restore_args(images, rdir, log, pidfile),
                images=images_bind,
                log=log,
                pidfile=pidfile,
                binds=binds,
                forwards=[(listeners[i], inner)] if listeners and inner else [],
                shm_src=p.shm_src,
                timeout_s=timeout_s,
            )
            progress(f"restoring replica {i} ({rname})")
            started.append((rname, sandbox.start(spec)))

        deadline = t0 + timeout_s

        def finish(i: int, rname: str, sb: sandbox.Sandbox) -> ReplicaResult:
            criu_s = sb.wait_restored(max(1.0, deadline - time.monotonic()))
            p.restored_by_criu()
            wpid = sb.worker_pid()
            if wpid is None:
                raise WorkerError(f"replica {rname} exited right after its restore",
                                  f"see {paths.worker_dir(rname) / launch.LOG}")
            rec = WorkerRecord(name=rname, kind="replica", pid=wpid, started=procs.start_time(wpid) or 0, command=w.command,
                               engine=w.engine, log=str(paths.worker_dir(rname) / launch.LOG),
                               control_dir=str(paths.worker_dir(rname) / launch.CONTROL),
                               holder_pid=sb.holder_pid, holder_started=sb.holder_started,
                               artifact=str(artifact), replica=i,
                               port=host_ports[i])
            registry.save(rec)
            cuda_s = _bring_up(p, rec, deadline)
            return ReplicaResult(name=rname, replica=i, port=rec.port, pid=wpid, holder_pid=sb.holder_pid,
                                 criu_s=criu_s, cuda_s=cuda_s, ready_s=time.monotonic() - t0)

        # One thread per replica: each one's CUDA restore (seconds for large models) runs alongside the others.
        pool = ThreadPoolExecutor(max_workers=len(started))
        try:
            futures = [pool.submit(finish, i, rname, sb) for i, (rname, sb) in enumerate(started)]
            results = [f.result() for f in futures]
        except BaseException:
            for _, sb in started:  # the other replicas' threads then fail fast instead of waiting out the deadline
                sandbox.kill(sb)
            raise
        finally:
            pool.shutdown(wait=True)
    except BaseException:
        for rname, sb in started:
            sandbox.kill(sb)
        for rname in names:
            registry.forget(rname)
        raise
    finally:
        p.stop_reading()
        p.drop_inflated()
        for s in listeners:
            s.close()  # init holds its own copy
    return RestoreResult(artifact=artifact, manifest=manifest, verify_s=p.verify_s, replicas=results,
                         seconds=time.monotonic() - t0, inflate_s=p.inflate_s)


def restore_into(
    artifact: Path,
    target: int,
    *,
    name: str | None = None,
    timeout_s: float = 120.0,
    verify_cache: bool = True,
    gpu_device: str | None = None,
    progress: Progress = quiet,
) -> RestoreResult:
    """Restore one replica into the namespaces of a running process (a pod's placeholder) instead of new ones."""
    joinns.check_target(target)
    p = _prepare(artifact, gpu_device, 1, verify_cache, progress, root=f"/proc/{target}/root")
    w = p.manifest.worker
    try:
        if p.saved:
            raise IncompatibleArtifact(
                f"artifact {p.artifact} holds files the worker saved outside its image ({SAVED_DIR}/), which a worker "
                f"in process {target}'s namespaces cannot read",
                "restore it with `warmstart restore`, or checkpoint the worker inside the pod")
        rname = paths.check_name(name) if name else registry.free_name(f"{w.name or 'worker'}-in-{target}")
        registry.claim(rname)
        rdir, _, _ = launch.prepare_dirs(rname)
        control_dir = joinns.target_path(target, w.control_dir) if w.control_dir else None
        progress(f"restoring into the namespaces of process {target}")
        joinns.prepare_files(target, w.log_path, [*w.private_dirs, *([w.control_dir] if w.control_dir else [])],
                             p.shm_src)
        if w.sdk and control_dir:
            control.send(control_dir, w.control_seq + 1, protocol.RESUME, p.resume_settings(0, rname, p.inner_port))
    except BaseException:
        p.stop_reading()
        raise
    pidfile, log = rdir / "restored.pid", rdir / "restore.log"
    deadline = p.t0 + timeout_s
    wpid = None
    try:
        p.before_criu(progress)
        try:
            wpid, criu_s = joinns.restore(target, p.binary, criu.restore_args(p.criu_images, rdir, log, pidfile),
                                          log, pidfile, timeout_s, w.ids or [w.pid])
            p.drop_inflated(keep=True)
        finally:
            p.stop_reading()
        rec = WorkerRecord(name=rname, kind="replica", pid=wpid, started=procs.start_time(wpid) or 0,
                           command=w.command, engine=w.engine,
                           log=str(joinns.target_path(target, w.log_path)) if w.log_path else str(rdir / launch.LOG),
                           control_dir=str(control_dir or rdir / launch.CONTROL), artifact=str(p.artifact),
                           replica=0, port=p.inner_port)
        registry.save(rec)
        cuda_s = _bring_up(p, rec, deadline, in_net=lambda fn: joinns.in_network_of(target, fn))
    except BaseException:
        if wpid:
            procs.terminate(wpid, procs.start_time(wpid), grace_s=1.0)
        registry.forget(rname)
        raise
    finally:
        p.drop_inflated()
    result = ReplicaResult(name=rname, replica=0, port=p.inner_port, pid=wpid, holder_pid=target, criu_s=criu_s,
                           cuda_s=cuda_s, ready_s=time.monotonic() - p.t0)
    return RestoreResult(artifact=p.artifact, manifest=p.manifest, verify_s=p.verify_s, replicas=[result],
                         seconds=time.monotonic() - p.t0, inflate_s=p.inflate_s)
