"""What every restore does around CRIU, wherever its replicas live (pipeline/replicas.py): the checks, the
image as CRIU reads it, the weights' load, and each replica's way back to serving once CRIU is done."""

from __future__ import annotations

import os
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from warmstart.artifact.manifest import IMAGES_DIR, ROOTFS_DIR, SHM_DIR, Manifest, StepTiming
from warmstart.criu import binary as criu
from warmstart.errors import ArtifactError, ImageError, StepFailed, WorkerError
from warmstart.gpu import processes as gpu
from warmstart.image import codec, keeper, rootfs
from warmstart.image.codec import SEALED_SUFFIX as SEALED
from warmstart.image.inflated import Inflated, memory_dir
from warmstart.image.readahead import Readahead
from warmstart.pipeline import preflight
from warmstart.pipeline.steps import Cancel, Progress
from warmstart.quiesce import restored
from warmstart.registry import WorkerRecord
from warmstart.weights import client as weights_client
from warmstart.worker import protocol

KEEP_THREAD = "keep-inflated"  # copies a restore's inflated images into the cache after it returns


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
    steps: list[StepTiming] = field(default_factory=list)
    late_interrupt: str | None = None  # a signal or cancel that came once every replica was up: they stay up


def _weights_future(m: Manifest, after: Readahead | None) -> Future[None] | None:
    """Ask the weight services to load the worker's weights now, while CRIU restores the process. after: the
    image's readahead, when the image is not cached: the process restore needs the image first, and the
    weights (often on the same disk) only at the end."""
    if not m.worker.weights:
        return None

    def load() -> None:
        if after:
            after.wait()
        for ref in m.worker.weights:
            weights_client.request(ref.socket, {"op": "prefetch", "files": ref.files, "hash": ref.hash})

    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(load)
    pool.shutdown(wait=False)
    return future


@dataclass
class RestoreJob:
    artifact: Path
    gpu_device: str | None
    replicas: int
    verify_cache: bool
    timeout_s: float
    progress: Progress
    root: str = ""  # where the worker's files are seen from here
    cancel: Cancel = field(default_factory=Cancel)
    insecure_unsigned: bool = False  # accept an unsigned artifact
    skip_gates: frozenset[str] = frozenset()  # pre-restore gates bypassed (warmstart.gates)
    t0: float = field(default_factory=time.monotonic)
    checked: preflight.Checked | None = None
    weights: Future[None] | None = None
    inflated: Inflated | None = None
    shm_view: Inflated | None = None  # the worker's /dev/shm segments, opened (sealed ones)
    inflate_s: float = 0.0
    criu_done: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    keeping: threading.Thread | None = None  # copies the inflated images into the cache, then removes them
    detach_keep: bool = False  # that copy is left to a process of its own (a CLI about to exit)

    @property
    def ok(self) -> preflight.Checked:
        assert self.checked is not None, "the verify step runs first"
        return self.checked

    @property
    def deadline(self) -> float:
        return self.t0 + self.timeout_s

    @property
    def inner_port(self) -> int | None:
        w = self.ok.manifest.worker
        return w.port or (w.listen_ports[0] if w.listen_ports else None)

    @property
    def shm_src(self) -> Path | None:
        if self.shm_view:
            return self.shm_view.path
        d = self.ok.artifact / SHM_DIR
        return d if d.is_dir() else None

    def check(self) -> None:
        self.checked = preflight.check(self.artifact, self.gpu_device, self.replicas, self.verify_cache,
                                       self.progress, self.root, self.insecure_unsigned,
                                       self.cancel.checker("restore"), self.skip_gates)

    def stop_reading(self) -> None:
        if self.checked and self.checked.readahead:
            self.checked.readahead.stop()

    def prepare_image(self) -> None:
        """Right before CRIU starts: the weights' load, and the compressed or sealed files inflated."""
        self.weights = _weights_future(self.ok.manifest, self.ok.readahead)
        images, shm = self.ok.artifact / IMAGES_DIR, self.ok.artifact / SHM_DIR
        if not codec.packed(images) and not (shm.is_dir() and codec.packed(shm)):
            return
        self.progress("opening the sealed image" if self.ok.key else "inflating the compressed pages images")
        t = time.monotonic()
        ahead = self.ok.readahead
        if ahead:  # the libraries' pages wait: opening the image takes every core, and CRIU needs it first
            ahead.hold()
        files = self.ok.manifest.files
        keys = {Path(f.path).name: f.sha256 for f in files if f.path.startswith(IMAGES_DIR + "/")}
        shm_keys = {Path(f.path).name: f.sha256 for f in files if f.path.startswith(SHM_DIR + "/")}
        try:
            stop = self.cancel.checker("restore")
            # Into a placeholder, CRIU reads the view from inside the pod's mount namespace, where a link to
            # this node's cache does not resolve: the images are opened afresh there.
            self.inflated = Inflated(images, criu.read_threads(), keys, self.ok.key, use_cache=not self.root,
                                     stop=stop)
            if shm.is_dir() and codec.packed(shm):
                self.shm_view = Inflated(shm, criu.read_threads(), shm_keys, self.ok.key, use_cache=False, stop=stop,
                                         set_below=None)
        except ImageError as e:
            raise ArtifactError(f"artifact {self.ok.artifact}: {e}",
                                "copy the artifact again or checkpoint again") from None
        except OSError as e:
            raise StepFailed(f"cannot inflate the artifact's images: {e}",
                             "make room in /dev/shm, or set TMPDIR to a directory with room") from None
        finally:
            if ahead:
                ahead.go_on()
        self.inflate_s = time.monotonic() - t

    def apply_rootfs(self) -> None:
        """Into a placeholder: what the source's container wrote over its image goes into the placeholder's root
        before CRIU looks there for the files the worker holds. Not undone: a refused placeholder is replaced."""
        diff = self.ok.manifest.rootfs
        if diff is None:
            return
        if not self.root:
            self.progress("note: the artifact holds what its container wrote over its image; only a restore into "
                          "a placeholder puts it back")
            return
        self.progress(f"putting back what the source's container wrote ({diff.files} files, {len(diff.deleted)} "
                      "deletions)")
        stop, sealed = self.cancel.checker("restore"), self.ok.artifact / ROOTFS_DIR / (rootfs.ARCHIVE + SEALED)
        if not sealed.is_file():
            rootfs.apply(self.root, self.ok.artifact / ROOTFS_DIR / rootfs.ARCHIVE, diff, stop)
            return
        # Named as inflated images are, so that a later restore removes it if this process is killed meanwhile.
        with tempfile.TemporaryDirectory(prefix=f"{keeper.PREFIX}{os.getpid()}-",
                                         dir=memory_dir(sealed.stat().st_size)) as tmp:
            try:
                codec.inflate(sealed, Path(tmp) / rootfs.ARCHIVE, criu.read_threads(), self.ok.key, stop)
            except ImageError as e:
                raise ArtifactError(f"artifact {self.ok.artifact}: {e}", "copy the artifact again or checkpoint again"
                                    ) from None
            rootfs.apply(self.root, Path(tmp) / rootfs.ARCHIVE, diff, stop)

    @property
    def criu_images(self) -> Path:
        """The images directory CRIU reads."""
        return self.inflated.path if self.inflated else self.ok.artifact / IMAGES_DIR

    def sandbox_images(self, work: Path) -> tuple[Path, tuple[str, str] | None]:
        """The same, for CRIU in a sandbox whose work directory is `work`, with the bind it needs to see
        images inflated into /dev/shm (replica/sandbox.py SandboxSpec.images)."""
        if not self.inflated:
            return self.criu_images, None
        (work / "images").mkdir(exist_ok=True)
        return work / "images", (str(self.inflated.path), str(work / "images"))

    def restored_by_criu(self) -> None:
        """One replica's CRIU has read the image. Once all have, the inflated images go; the readahead goes on
        with what the worker reads once it runs (its libraries' working set, its saved files)."""
        with self.lock:
            self.criu_done += 1
            if self.criu_done < self.replicas:
                return
        self.drop_inflated(keep=True)

    def drop_inflated(self, keep: bool = False) -> None:
        """The memory the inflated images hold goes back. With `keep` (every CRIU read them), they are copied
        into the raw-image cache first, in a thread that outlives the restore call: the copy (~0.7 s for 0.84 GB)
        must not delay reporting the workers ready, and the thread is not a daemon, so the caller's process exits
        only once it is done; with `detach_keep` (the CLI) a process of its own makes the copy instead."""
        if self.shm_view:
            self.shm_view.remove(keep=keep)  # its set of segments is copied into the cache (~0.1 s, once)
        if not self.inflated:
            return
        if keep and self.detach_keep:
            self.inflated.remove(keep=True, detach=True)
            return
        with self.lock:
            start = keep and self.keeping is None
            if start:
                self.keeping = threading.Thread(target=self.inflated.remove, kwargs={"keep": True},
                                                name=KEEP_THREAD)
        if start and self.keeping:
            self.keeping.start()
        elif not self.keeping:
            self.inflated.remove()

    def resume_settings(self, replica: int, name: str, port: int | None) -> dict[str, Any]:
        saved = {protocol.SAVED_DIR: str(self.ok.saved)} if self.ok.saved else {}
        return {"restored": True, "replica": replica, "name": name, "port": port, **saved}

    def bring_up(self, rec: WorkerRecord, in_net: restored.InNet = lambda fn: fn()) -> float:
        """After CRIU: CUDA restore, the weights, then the resume. Returns the seconds the CUDA restore took."""
        m = self.ok.manifest
        t = time.monotonic()
        if m.gpus:
            gpu.resume(gpu.host_pids(rec.pid, [g.pid for g in m.gpus]), gpu_map=self.ok.gpu_map)
        cuda_s = time.monotonic() - t
        self._weights_ready()
        restored.wait_serving(m.worker, rec.pid, Path(rec.control_dir), rec.port, rec.alive, self.deadline, in_net)
        self._working_set_read()
        return cuda_s

    def _working_set_read(self) -> None:
        """A replica is ready once what the warm worker touched to serve is read too: otherwise its first
        request after a cold restore faults those pages in one at a time (seconds for an engine's libraries)."""
        ahead = self.ok.readahead
        if ahead and not ahead.wait(max(0.0, self.deadline - time.monotonic())):
            self.progress("warning: the working set was not read ahead before the timeout; the first requests "
                          "read it from disk")

    def _weights_ready(self) -> None:
        if self.weights is None:
            return
        try:
            self.weights.result(timeout=max(1.0, self.deadline - time.monotonic()))
        except Exception as e:
            raise WorkerError(f"the worker's weights are not available: {e}", "start `warmstart weights serve` "
                              "with the same weight files, then restore again") from None

    def finish(self) -> None:
        """Always, at the end: no readahead left running, no inflated image left (unless being kept)."""
        self.stop_reading()
        self.drop_inflated()

    def result(self, replicas: list[ReplicaResult], steps: list[StepTiming]) -> RestoreResult:
        return RestoreResult(artifact=self.ok.artifact, manifest=self.ok.manifest, verify_s=self.ok.seconds,
                             replicas=replicas, seconds=time.monotonic() - self.t0, inflate_s=self.inflate_s,
                             steps=steps)
