"""Which local GPU takes each checkpointed GPU, or a refusal before anything starts: a pure function of what
the artifact says and what this host has (plan), and its call with this host's GPUs (plan_here). Its
refusals of the driver, the GPU count and the GPU models are gates (warmstart.gates): bypassable by name."""

from __future__ import annotations

from collections.abc import Callable, Collection

from warmstart import gates
from warmstart.artifact.manifest import GpuState
from warmstart.errors import IncompatibleArtifact, UsageError
from warmstart.gpu import driver


def _pick(requested: str, here: list[driver.Gpu]) -> driver.Gpu:
    for g in here:
        if requested in (str(g.index), g.uuid) or (len(requested) >= 8 and g.uuid.startswith(requested)):
            return g
    have = ", ".join(f"{g.index}={g.uuid} ({g.name})" for g in here) or "none"
    raise UsageError(f"no GPU {requested!r} on this host (GPUs: {have})",
                     "pass --gpu INDEX or --gpu UUID of one of them")


def _needs(states: list[GpuState], replicas: int, remap_bytes: int) -> tuple[dict[str, int], dict[str, str]]:
    """Bytes each checkpointed GPU needs for every replica, and its model."""
    need: dict[str, int] = {}
    model: dict[str, str] = {}
    for s in states:
        need[s.gpu_uuid] = need.get(s.gpu_uuid, 0) + s.memory_bytes * replicas
        model[s.gpu_uuid] = s.gpu_name
    # What the worker maps again on resume (its KV cache) lands on the GPU of its first CUDA process.
    need[states[0].gpu_uuid] += remap_bytes * replicas
    return need, model


def _gates(need: dict[str, int], model: dict[str, str], here: list[driver.Gpu], artifact_driver: str | None,
           here_driver: str | None, requested: str | None) -> list[gates.Result]:
    models = sorted(set(model.values()))
    count = gates.gpu_count(len(need), len(here), models[0])
    if not here:
        return [count]  # the driver and the models have nothing to compare with
    if requested is not None:
        target = _pick(requested, here)
        kinds = [gates.gpu_model(m, [target.name], f"GPU {requested} is",
                                 "pass a GPU of the same model, or leave out --gpu") for m in models]
    else:
        kinds = [gates.gpu_model(m, [g.name for g in here]) for m in models]
    return [gates.driver(artifact_driver, here_driver), count, *kinds]


def _candidates(old: str, model: str, requested: str | None, here: list[driver.Gpu]) -> list[driver.Gpu]:
    if requested is not None:
        return [_pick(requested, here)]
    same = [g for g in here if g.name == model] or here  # none of its model: the gpu-model gate was bypassed
    return sorted(same, key=lambda g: g.uuid != old)  # its own GPU first, then by index


def plan(
    states: list[GpuState],
    here: list[driver.Gpu],
    *,
    artifact_driver: str | None,
    here_driver: str | None,
    requested: str | None = None,
    replicas: int = 1,
    remap_bytes: int = 0,
    skip: Collection[str] = (),
    report: Callable[[str], None] = lambda _: None,
) -> dict[str, str]:
    """Old UUID -> new UUID for each checkpointed GPU. Default: the GPU it was on, else the first GPU of the
    same model with enough free memory for every replica. skip: the gates bypassed; report: hears the gates
    bypassed or not evaluated."""
    states = [s for s in states if s.gpu_name]  # processes that touched CUDA but held no GPU memory
    if not states:
        if requested is not None:
            raise UsageError("the artifact holds no GPU state, so --gpu has nothing to place", "leave out --gpu")
        return {}
    need, model = _needs(states, replicas, remap_bytes)
    if requested is not None and len(need) > 1:
        raise UsageError(f"the artifact spans {len(need)} GPUs; --gpu names one", "leave out --gpu")
    gates.enforce(_gates(need, model, here, artifact_driver, here_driver, requested), skip, report)
    if not here:
        raise IncompatibleArtifact(f"artifact needs a {states[0].gpu_name}; this host has no GPU to restore it onto",
                                   "restore on a node with the same GPU model")
    chosen: dict[str, str] = {}
    free = {g.uuid: g.free_bytes for g in here}
    for old, want in need.items():
        candidates = _candidates(old, model[old], requested, here)
        fits = [g for g in candidates if free[g.uuid] >= want]
        if not fits:
            best = max(candidates, key=lambda g: free[g.uuid])
            raise IncompatibleArtifact(
                f"{replicas} replica(s) need {want / 2**30:.1f} GiB on a {model[old]}; GPU {best.index} has "
                f"{free[best.uuid] / 2**30:.1f} GiB free",
                "free memory on the GPU, restore fewer replicas, or use another node")
        chosen[old] = fits[0].uuid
        free[fits[0].uuid] -= want
    return chosen


def plan_here(states: list[GpuState], artifact_driver: str | None, requested: str | None, replicas: int,
              remap_bytes: int = 0, skip: Collection[str] = (),
              report: Callable[[str], None] = lambda _: None) -> dict[str, str]:
    if not [s for s in states if s.gpu_name]:
        return plan(states, [], artifact_driver=None, here_driver=None, requested=requested)  # no NVML needed
    return plan(states, driver.gpus(), artifact_driver=artifact_driver, here_driver=driver.driver_version(),
                requested=requested, replicas=replicas, remap_bytes=remap_bytes, skip=skip, report=report)
