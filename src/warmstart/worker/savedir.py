"""Where the checkpoint under way, or the restore, keeps what a worker saves outside its process image.

The SDK sets it from the quiesce request and again from the resume request: a directory of the artifact that
the worker may write during `on_quiesce` and read during `on_resume` (the same files, by then in the finished
artifact, checksummed with the rest). None when the worker must keep everything in its own memory, so in
CRIU's image: a worker in a container does not see the artifact's path. Kept GPU regions save their contents
here (warmstart.gpumem.region); any worker may put large state here too, under names of its own.
"""

from __future__ import annotations

_dir: str | None = None


def use(directory: str | None) -> None:
    global _dir
    _dir = directory


def get() -> str | None:
    """The directory, or None: keep state in memory."""
    return _dir
