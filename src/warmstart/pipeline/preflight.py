"""Everything that can refuse a restore, before any process starts: the manifest, this host, the GPU plan,
the checksums. Once the host is known to fit, a cold image's readahead starts beside the remaining checks."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from warmstart import host
from warmstart.artifact import signing, store
from warmstart.artifact.manifest import IMAGES_DIR, SAVED_DIR, Manifest
from warmstart.criu import binary as criu
from warmstart.errors import IncompatibleArtifact
from warmstart.gpu import placement
from warmstart.image import readahead, workingset
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

    @property
    def saved(self) -> Path | None:
        """What the worker saved outside its image (kept GPU regions), read by each replica as it resumes."""
        d = self.artifact / SAVED_DIR
        return d if d.is_dir() else None


def check(artifact: Path, gpu_device: str | None, replicas: int, verify_cache: bool, progress: Progress,
          root: str = "", insecure_unsigned: bool = False) -> Checked:
    """root: where the worker's files are seen from here (a placeholder's /proc/PID/root)."""
    t0 = time.monotonic()
    artifact = artifact.absolute()
    store.remove_stale_partials()  # what checkpoints killed on this host left
    store.require(artifact)
    signer = signing.check(artifact, insecure_unsigned)
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
        gpu_map = placement.plan_here(manifest.gpus, manifest.driver_version, gpu_device, replicas,
                                      manifest.worker.gpu_bytes_to_remap)
        progress("verifying artifact checksums")
        store.verify(artifact, manifest, use_cache=verify_cache)
    except BaseException:
        if ahead:
            ahead.stop()
        raise
    return Checked(artifact, manifest, binary, gpu_map, ahead, time.monotonic() - t0, signer)
