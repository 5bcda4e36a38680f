"""Finding a container's processes on this node from its CRI container id (pod status), through /proc cgroups.

Every container runtime puts a container's processes in a cgroup whose path contains the container id
(containerd: .../cri-containerd-<id>.scope or .../<id>; CRI-O: .../crio-<id>.scope), on cgroup v1 and v2.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from warmstart import procs
from warmstart.errors import WorkerError

_ID = re.compile(r"^[a-z0-9-]+://([0-9a-f]{12,64})$")


def container_hex(container_id: str) -> str:
    """'containerd://3f2a...' -> '3f2a...'."""
    m = _ID.match(container_id)
    if not m:
        raise WorkerError(f"unexpected container id {container_id!r}", "expected <runtime>://<hex id> from pod status")
    return m.group(1)


def pids_of(container_id: str, proc: Path = Path("/proc")) -> list[int]:
    """Host pids of every running process in the container (the agent runs with hostPID)."""
    hex_id = container_hex(container_id)
    out = []
    for entry in os.listdir(proc):
        if not entry.isdigit():
            continue
        try:
            cgroups = (proc / entry / "cgroup").read_text()
            stat = (proc / entry / "stat").read_text()
        except OSError:
            continue
        if any(hex_id in line.split(":", 2)[-1] for line in cgroups.splitlines()) and not _exited(stat):
            out.append(int(entry))
    return sorted(out)


def _exited(stat: str) -> bool:
    """A zombie: it left its cgroup when it exited, but its /proc/PID/cgroup names that cgroup until it is
    reaped (the init of a container runc deleted, until the node's init reaps it)."""
    fields = stat.rpartition(")")[2].split()
    return not fields or fields[0] in ("Z", "X")


def init_pid(container_id: str) -> int:
    """The container's first process (pid 1 in its pid namespace)."""
    for pid in pids_of(container_id):
        if procs.nspid(pid)[-1:] == [1]:
            return pid
    raise WorkerError(f"no process of container {container_hex(container_id)[:12]} runs on this node",
                      "check the pod is on this node and its container is running")


def worker_pid(container_id: str) -> int:
    """The worker of a source container: the first child of its init (`warmstart placeholder -- CMD`)."""
    init = init_pid(container_id)
    kids = procs.children(init)
    if not kids:
        raise WorkerError(f"the init of container {container_hex(container_id)[:12]} has no worker process",
                          "run the source container's command as `warmstart placeholder -- CMD`")
    return kids[0]
