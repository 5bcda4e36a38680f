"""The manifest: what an artifact holds, where it came from, and how long each step took."""

from __future__ import annotations

import posixpath
from datetime import datetime, timezone
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, Field, field_validator

from warmstart.host import HostInfo

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
IMAGES_DIR = "images"
SHM_DIR = "shm"  # the worker's /dev/shm segments, placed in each replica's own /dev/shm
SAVED_DIR = "saved"  # what the worker saved outside its image (kept GPU regions), read back by each replica
ROOTFS_DIR = "rootfs"  # what the worker's container wrote over its image (image/rootfs.py)


_MAX_PATH = 4096
_PID_MAX = 1 << 22  # the kernel's largest pid_max


def _artifact_path(v: str) -> str:
    """A file of the artifact: relative, inside images/, shm/, saved/ or rootfs/, with no '..' or '.' part."""
    parts = v.split("/")
    inside = parts[0] in (IMAGES_DIR, SHM_DIR, SAVED_DIR, ROOTFS_DIR) and len(parts) >= 2
    if not inside or len(v) > _MAX_PATH or "\0" in v or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"{v[:200]!r} is not a path inside the artifact's {IMAGES_DIR}/, {SHM_DIR}/, {SAVED_DIR}/ "
                         f"or {ROOTFS_DIR}/")
    return v


def _worker_path(v: str) -> str:
    """A path as the worker saw it: absolute and normal (no '..', '.', '//'), so that what a restore binds or
    creates for it is exactly the path that was checkpointed."""
    if not v.startswith("/") or len(v) > _MAX_PATH or "\0" in v or posixpath.normpath(v) != v or v.startswith("//"):
        raise ValueError(f"{v[:200]!r} is not an absolute, normal path")
    return v


ArtifactPath = Annotated[str, AfterValidator(_artifact_path)]
WorkerPath = Annotated[str, AfterValidator(_worker_path)]
Port = Annotated[int, Field(ge=1, le=65535)]
Pid = Annotated[int, Field(ge=1, le=_PID_MAX)]
Count = Annotated[int, Field(ge=0, le=1 << 62)]


class FileEntry(BaseModel):
    path: ArtifactPath  # relative to the artifact directory, '/'-separated
    size: Count
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    # 0: SHA-256 of the whole file. N: SHA-256 over the SHA-256 digests of its N-byte pieces, in order
    # (large image files hash on every core, at checkpoint and at verify).
    chunk_bytes: int = Field(default=0, ge=0)

    @field_validator("chunk_bytes")
    @classmethod
    def _sane_chunks(cls, v: int) -> int:
        if 0 < v < 1 << 20:
            raise ValueError("chunk_bytes must be 0 or at least 1 MiB")
        return v


class StepTiming(BaseModel):
    step: str
    seconds: float


class WeightsRef(BaseModel):
    """Weights the worker maps from a weight service: not in the image; the restore asks the service for them."""

    socket: WorkerPath
    files: list[WorkerPath] = Field(max_length=100_000)
    hash: str = Field(pattern=r"^[0-9a-f]{16,128}$")  # content hash: a restore gets exactly these weights or fails
    bytes: Count
    device: str


class WorkerIdentity(BaseModel):
    """The checkpointed worker, as the restore needs to recreate its surroundings."""

    pid: Pid
    command: list[str] = Field(max_length=100_000)
    cwd: str = ""
    name: str | None = None
    engine: str = "plain"  # "plain" (no SDK), "reference", "vllm", "sglang", or an SDK-reported name
    model: str | None = None
    sdk: bool = False
    control_dir: WorkerPath | None = None  # the path the worker polls; each replica's own dir is mounted over it
    control_seq: Count = 0  # sequence number of the quiesce request; a resume must come after it
    log_path: WorkerPath | None = None  # the worker's stdout/stderr file; each replica's own log is mounted over it
    listen_ports: list[Port] = Field(default_factory=list, max_length=1024)
    port: Port | None = None  # the port the SDK reported serving on, forwarded to each replica
    gpu_bytes_to_remap: Count = 0  # GPU memory the worker released on quiesce and maps again on resume (KV cache)
    # Each replica gets these empty and its own (unix sockets).
    private_dirs: list[WorkerPath] = Field(default_factory=list, max_length=64)
    kv_released: bool = False  # an engine adapter released the KV cache on quiesce; resume must take it back
    # Every pid and thread id the image restores (its namespace's view).
    ids: list[Pid] = Field(default_factory=list, max_length=1 << 20)
    weights: list[WeightsRef] = Field(default_factory=list)


class GpuState(BaseModel):
    """One CUDA process of the tree and the GPU its memory was checkpointed from."""

    pid: Pid
    gpu_uuid: str
    gpu_name: str
    memory_bytes: Count = 0


class FileRanges(BaseModel):
    """Parts of a file the worker had mapped and touched (its working set), read ahead on a cold restore."""

    path: WorkerPath  # as the worker sees it
    size: Count  # at checkpoint: a file of another size now is not read
    ranges: list[tuple[Count, Count]]  # (offset, length) in bytes


class CriuSettings(BaseModel):
    version: str
    dump_args: list[str]


class TransformChoice(BaseModel):
    """Whether the checkpoint applied one of its image transforms (image/plan.py), and the figures why."""

    transform: Literal["zero_pages", "compress", "seal_behind"]
    image: str | None = Field(default=None, max_length=255)  # the pages image it was decided for; None: all
    applied: bool
    reason: str = Field(max_length=1000)


class Encryption(BaseModel):
    """How the artifact's process memory is sealed (artifact/encryption.py): the key's id and this artifact's salt."""

    algorithm: Literal["aes-256-gcm"]
    key: str = Field(pattern=r"^[0-9a-f]{16}$")
    salt: str = Field(pattern=r"^[0-9a-f]{32}$")


class RootfsDiff(BaseModel):
    """What the worker's container wrote over its image (image/rootfs.py): the files are in rootfs/diff.tar."""

    upper: str  # the overlay upper dir it was taken from, as this host saw it
    files: Count = 0
    bytes: Count = 0  # of regular files
    deleted: list[WorkerPath] = Field(default_factory=list, max_length=1 << 20)
    opaque: list[WorkerPath] = Field(default_factory=list, max_length=1 << 20)  # directories replaced whole
    skipped: list[WorkerPath] = Field(default_factory=list, max_length=1 << 20)  # sockets and devices
    excluded: list[WorkerPath] = Field(default_factory=list, max_length=4096)


class Manifest(BaseModel):
    schema_version: int = SCHEMA_VERSION
    warmstart_version: str
    created: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    worker: WorkerIdentity
    host: HostInfo
    criu: CriuSettings
    gpus: list[GpuState] = Field(default_factory=list)
    driver_version: str | None = None  # NVIDIA driver, e.g. "580.159.04"; restore refuses an older one
    cuda_version: str | None = None  # the CUDA version that driver supports, e.g. "13.0"
    steps: list[StepTiming] = Field(default_factory=list)
    image_bytes: Count = 0
    files: list[FileEntry] = Field(default_factory=list)
    working_set: list[FileRanges] = Field(default_factory=list)
    zero_bytes_dropped: Count = 0  # pages of zeros taken out of CRIU's image (image/zeropages.py)
    compressed_raw_bytes: Count = 0  # pages images stored compressed (image/codec.py): their raw size ...
    compressed_bytes: Count = 0  # ... and what they take in the artifact
    encryption: Encryption | None = None  # None: stored in the clear (WARMSTART_ENCRYPT=0)
    transforms: list[TransformChoice] = Field(default_factory=list, max_length=4096)
    rootfs: RootfsDiff | None = None  # None: the worker was in no overlay container, or nothing was taken

    def step_seconds(self) -> dict[str, float]:
        return {s.step: s.seconds for s in self.steps}
