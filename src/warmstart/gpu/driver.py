"""The CUDA driver's checkpoint API (cuda-bindings), called in-process: no helper process per call.

lock (waits for in-flight work, up to a timeout) -> checkpoint (GPU memory into the process's host memory)
-> [CRIU dump / restore] -> restore (back onto a GPU) -> unlock. cuda-bindings is imported on first use,
so hosts without a GPU never need it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from warmstart.errors import EnvironmentProblem, StepFailed, WorkerError

STATES = {0: "running", 1: "locked", 2: "checkpointed", 3: "failed"}


@functools.lru_cache(maxsize=1)
def _driver() -> Any:
    try:
        from cuda.bindings import driver
    except ImportError as e:
        raise EnvironmentProblem("cuda-bindings is not installed, so GPU workers cannot be checkpointed",
                                 "pip install 'warmstart[gpu]' (needs an NVIDIA driver >= 570)") from e
    (err,) = driver.cuInit(0)
    if err != driver.CUresult.CUDA_SUCCESS:
        raise EnvironmentProblem(f"the CUDA driver did not initialise ({_name(driver, err)})",
                                 "check the NVIDIA driver is loaded (nvidia-smi)")
    if not hasattr(driver, "cuCheckpointProcessLock"):
        raise EnvironmentProblem("this cuda-bindings has no checkpoint API", "upgrade cuda-bindings to >= 12.8")
    err, version = driver.cuDriverGetVersion()
    if err == driver.CUresult.CUDA_SUCCESS and version < MIN_CUDA_DRIVER_API:
        raise EnvironmentProblem(
            f"driver too old for checkpoint: it supports CUDA {version // 1000}.{version % 1000 // 10}, "
            "the checkpoint API needs CUDA 12.8 (driver >= R570)", "upgrade the NVIDIA driver to R570 or newer")
    return driver


# cuCheckpointProcess* with lock timeouts and GPU remapping arrived with CUDA 12.8 / driver R570.
MIN_CUDA_DRIVER_API = 12080


def cuda_version() -> str | None:
    """The CUDA version the driver supports, e.g. '13.0'."""
    try:
        d = _driver()
    except Exception:
        return None
    err, v = d.cuDriverGetVersion()
    return f"{v // 1000}.{v % 1000 // 10}" if err == d.CUresult.CUDA_SUCCESS else None


def _name(driver: Any, err: Any) -> str:
    try:
        name: str = err.name
        return name
    except AttributeError:
        return str(err)


def _check(err: Any, op: str, pid: int) -> None:
    d = _driver()
    if err == d.CUresult.CUDA_SUCCESS:
        return
    name = _name(d, err)
    if name == "CUDA_ERROR_NOT_SUPPORTED" and op in ("state", "restore thread id"):
        raise WorkerError(f"process {pid} is not a CUDA process", "pass the pid of the process that uses the GPU")
    if name == "CUDA_ERROR_NOT_SUPPORTED":
        # Seen on driver 580 for a process holding managed memory (bench/reach/counter.cu --managed).
        raise EnvironmentProblem(
            f"the NVIDIA driver cannot {op} process {pid} ({name}): it holds GPU memory the driver's checkpoint "
            "does not support (managed memory from cudaMallocManaged, or CUDA IPC / imported memory), or the driver "
            "is older than 570",
            "allocate with cudaMalloc and close IPC handles before checkpointing, or use driver >= 570; "
            "the process was left running")
    if name == "CUDA_ERROR_ILLEGAL_STATE":
        raise StepFailed(f"CUDA {op} of process {pid} refused: the process is {state_name(pid)}",
                         "another checkpoint may hold it; check `warmstart cuda-checkpoint --get-state --pid PID`")
    if name == "CUDA_ERROR_TIMEOUT" or (op == "lock" and name == "CUDA_ERROR_NOT_READY"):
        raise WorkerError(f"process {pid} did not reach a lockable point in time (busy on the GPU)",
                          "retry when it is idle, or raise --timeout")
    raise StepFailed(f"CUDA {op} of process {pid} failed: {name}", "run with --debug; see the worker's log")


def state(pid: int) -> str:
    d = _driver()
    err, st = d.cuCheckpointProcessGetState(pid)
    _check(err, "state", pid)
    return STATES.get(int(st), str(st))


def state_name(pid: int) -> str:
    try:
        return state(pid)
    except Exception:
        return "in an unknown state"


def restore_thread_id(pid: int) -> int:
    d = _driver()
    err, tid = d.cuCheckpointProcessGetRestoreThreadId(pid)
    _check(err, "restore thread id", pid)
    return int(tid)


def is_cuda_process(pid: int) -> bool:
    d = _driver()
    err, _ = d.cuCheckpointProcessGetRestoreThreadId(pid)
    ok: bool = err == d.CUresult.CUDA_SUCCESS
    return ok


def lock(pid: int, timeout_ms: int = 10_000) -> None:
    d = _driver()
    args = d.CUcheckpointLockArgs()
    args.timeoutMs = timeout_ms
    _check(d.cuCheckpointProcessLock(pid, args)[0], "lock", pid)


def checkpoint(pid: int) -> None:
    d = _driver()
    _check(d.cuCheckpointProcessCheckpoint(pid, None)[0], "checkpoint", pid)


def uuid_bytes(uuid: str) -> bytes:
    """NVML's 'GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx' as the driver's 16 bytes."""
    hexpart = uuid.removeprefix("GPU-").replace("-", "")
    try:
        raw = bytes.fromhex(hexpart)
    except ValueError:
        raw = b""
    if len(raw) != 16:
        raise ValueError(f"not a GPU UUID: {uuid!r}")
    return raw


def _cu_uuid(d: Any, uuid: str) -> Any:
    import ctypes

    u = d.CUuuid()
    ctypes.memmove(u.getPtr(), uuid_bytes(uuid), 16)
    return u


def restore(pid: int, gpu_map: dict[str, str] | None = None) -> None:
    """Bring the GPU state back; gpu_map (old UUID -> new UUID) moves it onto other GPUs of the same model."""
    d = _driver()
    args = None
    if gpu_map:
        pairs = []
        for old, new in gpu_map.items():
            pair = d.CUcheckpointGpuPair()
            pair.oldUuid = _cu_uuid(d, old)
            pair.newUuid = _cu_uuid(d, new)
            pairs.append(pair)
        args = d.CUcheckpointRestoreArgs()
        args.gpuPairs = pairs
        args.gpuPairsCount = len(pairs)
    _check(d.cuCheckpointProcessRestore(pid, args)[0], "restore", pid)


def unlock(pid: int) -> None:
    d = _driver()
    _check(d.cuCheckpointProcessUnlock(pid, None)[0], "unlock", pid)


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str
    name: str
    total_bytes: int
    free_bytes: int


def gpus() -> list[Gpu]:
    """The GPUs this host has, from NVML (nvidia-ml-py), with free memory."""
    try:
        import pynvml  # nvidia-ml-py: optional here
    except ImportError:
        return []
    pynvml.nvmlInit()
    out = []
    for i in range(pynvml.nvmlDeviceGetCount()):
        h = pynvml.nvmlDeviceGetHandleByIndex(i)
        mem = pynvml.nvmlDeviceGetMemoryInfo(h)
        name = pynvml.nvmlDeviceGetName(h)
        uuid = pynvml.nvmlDeviceGetUUID(h)
        out.append(Gpu(i, uuid if isinstance(uuid, str) else uuid.decode(),
                       name if isinstance(name, str) else name.decode(), int(mem.total), int(mem.free)))
    return out


def process_gpu_memory() -> dict[int, tuple[str, int]]:
    """pid -> (GPU UUID, bytes used) for every compute process NVML sees."""
    try:
        import pynvml
    except ImportError:
        return {}
    pynvml.nvmlInit()
    out: dict[int, tuple[str, int]] = {}
    for g in gpus():
        h = pynvml.nvmlDeviceGetHandleByIndex(g.index)
        for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h):
            out[int(p.pid)] = (g.uuid, int(p.usedGpuMemory or 0))
    return out


def driver_version() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v if isinstance(v, str) else v.decode()
    except Exception:
        return None
