"""The steps of a checkpoint (pipeline/checkpoint.py lists them), over the state they share.

Each method is one step or one undo. State that a later step needs (the staging directory, the manifest's
parts) lives on the job, so that the list itself stays readable.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from warmstart import __version__, config, host, paths, procs, registry
from warmstart.artifact import encryption, store
from warmstart.artifact.encryption import ImageKey
from warmstart.artifact.manifest import (
    IMAGES_DIR,
    ROOTFS_DIR,
    SAVED_DIR,
    SHM_DIR,
    CriuSettings,
    Encryption,
    FileRanges,
    GpuState,
    Manifest,
    RootfsDiff,
    StepTiming,
    TransformChoice,
    WeightsRef,
)
from warmstart.criu import binary as criu
from warmstart.criu import shm
from warmstart.errors import ImageError, WarmstartError, WorkerError
from warmstart.gpu import driver
from warmstart.gpu import processes as gpu
from warmstart.image import behind, cache, codec, keeper, rootfs, workingset, zeropages
from warmstart.image import plan as planning
from warmstart.image.inplace import InPlace
from warmstart.pipeline.source import Source
from warmstart.pipeline.steps import Progress


@dataclass
class CheckpointJob:
    source: Source
    out: Path
    timeout_s: float
    progress: Progress
    timings: list[StepTiming]  # the runner's: the manifest records them
    sign: bool = True
    stop: Callable[[], None] = lambda: None  # the long passes call it every chunk: it raises once interrupted
    staging: store.Staging | None = None
    saved: Path | None = None  # where an SDK worker saves what it keeps outside its image
    working_set: list[FileRanges] = field(default_factory=list)
    gpu_states: list[GpuState] = field(default_factory=list)
    zero_bytes: int = 0
    packed: tuple[int, int] = (0, 0)  # raw and stored bytes of the pages images stored compressed
    encryption: Encryption | None = None  # how the image is sealed (the seal step)
    key: ImageKey | None = None  # ... and its key: made by the dump step where it seals behind CRIU
    begun: dict[str, InPlace] = field(default_factory=dict)  # pages images whose seal began during the dump
    transforms: list[TransformChoice] = field(default_factory=list)  # what image/plan.py decided, and why
    digests: dict[Path, str] = field(default_factory=dict)  # checksums the seal took as it wrote each file
    in_place: tuple[Path, ...] = ()  # images sealed where CRIU wrote them: the cache gets them after the commit
    rootfs_exclude: tuple[str, ...] = ()  # container paths left out of the rootfs diff, besides the setting's
    rootfs: RootfsDiff | None = None  # what the worker's container wrote over its image (image/rootfs.py)
    manifest: Manifest | None = None
    paused_from: float = 0.0
    paused_s: float | None = None  # with leave_running: from the quiesce to the worker serving again
    resume_error: Exception | None = None  # the source did not resume after the dump (leave_running)

    @property
    def stage_dir(self) -> store.Staging:
        assert self.staging is not None, "the stage step runs first"
        return self.staging

    # ---- before the dump ----

    def stage(self) -> None:
        self.staging = store.stage(self.out)
        q = self.source.quiescer
        if q and q.saves_files and self.source.in_own_mounts and not (encrypt_on() and config.current().encrypt_saved):
            self.saved = _saved_dir(self.staging, self.source.pid)  # else kept in memory, so in the sealed image
        self.paused_from = time.monotonic()

    def unstage(self) -> None:
        if self.staging:
            store.discard(self.staging)

    def quiesce(self) -> None:
        assert self.source.quiescer is not None
        report = self.source.quiescer.quiesce(self.saved)
        w = self.source.identity
        w.control_seq = report.control_seq or w.control_seq
        w.gpu_bytes_to_remap = report.gpu_bytes_to_remap
        w.weights = [WeightsRef(**ref) for ref in report.weights]
        w.kv_released = report.kv_released

    def cancel_quiesce(self) -> None:
        if self.source.quiescer:
            self.source.quiescer.cancel()

    def record_tree(self) -> None:
        w, pid = self.source.identity, self.source.pid
        w.listen_ports = procs.listening_tcp_ports(pid)
        w.ids = procs.inner_ids(procs.tree(pid))

    def cuda_checkpoint(self) -> None:
        self.gpu_states = gpu.describe(self.source.cuda_pids)
        gpu.suspend(self.source.cuda_pids, int(self.timeout_s * 1000))

    def cuda_undo(self) -> None:
        pids = self.source.cuda_pids
        if pids and driver.state_name(pids[0]) == "checkpointed":
            gpu.resume(pids)

    def capture_working_set(self) -> None:
        self.working_set = workingset.capture(procs.tree(self.source.pid))

    def dump(self) -> None:
        s, staging = self.source, self.stage_dir
        # Outside the staging directory, so it survives a failed dump (the error names it).
        log = paths.state_dir("logs") / f"dump-{s.pid}-{int(time.time())}.log"
        script = staging.tmp / "shm-hook.sh" if s.shm_use else None
        env = shm.hook(s.shm_use, staging.tmp / SHM_DIR, script, s.shm_root) if script else {}
        sealing = self._seal_behind()
        try:
            criu.run(s.criu, criu.dump_args(s.inner, staging.images, log, str(script) if script else None), log,
                     "dump", env=env, enter=s.enter)
            shutil.move(log, staging.tmp / "dump.log")  # the state directory and -o may be different disks
        except BaseException:
            if sealing:
                sealing.abandon()  # CRIU's error is the one to report
            raise
        else:
            if sealing:
                self.begun = sealing.stop()  # raises what stopped it: the dump step fails
        finally:
            if env:
                shm.remove_remaps(shm.created_remaps(env, s.shm_root), s.shm_root)
            if script:
                script.unlink(missing_ok=True)

    def _seal_behind(self) -> behind.Behind | None:
        """Threads sealing the large pages images while CRIU writes them, one per core: with one thread fewer on the
        2-core VM, the image CRIU wrote last was mostly left to seal after the dump (docs/benchmarks.md)."""
        settings = config.current()
        if not (settings.encrypt and settings.seal_behind) or "1" in (settings.compress, settings.zero_pages):
            return None
        self.encryption, self.key = encryption.new_artifact_key()
        return behind.Behind(self.stage_dir.images, self.key, os.cpu_count() or 1, self.stop).start()

    def drop_begun(self) -> None:
        for f in self.begun.values():
            f.close()
        self.begun = {}

    def unseal_begun(self) -> None:
        """Undo the seal begun during the dump: a pass over the images is about to rewrite them."""
        if self.begun:
            self.progress("undoing the seal begun during the dump, for the pass below")
            for f in self.begun.values():
                f.unseal(os.cpu_count() or 1)
            self.begun = {}

    # ---- the source serves again (leave_running): a failure here still completes the artifact ----

    def resume_gpu(self) -> None:
        try:
            gpu.resume(self.source.cuda_pids)
        except Exception as e:  # noqa: BLE001 - the artifact is whole: finish it, then report this
            self.resume_error = e

    def resume_worker(self) -> None:
        q = self.source.quiescer
        if q and not self.resume_error:
            try:
                q.resume()
            except Exception as e:  # noqa: BLE001 - as above
                self.resume_error = e
        self.paused_s = time.monotonic() - self.paused_from

    # ---- the image ----

    def drop_zero_pages(self) -> None:
        mode = config.current().zero_pages
        if mode == "auto":
            choice = planning.zero_pages(self.stage_dir.images, later_pass=encrypt_on() or compress_on(),
                                         readers={n: f.read for n, f in self.begun.items()})
            self.transforms.append(choice)
            if not choice.applied:
                return
        self.unseal_begun()
        try:
            self.zero_bytes = zeropages.drop(self.stage_dir.images, self.stop)
        except ImageError as e:
            self.progress(f"warning: pages of zeros stay in the image ({e})")

    def compress(self) -> None:
        self.packed = codec.compress(self.stage_dir.images, os.cpu_count() or 1, self.progress,
                                     keep=self.stage_dir.tmp / "raw", mode=config.current().compress,
                                     choices=self.transforms, stop=self.stop)

    def seal(self) -> None:
        staging, threads = self.stage_dir, os.cpu_count() or 1
        if self.key is None:
            self.encryption, self.key = encryption.new_artifact_key()
        key = self.key
        images = [p for p in staging.images.iterdir() if p.is_file()]
        begun, self.begun = self.begun, {}
        try:
            packed = codec.seal(images, key, threads, config.current().compress, keep=staging.tmp / "raw",
                                choices=self.transforms, stop=self.stop, begun=begun)
        finally:
            for f in begun.values():
                f.close()  # those finished are closed already
        for small in (staging.tmp / SHM_DIR, staging.tmp / ROOTFS_DIR):
            if small.is_dir():
                sealed = codec.seal([p for p in small.iterdir() if p.is_file()], key, threads, "0", stop=self.stop)
                self.digests.update(sealed.digests)
        self.packed = (packed.raw, packed.stored)
        self.digests.update(packed.digests)
        self.in_place = packed.in_place

    def capture_rootfs(self) -> None:
        """What the worker's container wrote over its image, while CRIU's image of it is fresh (a worker still
        writing files meanwhile can make them differ from what CRIU recorded: docs/kubernetes.md)."""
        try:
            upper = rootfs.upper_dir(self.source.pid)
        except WarmstartError as e:  # the worker may not need it: CRIU's restore names a file it misses
            self.progress(f"warning: {e.line()}; the artifact goes without what the container wrote over its image")
            return
        if upper is None:
            return
        exclude = {*config.current().rootfs_exclude, *self.rootfs_exclude}
        mounts = rootfs.mount_points(self.source.pid)
        self.progress(f"recording what the worker's container wrote over its image ({upper})")
        self.rootfs = rootfs.capture(upper, self.stage_dir.tmp / ROOTFS_DIR, sorted(exclude), self.stop,
                                     mounts=mounts)

    def checksum(self) -> None:
        staging, s = self.stage_dir, self.source
        if self.saved and not any(self.saved.iterdir()):
            self.saved.rmdir()  # the worker saved nothing there
        self.manifest = Manifest(
            warmstart_version=__version__, worker=s.identity, host=host.current(s.criu.version),
            criu=CriuSettings(version=s.criu.version, dump_args=criu.dump_args(s.pid, Path("IMAGES"), Path("LOG"))),
            gpus=self.gpu_states, working_set=self.working_set, zero_bytes_dropped=self.zero_bytes,
            compressed_raw_bytes=self.packed[0], compressed_bytes=self.packed[1], encryption=self.encryption,
            transforms=self.transforms, rootfs=self.rootfs)
        if s.cuda_pids:
            self.manifest.driver_version = driver.driver_version()
            self.manifest.cuda_version = driver.cuda_version()
        self.manifest.files = store.checksum(staging, self.stop, known=self.digests)
        _cache_raw_images(staging.tmp / "raw", self.manifest)
        self.manifest.image_bytes = store.stored_bytes(staging.tmp, self.manifest.files)

    def commit(self) -> None:
        assert self.manifest is not None
        self.manifest.steps = list(self.timings)
        store.commit(self.stage_dir, self.manifest, sign=self.sign)
        store.remember_verified(self.stage_dir.final, self.manifest)
        if self.in_place:
            self._fill_cache()

    def _fill_cache(self) -> None:
        """The node's cache gets the raw images sealed in place, from a keeper, after the commit. Best effort: the
        artifact is complete, and a restore without the cache opens the images itself."""
        assert self.manifest is not None
        keys = {f.path: f.sha256 for f in self.manifest.files}
        final = self.stage_dir.final / IMAGES_DIR
        try:
            keeper.fill_after_checkpoint(self.stage_dir.final, {
                p.name: (keys[f"{IMAGES_DIR}/{p.name}"], codec.raw_size(final / p.name)) for p in self.in_place})
        except (OSError, WarmstartError) as e:
            self.progress(f"warning: the node's image cache does without this artifact ({e})")

    def stop_source(self) -> None:
        s = self.source
        if s.quiescer:
            s.quiescer.release()
        procs.terminate(s.pid, procs.start_time(s.pid), grace_s=2.0)
        if s.record:
            registry.remove(s.record.name)

    def raise_resume_error(self) -> None:
        e = self.resume_error
        if e is None:
            return
        problem = f"the checkpoint {self.stage_dir.final} is complete, but its source worker did not resume: "
        if isinstance(e, WarmstartError):
            raise type(e)(problem + e.problem, e.fix) from e
        raise WorkerError(problem + str(e), "see the worker's log") from e


def zero_pages_on() -> bool:
    return config.current().zero_pages != "0"


def compress_on() -> bool:
    return config.current().compress != "0"


def encrypt_on() -> bool:
    return config.current().encrypt


def _cache_raw_images(raw: Path, manifest: Manifest) -> None:
    """The raw images of those compressed or sealed go to the image cache, keyed by the stored files' checksums:
    this node restores the artifact without inflating them while they are in its page cache."""
    if not raw.is_dir():
        return
    keys = {f.path: f.sha256 for f in manifest.files}
    for p in raw.iterdir():
        key = next((keys[k] for k in (f"{IMAGES_DIR}/{p.name}{s}" for s in (codec.SUFFIX, codec.SEALED_SUFFIX))
                    if k in keys), None)
        if key:
            cache.cache_raw(p, key)
    shutil.rmtree(raw, ignore_errors=True)


def _saved_dir(staging: store.Staging, pid: int) -> Path:
    """A directory in the artifact for what the worker saves outside its image (kept GPU regions); only for a
    worker that sees the same files we do (a container's keeps everything in memory, so in CRIU's image)."""
    d = staging.tmp / SAVED_DIR
    d.mkdir()
    uid, gid = procs.owner(pid)
    if (uid, gid) != (os.getuid(), os.getgid()):
        os.chown(d, uid, gid)  # the worker writes the files
    return d
