"""GPU steps of the pipelines: which processes of a tree use CUDA, and checkpointing them all or none.

Decisions here are what to do with a tree; the driver calls themselves live in gpu/driver.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from warmstart import procs
from warmstart.artifact.manifest import GpuState
from warmstart.errors import IncompatibleArtifact, UsageError

if TYPE_CHECKING:
    from warmstart.gpu.driver import Gpu


def _opens_nvidia(pid: int) -> bool:
    return any(t.startswith("/dev/nvidia") for _, t in procs.fd_targets(pid))


def cuda_pids(root_pid: int) -> list[int]:
    """CUDA processes of the tree; [] at once on hosts without an NVIDIA device."""
    if not Path("/dev/nvidiactl").exists():
        return []
    from warmstart.gpu import driver as cuda

    return [p for p in procs.tree(root_pid) if _opens_nvidia(p) and cuda.is_cuda_process(p)]


def describe(pids: list[int]) -> list[GpuState]:
    from warmstart.gpu import driver as cuda

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
    from warmstart.gpu import driver as cuda

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


def resume(checkpointed: list[int], locked: list[int] | None = None, gpu_map: dict[str, str] | None = None) -> None:
    from warmstart.gpu import driver as cuda

    remap = gpu_map if gpu_map and any(old != new for old, new in gpu_map.items()) else None
    for p in checkpointed:
        cuda.restore(p, remap)
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


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split(".") if x.isdigit())


def _pick(requested: str, here: list["Gpu"]) -> "Gpu":
    for g in here:
        if requested == str(g.index) or requested == g.uuid or (len(requested) >= 8 and g.uuid.startswith(requested)):
            return g
    have = ", ".join(f"{g.index}={g.uuid} ({g.name})" for g in here) or "none"
    raise UsageError(f"no GPU {requested!r} on this host (GPUs: {have})", "pass --gpu INDEX or --gpu UUID of one of them")


def plan(
    states: list[GpuState],
    here: list["Gpu"],
    *,
    artifact_driver: str | None,
    here_driver: str | None,
    requested: str | None = None,
    replicas: int = 1,
    remap_bytes: int = 0,
) -> dict[str, str]:
    """Which local GPU takes each checkpointed GPU (old UUID -> new UUID), or refuse before anything starts.

    Default: the GPU it was on, else the first GPU of the same model with enough free memory for every
    replica. A pure function of what the artifact says and what this host has.
    """
    states = [s for s in states if s.gpu_name]  # processes that touched CUDA but held no GPU memory
    if not states:
        if requested is not None:
            raise UsageError("the artifact holds no GPU state, so --gpu has nothing to place", "leave out --gpu")
        return {}
    if not here:
        raise IncompatibleArtifact(f"artifact needs a {states[0].gpu_name}; this host has no GPU",
                                   "restore on a node with the same GPU model")
    if artifact_driver and here_driver and _version(here_driver) < _version(artifact_driver):
        raise IncompatibleArtifact(
            f"artifact was checkpointed with NVIDIA driver {artifact_driver}; this host has {here_driver}, which is older",
            f"restore on a node with driver >= {artifact_driver}, or upgrade this one")
    need: dict[str, int] = {}
    model: dict[str, str] = {}
    for s in states:
        need[s.gpu_uuid] = need.get(s.gpu_uuid, 0) + s.memory_bytes * replicas
        model[s.gpu_uuid] = s.gpu_name
    # What the worker maps again on resume (its KV cache) lands on the GPU of its first CUDA process.
    need[states[0].gpu_uuid] += remap_bytes * replicas
    if requested is not None and len(need) > 1:
        raise UsageError(f"the artifact spans {len(need)} GPUs; --gpu names one", "leave out --gpu")
    chosen: dict[str, str] = {}
    free = {g.uuid: g.free_bytes for g in here}
    for old, want in need.items():
        same = [g for g in here if g.name == model[old]]
        if requested is not None:
            target = _pick(requested, here)
            if target.name != model[old]:
                raise IncompatibleArtifact(f"artifact was checkpointed on {model[old]}; GPU {requested} is {target.name}",
                                           "pass a GPU of the same model, or leave out --gpu")
            candidates = [target]
        elif not same:
            raise IncompatibleArtifact(
                f"artifact was checkpointed on {model[old]}; this host has {', '.join(sorted({g.name for g in here}))}",
                "restore on a node with the same GPU model")
        else:
            candidates = sorted(same, key=lambda g: g.uuid != old)  # its own GPU first, then by index
        fits = [g for g in candidates if free[g.uuid] >= want]
        if not fits:
            best = max(candidates, key=lambda g: free[g.uuid])
            raise IncompatibleArtifact(
                f"{replicas} replica(s) need {want / 2**30:.1f} GiB on a {model[old]}; GPU {best.index} has "
                f"{free[best.uuid] / 2**30:.1f} GiB free", "free memory on the GPU, restore fewer replicas, or use another node")
        chosen[old] = fits[0].uuid
        free[fits[0].uuid] -= want
    return chosen


def plan_here(states: list[GpuState], artifact_driver: str | None, requested: str | None, replicas: int,
              remap_bytes: int = 0) -> dict[str, str]:
    if not [s for s in states if s.gpu_name]:
        return plan(states, [], artifact_driver=None, here_driver=None, requested=requested)  # no NVML needed
    from warmstart.gpu import driver as cuda

    return plan(states, cuda.gpus(), artifact_driver=artifact_driver, here_driver=cuda.driver_version(),
                requested=requested, replicas=replicas, remap_bytes=remap_bytes)
