"""GPU steps of the pipelines: which processes of a tree use CUDA, and checkpointing them all or none.

Decisions here are what to do with a tree; the driver calls themselves live in engine/cuda.py.
"""

from __future__ import annotations

from pathlib import Path

from warmstart import procs
from warmstart.artifact.manifest import GpuState
from warmstart.errors import IncompatibleArtifact


def _opens_nvidia(pid: int) -> bool:
    return any(t.startswith("/dev/nvidia") for _, t in procs.fd_targets(pid))


def cuda_pids(root_pid: int) -> list[int]:
    """CUDA processes of the tree; [] at once on hosts without an NVIDIA device."""
    if not Path("/dev/nvidiactl").exists():
        return []
    from warmstart.engine import cuda

    return [p for p in procs.tree(root_pid) if _opens_nvidia(p) and cuda.is_cuda_process(p)]


def describe(pids: list[int]) -> list[GpuState]:
    from warmstart.engine import cuda

    usage = cuda.process_gpu_memory()
    names = {g.uuid: g.name for g in cuda.gpus()}
    out = []
    for p in pids:
        # A process that initialised the driver but holds no context on any GPU (torch probing CUDA in a
        # CPU worker) is still checkpointed, but ties the artifact to no GPU: its uuid and name stay "".
        uuid, used = usage.get(p, ("", 0))
        out.append(GpuState(pid=p, gpu_uuid=uuid, gpu_name=names.get(uuid, ""), memory_bytes=used))
    return out


def suspend(pids: list[int], timeout_ms: int) -> None:
    """Lock every CUDA process, then checkpoint every one; on any failure put back what was done."""
    from warmstart.engine import cuda

    locked: list[int] = []
    done: list[int] = []
    try:
        for p in pids:
            cuda.lock(p, timeout_ms)
            locked.append(p)
        for p in pids:
            cuda.checkpoint(p)
            done.append(p)
    except BaseException:
        resume(done, locked)
        raise


def resume(checkpointed: list[int], locked: list[int] | None = None) -> None:
    from warmstart.engine import cuda

    for p in checkpointed:
        cuda.restore(p)
    for p in locked if locked is not None else checkpointed:
        cuda.unlock(p)


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


def check_fits(states: list[GpuState]) -> None:
    """Refuse, before anything starts, a GPU artifact this host cannot take."""
    if not states:
        return
    from warmstart.engine import cuda

    states = [s for s in states if s.gpu_name]
    if not states:
        return
    here = cuda.gpus()
    for s in states:
        same = [g for g in here if g.name == s.gpu_name]
        if not same:
            raise IncompatibleArtifact(
                f"artifact was checkpointed on {s.gpu_name}; this host has {', '.join(g.name for g in here) or 'no GPU'}",
                "restore on a node with the same GPU model")
        if not any(g.free_bytes >= s.memory_bytes for g in same):
            best = max(g.free_bytes for g in same)
            raise IncompatibleArtifact(
                f"no {s.gpu_name} here has {s.memory_bytes / 2**30:.1f} GiB free (most free: {best / 2**30:.1f} GiB)",
                "stop something on the GPU or restore on another node")
