"""The one interface the pipelines quiesce a worker through, whatever the mechanism behind it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


@dataclass
class QuiesceReport:
    """What the worker said when it quiesced: the checkpoint records it in the manifest."""

    control_seq: int = 0  # the SDK's request number; a restore's resume must come after it
    gpu_bytes_to_remap: int = 0  # GPU memory the worker released and maps again on resume
    weights: list[dict[str, Any]] = field(default_factory=list)  # weight-service sets it maps on resume
    kv_released: bool = False  # an engine released its KV cache; the resume takes it back


class Quiescer(Protocol):
    """quiesce() stops the worker's work and releases what need not be in the image; resume() brings the same
    process back (a checkpoint that leaves it running); cancel() undoes a quiesce after a failed checkpoint and
    never raises (the checkpoint's own error is what the user sees)."""

    name: str
    saves_files: bool  # the worker may save files beside its image (kept GPU regions): it needs a directory

    def quiesce(self, saved: Path | None) -> QuiesceReport: ...

    def resume(self) -> None: ...

    def cancel(self) -> None: ...

    def release(self) -> None:
        """The checkpoint is over and its worker is being stopped: let go of it (no resume)."""
