"""warmstart: checkpoint warm inference workers and restore them in seconds.

The public API (docs/api.md) is re-exported here from warmstart.api, loaded on first use: a worker that
imports the SDK (warmstart.worker, standard library only) never loads the host side.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_API = ("Cancel", "CheckpointResult", "ReplicaResult", "RestoreResult", "WorkerRecord",
        "checkpoint", "gc", "restore", "restore_into", "run", "stop", "workers")

if TYPE_CHECKING:
    from warmstart.api import (
        Cancel,
        CheckpointResult,
        ReplicaResult,
        RestoreResult,
        WorkerRecord,
        checkpoint,
        gc,
        restore,
        restore_into,
        run,
        stop,
        workers,
    )


def __getattr__(name: str) -> Any:
    if name in _API:
        from warmstart import api

        return getattr(api, name)
    raise AttributeError(f"module 'warmstart' has no attribute {name!r}")


__all__ = ["__version__", "Cancel", "CheckpointResult", "ReplicaResult", "RestoreResult", "WorkerRecord",
           "checkpoint", "gc", "restore", "restore_into", "run", "stop", "workers"]
