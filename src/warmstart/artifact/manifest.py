"""The manifest: what an artifact holds, where it came from, and how long each step took."""

from __future__ import annotations

from datetime import datetime, timezone

from pydantic import BaseModel, Field, field_validator

from warmstart.host import HostInfo

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
IMAGES_DIR = "images"
SHM_DIR = "shm"  # the worker's /dev/shm segments, placed in each replica's own /dev/shm
SAVED_DIR = "saved"  # what the worker saved outside its image (kept GPU regions), read back by each replica


class FileEntry(BaseModel):
    path: str  # relative to the artifact directory, '/'-separated
    size: int
    sha256: str
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

    socket: str
    files: list[str]
    hash: str  # content hash: a restore gets exactly these weights or fails
    bytes: int
    device: str


class WorkerIdentity(BaseModel):
    """The checkpointed worker, as the restore needs to recreate its surroundings."""

    pid: int
    command: list[str]
    cwd: str = ""
    name: str | None = None
    engine: str = "plain"  # "plain" (no SDK), "reference", "vllm", "sglang", or an SDK-reported name
    model: str | None = None
    sdk: bool = False
    control_dir: str | None = None  # the path the worker polls; each replica's own dir is mounted over it
    control_seq: int = 0  # sequence number of the quiesce request; a resume must come after it
    log_path: str | None = None  # the worker's stdout/stderr file; each replica's own log is mounted over it
    listen_ports: list[int] = Field(default_factory=list)
    port: int | None = None  # the port the SDK reported serving on, forwarded to each replica
    gpu_bytes_to_remap: int = 0  # GPU memory the worker released on quiesce and maps again on resume (KV cache)
    private_dirs: list[str] = Field(default_factory=list)  # each replica gets these empty and its own (unix sockets)
    kv_released: bool = False  # an engine adapter released the KV cache on quiesce; resume must take it back
    ids: list[int] = Field(default_factory=list)  # every pid and thread id the image restores (its namespace's view)
    weights: list[WeightsRef] = Field(default_factory=list)


class GpuState(BaseModel):
    """One CUDA process of the tree and the GPU its memory was checkpointed from."""

    pid: int
    gpu_uuid: str
    gpu_name: str
    memory_bytes: int = 0


class FileRanges(BaseModel):
    """Parts of a file the worker had mapped and touched (its working set), read ahead on a cold restore."""

    path: str  # as the worker sees it
    size: int  # at checkpoint: a file of another size now is not read
    ranges: list[tuple[int, int]]  # (offset, length) in bytes


class CriuSettings(BaseModel):
    version: str
    dump_args: list[str]


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
    image_bytes: int = 0
    files: list[FileEntry] = Field(default_factory=list)
    working_set: list[FileRanges] = Field(default_factory=list)
    zero_bytes_dropped: int = 0  # pages of zeros taken out of CRIU's image (image/zeropages.py)
    compressed_raw_bytes: int = 0  # pages images stored compressed (image/codec.py): their raw size ...
    compressed_bytes: int = 0  # ... and what they take in the artifact

    def step_seconds(self) -> dict[str, float]:
        return {s.step: s.seconds for s in self.steps}
