"""The first process of a restore-target (placeholder) container: it holds the pod's namespaces and waits.

The node agent restores a worker into this process's namespaces (`warmstart restore --into PID`); the worker
then becomes its child. As a pid-namespace init it reaps every orphan, and it exits with the worker's status
when the worker ends, so Kubernetes restarts the container as it would a crashed server.
"""

from __future__ import annotations

import os
import signal
import sys
import time


def run() -> int:
    worker: int | None = None

    def stop(signum: int, _frame: object) -> None:
        if worker is not None:
            try:
                os.kill(worker, signal.SIGTERM)
            except ProcessLookupError:
                pass
        else:
            sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while True:
        if worker is None:
            kids = _children()  # a restored worker becomes our child without a fork of ours
            worker = kids[0] if kids else None
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            pid, status = 0, 0
        if pid and pid == worker:
            return os.waitstatus_to_exitcode(status)
        if not pid:
            time.sleep(0.1)


def _children() -> list[int]:
    try:
        raw = open(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read()
    except OSError:
        return []
    return [int(p) for p in raw.split()]
