"""The CUDA processes of a tree: finding them, describing their GPUs, and checkpointing them all or none.

The driver calls themselves live in gpu/driver.py; where a restore puts them, in gpu/placement.py.
"""

from __future__ import annotations

from pathlib import Path

from warmstart import procs
from warmstart.artifact.manifest import GpuState
from warmstart.gpu import driver


def _opens_nvidia(pid: int) -> bool:
    return any(t.startswith("/dev/nvidia") for _, t in procs.fd_targets(pid))


def cuda_pids(root_pid: int) -> list[int]:
    """CUDA processes of the tree; [] at once on hosts without an NVIDIA device."""
    if not Path("/dev/nvidiactl").exists():
        return []
    return [p for p in procs.tree(root_pid) if _opens_nvidia(p) and driver.is_cuda_process(p)]


def describe(pids: list[int]) -> list[GpuState]:
    usage = driver.process_gpu_memory()
    names = {g.uuid: g.name for g in driver.gpus()}
    out = []
    for p in pids:
        # A process that initialised the driver but holds no context on any GPU (torch probing CUDA in a
        # CPU worker) is still checkpointed, but ties the artifact to no GPU: its uuid and name stay "".
        uuid, used = usage.get(p, ("", 0))
        out.append(GpuState(pid=p, gpu_uuid=uuid, gpu_name=names.get(uuid, ""), memory_bytes=used))
    return out


def suspend(pids: list[int], timeout_ms: int) -> None:
    """Lock every CUDA process, then checkpoint every one; on any failure put back what was done."""
    locked: list[int] = []
    done: list[int] = []
    try:
        for p in pids:
            driver.lock(p, timeout_ms)
            locked.append(p)
        for p in pids:
            driver.checkpoint(p)
            done.append(p)
    except BaseException:
        resume(done, locked)
        raise


def resume(checkpointed: list[int], locked: list[int] | None = None, gpu_map: dict[str, str] | None = None) -> None:
    remap = gpu_map if gpu_map and any(old != new for old, new in gpu_map.items()) else None
    for p in checkpointed:
        driver.restore(p, remap)
    for p in locked if locked is not None else checkpointed:
        driver.unlock(p)


def host_pids(root_host_pid: int, ns_pids: list[int]) -> list[int]:
    """Host pids of the restored processes that had `ns_pids` (their pids inside the replica)."""
    by_ns: dict[int, int] = {}
    for hp in procs.tree(root_host_pid):
        try:
            status = Path(f"/proc/{hp}/status").read_text()
        except FileNotFoundError:
            continue
        for line in status.splitlines():
            if line.startswith("NSpid:"):
                by_ns[int(line.split()[-1])] = hp
    return [by_ns[p] for p in ns_pids if p in by_ns]
