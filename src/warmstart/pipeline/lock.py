"""One checkpoint of a worker at a time: an exclusive lock per process, which the kernel drops when its holder
exits, however it exits."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager

from warmstart import paths, procs
from warmstart.errors import WorkerError


@contextmanager
def worker_lock(pid: int) -> Iterator[None]:
    # Named by start time too: a pid reused by another process is another lock.
    path = paths.state_dir("locks") / f"{pid}-{procs.start_time(pid) or 0}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkerError(f"another checkpoint of process {pid} is running",
                              "wait for it to finish (or stop it), then checkpoint again") from None
        yield
    finally:
        os.close(fd)


def remove_stale() -> None:
    """Lock files of processes that are gone (`warmstart gc`)."""
    d = paths.state_dir("locks")
    for p in d.glob("*.lock"):
        pid, _, started = p.stem.partition("-")
        if pid.isdigit() and not procs.alive(int(pid), int(started) if started.isdigit() else None):
            p.unlink(missing_ok=True)
