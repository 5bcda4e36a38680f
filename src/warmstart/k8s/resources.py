"""The names warmstart uses in Kubernetes, and the Checkpoint custom resource's spec and status.

A Checkpoint (warmstart.dev/v1alpha1, namespaced) says what a compatible artifact is — engine, model, the
container image, the GPU model and the engine's arguments, hashed into `spec.identity` — and where it is
stored. Its status is written only by the node agent that made it, including `imageID`: the digest of the
source container's image as its runtime reported it, which a restore target's image must match (image-digest).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, Field

GROUP = "warmstart.dev"
VERSION = "v1alpha1"
PLURAL = "checkpoints"
KIND = "Checkpoint"

SOURCE_LABEL = f"{GROUP}/checkpoint-source"  # "true": checkpoint this pod once it is Ready
TARGET_LABEL = f"{GROUP}/restore-target"  # <checkpoint name>: restore into this placeholder pod
NAME_ANNOTATION = f"{GROUP}/checkpoint-name"  # on a source pod: the Checkpoint to write (default: pod name)
CONTAINER_ANNOTATION = f"{GROUP}/container"  # which container holds the worker (default: the first)
RESTORED_CONDITION = f"{GROUP}/restored"  # pod condition, for a readinessGate on restore targets
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"  # node label set by NVIDIA's GPU feature discovery
ROOTFS_EXCLUDE_ANNOTATION = f"{GROUP}/rootfs-exclude"  # on a source pod: "/root/.cache,/tmp/x", left out of its diff
SKIP_GATES_ANNOTATION = f"{GROUP}/skip-gates"  # on a restore target: "kernel,driver", gates to bypass
SKIP_GATES_HINT = f'the pod annotation {SKIP_GATES_ANNOTATION}: "{{gate}}"'  # gates.Refusal.line's bypass

Phase = Literal["Pending", "Checkpointing", "Ready", "Failed"]


class Storage(BaseModel):
    claim: str = Field(description="ReadWriteMany PersistentVolumeClaim holding artifacts")
    path: str = Field(description="artifact directory inside the volume")


class CheckpointSpec(BaseModel):
    engine: str = "plain"
    model: str = ""
    image: str
    gpu_model: str = Field("", alias="gpuModel")
    args: list[str] = Field(default_factory=list)
    storage: Storage

    model_config = {"populate_by_name": True}

    def identity(self) -> str:
        """What a restore target must match: everything but where the artifact is stored."""
        key = {"engine": self.engine, "model": self.model, "image": self.image, "gpuModel": self.gpu_model,
               "args": self.args}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    def body(self) -> dict[str, Any]:
        return {**self.model_dump(by_alias=True), "identity": self.identity()}


def condition(ctype: str, ok: bool, reason: str, message: str, now: str) -> dict[str, Any]:
    return {"type": ctype, "status": "True" if ok else "False", "reason": reason, "message": message,
            "lastTransitionTime": now}
