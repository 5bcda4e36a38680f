"""Where a restore's replicas live, each with the same four steps: claim (names, ports, files), start (CRIU),
bring up (CUDA, weights, resume), and the undo of each.

FreshReplicas: each in pid, mount and network namespaces of its own, reached on a host port (replica/sandbox.py).
IntoProcess: one, in the namespaces of a running process, a Kubernetes placeholder's (replica/joinns.py).
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from warmstart import linux, paths, procs, registry
from warmstart.artifact.manifest import IMAGES_DIR, SAVED_DIR
from warmstart.criu import binary as criu
from warmstart.criu import pagefill
from warmstart.errors import IncompatibleArtifact, WorkerError
from warmstart.pipeline import run
from warmstart.pipeline.restore_job import ReplicaResult, RestoreJob
from warmstart.quiesce import restored
from warmstart.registry import WorkerRecord
from warmstart.replica import joinns, sandbox


def _check_bind_target(path: str) -> None:
    """A path of the worker's that a replica gets its own copy of. One missing here is created (in the host's
    file system: a mount namespace shares it) only under warmstart's state directory or the temporary
    directory, where warmstart itself puts workers' control directories, logs and engine sockets. One that is a
    symbolic link is refused here, before any replica starts (replica/sandbox.py checks again as it mounts)."""
    if os.path.islink(path):
        raise sandbox.link_refused(path)
    if os.path.lexists(path):
        return
    roots = (str(paths.home()), tempfile.gettempdir())
    if not any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots):
        raise IncompatibleArtifact(f"the worker's path {path} does not exist on this host, and warmstart creates "
                                   f"such paths only under {' or '.join(roots)}",
                                   "create it (as the worker had it), or checkpoint a worker started here")


@dataclass
class FreshReplicas:
    job: RestoreJob
    count: int
    port: int | None  # replica 0's host port (then port+1, ...); None: free ports
    name: str | None
    names: list[str] = field(default_factory=list)
    listeners: list[socket.socket] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)  # the listeners' host ports (sandbox.start closes our copies)
    started: list[tuple[str, sandbox.Sandbox]] = field(default_factory=list)
    huge: bool = True  # pages read into huge pages (criu.huge_pages), chosen when the replicas start

    def claim(self) -> None:
        w = self.job.ok.manifest.worker
        base = paths.check_name(self.name) if self.name else registry.free_name(f"{w.name or 'worker'}-restored")
        names = [base] if self.count == 1 else [f"{base}-{i}" for i in range(self.count)]
        for n in names:
            registry.claim(n)
            self.names.append(n)
        if self.job.inner_port:
            for i in range(self.count):
                self.listeners.append(sandbox.bind_host_port(self.port + i if self.port else 0))
                self.ports.append(self.listeners[-1].getsockname()[1])

    def release(self) -> None:
        for n in self.names:
            registry.forget(n)

    def host_port(self, i: int) -> int | None:
        return self.ports[i] if self.ports else None

    def start(self) -> None:
        self.huge = criu.huge_pages(self.count)
        for i, rname in enumerate(self.names):
            self.job.progress(f"restoring replica {i} ({rname})")
            self.started.append((rname, sandbox.start(self._spec(i, rname))))

    def _spec(self, i: int, rname: str) -> sandbox.SandboxSpec:
        job, w = self.job, self.job.ok.manifest.worker
        rdir, rcontrol, rlog = run.prepare_dirs(rname)
        restored.request_resume(w, rcontrol, job.resume_settings(i, rname, self.host_port(i)))
        binds = [(str(rcontrol), w.control_dir)] if w.control_dir else []
        if w.log_path:
            binds.append((str(rlog), w.log_path))
        for k, private in enumerate(w.private_dirs):
            own = rdir / "private" / str(k)
            own.mkdir(parents=True, exist_ok=True)
            binds.append((str(own), private))
        for _, target in binds:
            _check_bind_target(target)
        pidfile, log = rdir / "restored.pid", rdir / "restore.log"
        images, images_bind = job.sandbox_images(rdir)
        inner = job.inner_port
        return sandbox.SandboxSpec(
            criu_bin=job.ok.criu, restore_args=criu.restore_args(images, rdir, log, pidfile), images=images_bind,
            log=log, pidfile=pidfile, binds=binds, shm_src=job.shm_src, timeout_s=job.timeout_s,
            criu_env=criu.restore_env(self.huge),
            forwards=[(self.listeners[i], inner)] if self.listeners and inner else [])

    def kill(self) -> None:
        for _, sb in self.started:
            sandbox.kill(sb)

    def bring_up(self) -> list[ReplicaResult]:
        # One thread per replica: each one's CUDA restore (seconds for large models) runs beside the others.
        pool = ThreadPoolExecutor(max_workers=len(self.started))
        try:
            futures = [pool.submit(self._bring_up_one, i, rname, sb) for i, (rname, sb) in enumerate(self.started)]
            pending = set(futures)
            while pending:  # a failure or a cancel stops the wait at once
                done, pending = wait(pending, timeout=0.05, return_when=FIRST_EXCEPTION)
                for f in done:
                    f.result()
                self.job.cancel.check("restore")
            results = [f.result() for f in futures]
            images = sum(f.size for f in self.job.ok.manifest.files if f.path.startswith(IMAGES_DIR + "/"))
            pagefill.record(self.count, self.huge, max(r.criu_s for r in results), images / 1e9)
            return results
        except BaseException:
            self.kill()  # the other replicas' threads then fail fast instead of waiting out the deadline
            raise
        finally:
            pool.shutdown(wait=True)

    def _bring_up_one(self, i: int, rname: str, sb: sandbox.Sandbox) -> ReplicaResult:
        job, w = self.job, self.job.ok.manifest.worker
        criu_s = sb.wait_restored(max(1.0, job.deadline - time.monotonic()))
        job.restored_by_criu()
        wpid = sb.worker_pid()
        if wpid is None:
            raise WorkerError(f"replica {rname} exited right after its restore",
                              f"see {paths.worker_dir(rname) / run.LOG}")
        rec = WorkerRecord(name=rname, kind="replica", pid=wpid, started=procs.start_time(wpid) or 0,
                           command=w.command, engine=w.engine, log=str(paths.worker_dir(rname) / run.LOG),
                           control_dir=str(paths.worker_dir(rname) / run.CONTROL), holder_pid=sb.holder_pid,
                           holder_started=sb.holder_started, artifact=str(job.ok.artifact), replica=i,
                           port=self.host_port(i), worker_log=w.log_path, worker_control_dir=w.control_dir)
        registry.save(rec)
        cuda_s = job.bring_up(rec)
        return ReplicaResult(name=rname, replica=i, port=rec.port, pid=wpid, holder_pid=sb.holder_pid,
                             criu_s=criu_s, cuda_s=cuda_s, ready_s=time.monotonic() - job.t0)

    def close(self) -> None:
        for s in self.listeners:
            s.close()  # each replica's init holds its own copy


@dataclass
class IntoProcess:
    job: RestoreJob
    target: int
    name: str | None
    rname: str = ""
    wpid: int | None = None
    criu_s: float = 0.0

    def claim(self) -> None:
        job, target = self.job, self.target
        w = job.ok.manifest.worker
        if job.ok.saved:
            raise IncompatibleArtifact(
                f"artifact {job.ok.artifact} holds files the worker saved outside its image ({SAVED_DIR}/), which a "
                f"worker in process {target}'s namespaces cannot read",
                "restore it with `warmstart restore`, or checkpoint the worker inside the pod")
        default = f"{w.name or 'worker'}-in-{target}"
        self.rname = paths.check_name(self.name) if self.name else registry.free_name(default)
        registry.claim(self.rname)
        run.prepare_dirs(self.rname)
        job.progress(f"restoring into the namespaces of process {target}")
        joinns.prepare_files(target, w.log_path, [*w.private_dirs, *([w.control_dir] if w.control_dir else [])],
                             job.shm_src)
        if w.control_dir:
            restored.request_resume(w, joinns.target_path(target, w.control_dir),
                                    job.resume_settings(0, self.rname, job.inner_port))

    def release(self) -> None:
        if self.rname:
            registry.forget(self.rname)

    def start(self) -> None:
        job, w = self.job, self.job.ok.manifest.worker
        rdir = paths.worker_dir(self.rname)
        pidfile, log = rdir / "restored.pid", rdir / "restore.log"
        try:
            self.wpid, self.criu_s = joinns.restore(self.target, job.ok.criu,
                                                    criu.restore_args(job.criu_images, rdir, log, pidfile),
                                                    log, pidfile, job.timeout_s, w.ids or [w.pid])
            job.drop_inflated(keep=True)
        finally:
            job.stop_reading()

    def kill(self) -> None:
        if self.wpid:
            procs.terminate(self.wpid, procs.start_time(self.wpid), grace_s=1.0)

    def bring_up(self) -> list[ReplicaResult]:
        job, w, target = self.job, self.job.ok.manifest.worker, self.target
        assert self.wpid is not None
        rdir = paths.worker_dir(self.rname)
        control_dir = joinns.target_path(target, w.control_dir) if w.control_dir else rdir / run.CONTROL
        rec = WorkerRecord(name=self.rname, kind="replica", pid=self.wpid, started=procs.start_time(self.wpid) or 0,
                           command=w.command, engine=w.engine,
                           log=str(joinns.target_path(target, w.log_path)) if w.log_path else str(rdir / run.LOG),
                           control_dir=str(control_dir), artifact=str(job.ok.artifact), replica=0, port=job.inner_port,
                           worker_log=w.log_path, worker_control_dir=w.control_dir)
        registry.save(rec)
        cuda_s = job.bring_up(rec, in_net=lambda fn: linux.in_network_of(target, fn))
        return [ReplicaResult(name=self.rname, replica=0, port=job.inner_port, pid=self.wpid, holder_pid=target,
                              criu_s=self.criu_s, cuda_s=cuda_s, ready_s=time.monotonic() - job.t0)]

    def close(self) -> None:
        pass
