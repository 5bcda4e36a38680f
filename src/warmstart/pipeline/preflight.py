"""Everything that can refuse a restore, before any process starts: the manifest, this host's gates, the GPU
plan (and its gates), the checksums. Once the host is known to fit, a cold image's readahead starts beside
the remaining checks."""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

from warmstart import gates, host
from warmstart.artifact import encryption, signing, store
from warmstart.artifact.encryption import ImageKey
from warmstart.artifact.manifest import IMAGES_DIR, SAVED_DIR, Manifest
from warmstart.criu import binary as criu
from warmstart.errors import ImageError, WorkerError
from warmstart.gpu import placement
from warmstart.image import cache, codec, readahead, workingset
from warmstart.image.readahead import Readahead
from warmstart.pipeline.steps import Progress


@dataclass
class Checked:
    artifact: Path  # absolute
    manifest: Manifest
    criu: criu.Criu
    gpu_map: dict[str, str]  # source GPU UUID -> the one it restores onto
    readahead: Readahead | None  # readers of an image that is not in the page cache, while CRIU runs
    seconds: float
    signer: str | None  # the fingerprint of the key that signed it; None: unsigned, accepted by the caller
    key: ImageKey | None  # opens its sealed files; None: stored in the clear

    @property
    def saved(self) -> Path | None:
        """What the worker saved outside its image (kept GPU regions), read by each replica as it resumes."""
        d = self.artifact / SAVED_DIR
        return d if d.is_dir() else None


def _cached_images(artifact: Path, m: Manifest, stop: Callable[[], None]) -> dict[Path, Path]:
    """The stored (compressed or sealed) images whose raw image in this node's cache the restore will link
    (cache.cached), each with that raw image: the readahead reads that instead of the stored file."""
    out = {}
    for f in m.files:
        p = artifact / f.path
        if f.path.startswith(IMAGES_DIR + "/") and p.name.endswith((codec.SUFFIX, codec.SEALED_SUFFIX)):
            try:
                size = codec.raw_size(p)
                # As image/inflated.py: only large images go to the cache, and a worker has a hundred small ones.
                raw = cache.cached(f.sha256, size, p, stop) if size >= codec.MIN_BYTES else None
                if raw:
                    out[p] = raw
            except (OSError, ImageError):
                pass  # the verify step names what is wrong with it
    return out


def _weight_services(m: Manifest) -> None:
    """The restore (root) connects to each weight service the manifest names: only to a socket that a service
    of this user made, not to whatever a path names."""
    for ref in m.worker.weights:
        fix = f"start `warmstart weights serve --socket {ref.socket}` as this user, then restore again"
        try:
            st = os.lstat(ref.socket)
        except OSError as e:
            raise WorkerError(f"cannot reach the weight service at {ref.socket} ({e.strerror})", fix) from None
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
            raise WorkerError(f"{ref.socket} is not the socket of a weight service this user runs", fix)


def check(artifact: Path, gpu_device: str | None, replicas: int, verify_cache: bool, progress: Progress,
          root: str = "", insecure_unsigned: bool = False, stop: Callable[[], None] = lambda: None,
          skip: Collection[str] = ()) -> Checked:
    """root: where the worker's files are seen from here (a placeholder's /proc/PID/root); skip: the gates
    bypassed (warmstart.gates), each announced through `progress` if it would have refused."""
    t0 = time.monotonic()
    artifact = artifact.absolute()
    store.remove_stale_partials()  # what checkpoints killed on this host left
    store.require(artifact)
    signer = signing.check(artifact, insecure_unsigned)
    manifest = store.load(artifact)
    key = encryption.artifact_key(artifact, manifest.encryption) if manifest.encryption else None
    binary = criu.find()
    gates.enforce(host.gates_of(manifest.host, host.current(binary.version)), skip, progress,
                  context=f"artifact {artifact} cannot be restored here: ")
    criu.restore_env()  # its settings are checked before anything starts
    _weight_services(manifest)
    saved = artifact / SAVED_DIR
    ahead = readahead.start_if_cold(artifact / IMAGES_DIR, criu.read_threads(),
                                    then=tuple(sorted(saved.iterdir())) if saved.is_dir() else (),
                                    ranges=workingset.pieces(manifest.working_set, root),
                                    instead={} if root else _cached_images(artifact, manifest, stop))
    try:
        gpu_map = placement.plan_here(manifest.gpus, manifest.driver_version, gpu_device, replicas,
                                      manifest.worker.gpu_bytes_to_remap, skip, progress)
        progress("verifying artifact checksums")
        store.verify(artifact, manifest, use_cache=verify_cache, stop=stop)
    except BaseException:
        if ahead:
            ahead.stop()
        raise
    return Checked(artifact, manifest, binary, gpu_map, ahead, time.monotonic() - t0, signer, key)
