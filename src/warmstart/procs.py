"""Facts about live processes, read from /proc: liveness, identity, trees, listening ports."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from warmstart.errors import WorkerError


def start_time(pid: int) -> int | None:
    """Kernel start time in clock ticks: with the pid, it identifies a process across pid reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # Field 2 (comm) may hold spaces and parentheses; everything after the last ')' is well formed.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19])


def state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat[stat.rindex(")") + 2]


def alive(pid: int, started: int | None = None) -> bool:
    st = state(pid)
    if st is None or st in ("Z", "X"):
        return False
    return started is None or start_time(pid) == started


def owner(pid: int) -> tuple[int, int]:
    """The (uid, gid) the process runs as (effective ids: the owner of /proc/PID)."""
    st = os.stat(f"/proc/{pid}")
    return st.st_uid, st.st_gid


def require_alive(pid: int) -> None:
    if pid <= 1 or not alive(pid):
        raise WorkerError(f"no running process with pid {pid}", "check the pid with `warmstart ps` or `ps -p PID`")
    if pid == os.getpid():
        raise WorkerError("refusing to checkpoint warmstart itself", "pass the worker's pid")


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _nspid_in(status: Path) -> list[int]:
    try:
        for line in status.read_text().splitlines():
            if line.startswith("NSpid:"):
                return [int(x) for x in line.split()[1:]]
    except (FileNotFoundError, ProcessLookupError):
        pass
    return []


def nspid(pid: int) -> list[int]:
    """The pid as each pid namespace sees it, outermost first (one entry when not nested); [] if gone."""
    return _nspid_in(Path(f"/proc/{pid}/status"))


def inner_ids(pids: list[int]) -> list[int]:
    """Every process and thread id of these processes as their own pid namespace sees them (CRIU restores all)."""
    out: set[int] = set()
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except FileNotFoundError:
            continue
        for tid in tids:
            ids = _nspid_in(Path(f"/proc/{pid}/task/{tid}/status"))
            if ids:
                out.add(ids[-1])
    return sorted(out)


def environ(pid: int) -> dict[str, str]:
    """A process's environment as it was started; {} if it is gone or hidden."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except (FileNotFoundError, PermissionError, ProcessLookupError):
        return {}
    pairs = (item.decode(errors="replace").split("=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k: v for k, v in pairs}


def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return out
    for tid in tasks:
        try:
            out += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except FileNotFoundError:
            continue
    return out


def tree(pid: int) -> list[int]:
    """The pid and all its descendants, parents first."""
    order, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        order.append(p)
        todo += children(p)
    return order


def fd_targets(pid: int) -> list[tuple[int, str]]:
    """(fd, what it points at) for every open file descriptor of pid; [] if it is gone."""
    out: list[tuple[int, str]] = []
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except (FileNotFoundError, PermissionError):
        return out
    for fd in fds:
        try:
            out.append((int(fd), os.readlink(f"/proc/{pid}/fd/{fd}")))
        except OSError:
            continue
    return out


def _socket_inodes(pid: int) -> set[int]:
    return {int(t[8:-1]) for _, t in fd_targets(pid) if t.startswith("socket:[")}


def io_uring_fds(root_pid: int) -> list[tuple[int, int]]:
    """(pid, fd) of every io_uring instance the tree holds: CRIU cannot dump those."""
    return [(p, fd) for p in tree(root_pid) for fd, t in fd_targets(p) if t == "anon_inode:[io_uring]"]


def listening_tcp_ports(root_pid: int) -> list[int]:
    """TCP ports on which the tree rooted at root_pid listens (IPv4 and IPv6), sorted."""
    inodes: set[int] = set()
    for p in tree(root_pid):
        inodes |= _socket_inodes(p)
    ports: set[int] = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{root_pid}/net/{table}").read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == "0A" and int(f[9]) in inodes:  # 0A: TCP_LISTEN
                ports.add(int(f[1].rsplit(":", 1)[1], 16))
    return sorted(ports)


def terminate(pid: int, started: int | None = None, grace_s: float = 5.0) -> bool:
    """SIGTERM the process, then SIGKILL it after grace_s, and every descendant it had that is still left
    (a worker's helper processes must not outlive it). True if the process is gone."""
    family = [(p, start_time(p)) for p in tree(pid)[1:]] if alive(pid, started) else []
    gone = _signal_until_gone(pid, started, grace_s)
    for child, child_started in family:
        if alive(child, child_started):
            _signal_until_gone(child, child_started, 0.5)
    return gone


def _signal_until_gone(pid: int, started: int | None, grace_s: float) -> bool:
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 2.0)):
        if not alive(pid, started):
            return True
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not alive(pid, started):
                return True
            time.sleep(0.02)
    return not alive(pid, started)
