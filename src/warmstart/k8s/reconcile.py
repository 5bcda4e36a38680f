"""What the node agent does about one pod: a pure decision on the pod's and Checkpoints' JSON as the API serves it.

Sources (label checkpoint-source: "true") are checkpointed once Ready, once per Checkpoint name. Restore
targets (label restore-target: <name>) are restored into once their placeholder container runs and the named
Checkpoint is Ready and matches them (image, GPU model, and engine/model when the pod names them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeGuard

from warmstart import gates
from warmstart.errors import UsageError
from warmstart.k8s.resources import (
    CONTAINER_ANNOTATION,
    GPU_PRODUCT_LABEL,
    GROUP,
    NAME_ANNOTATION,
    RESTORED_CONDITION,
    ROOTFS_EXCLUDE_ANNOTATION,
    SKIP_GATES_ANNOTATION,
    SKIP_GATES_HINT,
    SOURCE_LABEL,
    TARGET_LABEL,
    CheckpointSpec,
    Storage,
)

ENGINE_ANNOTATION = f"{GROUP}/engine"
MODEL_ANNOTATION = f"{GROUP}/model"

Obj = dict[str, Any]


@dataclass(frozen=True)
class _Because:
    reason: str


class Ignore(_Because):
    """Nothing to do, now or later."""


class Wait(_Because):
    """Nothing to do yet: a later event will bring the pod back."""


class Refuse(_Because):
    """A restore target that can never be served by its Checkpoint: say why on the pod, leave it clean."""


@dataclass(frozen=True)
class Checkpoint:
    name: str
    namespace: str
    container_id: str
    spec: CheckpointSpec
    image_id: str = ""  # the container's image digest as its runtime reports it (status.imageID); "": unknown
    rootfs_exclude: tuple[str, ...] = ()  # container paths left out of what it wrote over its image


@dataclass(frozen=True)
class Restore:
    name: str  # the Checkpoint
    namespace: str
    container_id: str
    artifact: str  # path inside the artifact volume
    skip_gates: frozenset[str] = frozenset()  # the pod's skip-gates annotation, for the restore's own gates
    notices: tuple[str, ...] = ()  # gates bypassed (warmstart.gates.WARNING) or not evaluated (NOTE) here


Action = Ignore | Wait | Refuse | Checkpoint | Restore


def _meta(pod: Obj, key: str) -> dict[str, str]:
    return pod.get("metadata", {}).get(key) or {}


def _container(pod: Obj) -> tuple[Obj | None, Obj | None]:
    """(spec, status) of the container holding the worker: the annotated one, else the first."""
    containers = pod.get("spec", {}).get("containers") or []
    if not containers:
        return None, None
    want = _meta(pod, "annotations").get(CONTAINER_ANNOTATION, containers[0]["name"])
    spec = next((c for c in containers if c["name"] == want), None)
    status = next((s for s in pod.get("status", {}).get("containerStatuses") or [] if s["name"] == want), None)
    return spec, status


def _condition(pod: Obj, ctype: str) -> bool:
    return any(c.get("type") == ctype and c.get("status") == "True"
               for c in pod.get("status", {}).get("conditions") or [])


def _running(status: Obj | None) -> TypeGuard[Obj]:
    """The container runs, and its status names it (containerID)."""
    return bool(status and "running" in (status.get("state") or {}) and status.get("containerID"))


def decide(pod: Obj, node: str, node_labels: dict[str, str], checkpoints: dict[str, Obj], claim: str) -> Action:
    labels = _meta(pod, "labels")
    name = pod.get("metadata", {}).get("name", "?")
    if pod.get("spec", {}).get("nodeName") != node:
        return Ignore(f"pod {name} is not on node {node}")
    if pod.get("metadata", {}).get("deletionTimestamp"):
        return Ignore(f"pod {name} is being deleted")
    if labels.get(SOURCE_LABEL) == "true":
        return _source(pod, node_labels, checkpoints, claim)
    if labels.get(TARGET_LABEL):
        return _target(pod, node_labels, checkpoints)
    return Ignore(f"pod {name} has no warmstart label")


def concerns(pod: Obj, name: str, namespace: str, deleted: bool) -> bool:
    """Whether a change of Checkpoint namespace/name is news for the pod: a target waits for it to end Ready or
    Failed; a source whose Checkpoint was deleted is to be checkpointed again."""
    if pod["metadata"].get("namespace") != namespace:
        return False
    labels = _meta(pod, "labels")
    if deleted:
        return labels.get(SOURCE_LABEL) == "true" and _checkpoint_name(pod) == name
    return labels.get(TARGET_LABEL) == name


def _checkpoint_name(source: Obj) -> str:
    return str(_meta(source, "annotations").get(NAME_ANNOTATION, source["metadata"]["name"]))


def _source(pod: Obj, node_labels: dict[str, str], checkpoints: dict[str, Obj], claim: str) -> Action:
    meta = pod["metadata"]
    spec, status = _container(pod)
    if spec is None or not _running(status) or not _condition(pod, "Ready"):
        return Wait(f"source pod {meta['name']} is not Ready yet")
    cname = _checkpoint_name(pod)
    existing = checkpoints.get(cname)
    if existing:
        phase = (existing.get("status") or {}).get("phase", "Pending")
        if phase == "Failed":
            return Ignore(f"Checkpoint {cname} failed ({existing['status'].get('reason', '')}); delete it to retry")
        if phase in ("Checkpointing", "Ready"):
            return Ignore(f"Checkpoint {cname} is already {phase}")
    annotations = _meta(pod, "annotations")
    cspec = CheckpointSpec(
        engine=annotations.get(ENGINE_ANNOTATION, "plain"),
        model=annotations.get(MODEL_ANNOTATION, ""),
        image=spec["image"],
        gpuModel=node_labels.get(GPU_PRODUCT_LABEL, ""),
        args=[*(spec.get("command") or []), *(spec.get("args") or [])],
        storage=Storage(claim=claim, path=f"{meta['namespace']}/{cname}"),
    )
    exclude = tuple(p.strip() for p in annotations.get(ROOTFS_EXCLUDE_ANNOTATION, "").split(",") if p.strip())
    return Checkpoint(name=cname, namespace=meta["namespace"], container_id=status["containerID"], spec=cspec,
                      image_id=status.get("imageID") or "", rootfs_exclude=exclude)


def _target(pod: Obj, node_labels: dict[str, str], checkpoints: dict[str, Obj]) -> Action:
    meta = pod["metadata"]
    cname = _meta(pod, "labels")[TARGET_LABEL]
    if _condition(pod, RESTORED_CONDITION):
        return Ignore(f"pod {meta['name']} is already restored")
    failed = next((c for c in pod.get("status", {}).get("conditions") or []
                   if c.get("type") == RESTORED_CONDITION and c.get("status") == "False"), None)
    if failed:  # final, as a Failed Checkpoint is: every later update of the pod would restore into it again
        return Ignore(f"pod {meta['name']} was refused ({failed.get('message', '')}); delete it to try again")
    spec, status = _container(pod)
    if spec is None or not _running(status):
        return Wait(f"placeholder container of {meta['name']} is not running yet")
    existing = checkpoints.get(cname)
    if existing is None:
        return Wait(f"no Checkpoint {cname} in namespace {meta['namespace']} yet")
    st = existing.get("status") or {}
    phase = st.get("phase", "Pending")
    if phase == "Failed":
        return Refuse(f"Checkpoint {cname} failed: {st.get('reason', 'unknown')}")
    if phase != "Ready":
        return Wait(f"Checkpoint {cname} is {phase}")
    try:
        skip = gates.parse_skip([_meta(pod, "annotations").get(SKIP_GATES_ANNOTATION, "")])
    except UsageError as e:
        return Refuse(f"annotation {SKIP_GATES_ANNOTATION} of pod {meta['name']}: {e.line()}")
    want = existing["spec"]
    verdict = gates.judge(_gates(want, st, status, node_labels), skip)
    problems = _mismatches(pod, spec, want) + [r.line(SKIP_GATES_HINT) for r in verdict.refused]
    if problems:
        return Refuse(f"Checkpoint {cname} does not match pod {meta['name']}: " + "; ".join(problems))
    artifact = str(st.get("artifact") or want["storage"]["path"])
    if not inside_namespace(artifact, meta["namespace"]):
        return Refuse(f"Checkpoint {cname}'s artifact {artifact!r} is not inside namespace {meta['namespace']}'s "
                      "own directory of the artifact volume")
    return Restore(name=cname, namespace=meta["namespace"], container_id=status["containerID"], artifact=artifact,
                   skip_gates=skip, notices=tuple(verdict.notices()))


def inside_namespace(path: str, namespace: str) -> bool:
    """An artifact path a pod of `namespace` may use: relative, normal, under `namespace/` of the volume, so
    that a Checkpoint in one namespace cannot point its restores at another's artifacts."""
    parts = path.split("/")
    return len(parts) >= 2 and parts[0] == namespace and all(p not in ("", ".", "..") for p in parts)


def already_refused(pod: Obj, reason: str) -> bool:
    """The pod already carries this refusal: the same update again (or the echo of the agent's own patch)
    must change nothing and emit nothing."""
    return any(c.get("type") == RESTORED_CONDITION and c.get("status") == "False" and c.get("message") == reason
               for c in pod.get("status", {}).get("conditions") or [])


def _gates(want: Obj, st: Obj, status: Obj, node_labels: dict[str, str]) -> list[gates.Result]:
    """The gates a target's pod and node decide: the node's GPU label, the placeholder's image digest."""
    digest = gates.image_digest(st.get("imageID") or "", status.get("imageID") or "")
    if not want.get("gpuModel"):  # a CPU worker's checkpoint names none
        return [digest]
    gpu_here = node_labels.get(GPU_PRODUCT_LABEL, "")
    return [gates.gpu_model(want["gpuModel"], [gpu_here] if gpu_here else [], "this node's GPU is"), digest]


def _mismatches(pod: Obj, spec: Obj, want: Obj) -> list[str]:
    """Why a restore target (its pod, its container's spec) is not for a Checkpoint of spec `want`: not gates,
    since they name what the Checkpoint is."""
    problems = []
    if want.get("image") != spec["image"]:
        problems.append(f"image {spec['image']} differs from the checkpoint's {want.get('image')}")
    annotations = _meta(pod, "annotations")
    for key, field in ((ENGINE_ANNOTATION, "engine"), (MODEL_ANNOTATION, "model")):
        if key in annotations and annotations[key] != want.get(field):
            problems.append(f"{field} {annotations[key]} differs from the checkpoint's {want.get(field)}")
    return problems
