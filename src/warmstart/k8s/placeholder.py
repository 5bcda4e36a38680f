"""The first process of a warmstart container: it holds the pod's namespaces, and starts or receives the worker.

In a restore target (`warmstart placeholder`) the node agent restores a worker into this process's namespaces
(`warmstart restore --into PID`) and the worker becomes its child. In a checkpoint source
(`warmstart placeholder -- CMD...`) it starts CMD as its child, in a session of its own with io_uring refused,
so that the worker is never the namespace's pid 1 and can be restored into another pod's placeholder. Either
way it reaps every orphan, and exits with the worker's status when the worker ends, so Kubernetes restarts
the container as it would a crashed server.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from warmstart import linux
from warmstart.criu import seccomp


def run(command: list[str] | None = None) -> int:
    worker: int | None = None
    if command:
        worker = _spawn(command)

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


def _spawn(command: list[str]) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            _refuse_io_uring()
            os.execvp(command[0], command)
        except BaseException as e:
            print(f"warmstart placeholder: cannot start {command[0]}: {e}", file=sys.stderr)
        os._exit(127)
    return pid


def _refuse_io_uring() -> None:
    """The io_uring filter, also where root lacks CAP_SYS_ADMIN (a container's, unprivileged): the kernel then
    takes a seccomp filter only from a process with no_new_privs set."""
    try:
        seccomp.refuse_io_uring()
    except PermissionError:
        linux.prctl("PR_SET_NO_NEW_PRIVS", linux.PR_SET_NO_NEW_PRIVS, 1)
        seccomp.refuse_io_uring()


def _children() -> list[int]:
    try:
        raw = open(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read()
    except OSError:
        return []
    return [int(p) for p in raw.split()]
