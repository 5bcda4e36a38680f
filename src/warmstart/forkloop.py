"""The fork server's side (forkserver.py says what it is for): accept a command, check its client, fork, give
the forked command its client's process settings, report how it ended."""

from __future__ import annotations

import array
import atexit
import contextlib
import ctypes
import os
import resource
import selectors
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from warmstart import forkserver
from warmstart.errors import EnvironmentProblem

_LIMITS = [getattr(resource, n) for n in dir(resource) if n.startswith("RLIMIT_") and n != "RLIMIT_OFILE"]
_DRAIN_S = 60.0  # how long a stopping server waits for its commands to end
_SAME_STATUS = ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp",
                "Seccomp_filters")
_PR_SET_PDEATHSIG = 1


def preload() -> None:
    """What a command would import, imported once here so that each fork starts with it."""
    import rich.console  # noqa: F401
    import rich.table  # noqa: F401

    import warmstart.api  # noqa: F401
    import warmstart.cli  # noqa: F401
    import warmstart.pipeline.checkpoint  # noqa: F401
    import warmstart.pipeline.restore  # noqa: F401


def listen(path: Path) -> tuple[socket.socket, int]:
    """The server's socket (and its inode), 0600 in a directory only this user can write; a symlink or another
    file there, or a live server on it, is refused."""
    from warmstart import paths

    paths.private_dir(path.parent, setting=forkserver.ENV)
    if path.is_symlink() or (path.exists() and not path.is_socket()):
        raise EnvironmentProblem(f"{path} exists and is not a socket", f"remove it, or set {forkserver.ENV}")
    if path.exists():
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            if probe.connect_ex(str(path)) == 0:
                raise EnvironmentProblem(f"a fork server already serves on {path}",
                                         "stop it first (SIGTERM), or pass another --socket")
        path.unlink()  # a server that was killed left it
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        s.bind(str(path))
    finally:
        os.umask(old)
    s.listen(64)
    return s, os.stat(path).st_ino


def unlink_ours(path: Path, ino: int) -> None:
    """Remove the socket if it is still the one this server bound (a later server's stays)."""
    with contextlib.suppress(OSError):
        if os.stat(path).st_ino == ino:
            path.unlink()


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    out = {k: fields.get(k, "").strip() for k in _SAME_STATUS}
    try:
        with open(f"/proc/{pid}/attr/current") as f:
            out["lsm"] = f.read().strip("\0\n")
    except OSError:
        out["lsm"] = ""
    return out


def _cgroups(pid: int) -> str:
    with open(f"/proc/{pid}/cgroup") as f:
        return f.read()


def _same_namespaces(pid: int) -> bool:
    """Whether that process shares this one's namespaces and root (a client in a container or a chroot runs its
    command itself)."""
    try:
        if any(os.stat(f"/proc/{pid}/ns/{n}").st_ino != os.stat(f"/proc/self/ns/{n}").st_ino
               for n in ("mnt", "pid", "net", "user", "ipc", "uts", "cgroup")):
            return False
        theirs, ours = os.stat(f"/proc/{pid}/root"), os.stat("/proc/self/root")
        return (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)
    except OSError:
        return False


def fits(client: int) -> str | None:
    """Why a command of that process cannot run here as it would there (None: it can): another container or
    root, other ids, privileges or confinement, or another cgroup outside cgroup v2 (which a fork cannot simply
    follow)."""
    if not _same_namespaces(client):
        return "the client is in other namespaces or under another root"
    try:
        if _status(client) != _status(os.getpid()):
            return "the client has other ids, capabilities, seccomp filters or security label"
        theirs, ours = _cgroups(client), _cgroups(os.getpid())
    except OSError as e:
        return f"cannot read the client's process status ({e.strerror})"
    if theirs != ours and not (theirs.startswith("0::") and theirs.count("\n") == 1):
        return "the client is in other cgroup v1 groups"
    return None


def settle(child: int, client: int) -> None:
    """Give the forked command its client's cgroup, resource limits, nice value and CPU affinity (OSError if
    one cannot be given: then it does not run)."""
    theirs = _cgroups(client)
    if theirs != _cgroups(child):
        with open(f"/sys/fs/cgroup{theirs[3:].strip()}/cgroup.procs", "w") as f:
            f.write(str(child))
    for r in _LIMITS:
        resource.prlimit(child, r, resource.prlimit(client, r))
    os.setpriority(os.PRIO_PROCESS, child, os.getpriority(os.PRIO_PROCESS, client))
    os.sched_setaffinity(child, os.sched_getaffinity(client))


def _become(req: dict[str, Any], fds: list[int]) -> None:
    """The client's stdio, directory, environment, umask and ignored signals."""
    for i, fd in enumerate(fds[:3]):
        os.dup2(fd, i)
        os.close(fd)
    os.fchdir(fds[3])
    os.close(fds[3])
    os.environ.clear()
    os.environ.update(req["env"])
    os.umask(int(req["umask"]))
    for sig in req.get("ignored", []):
        if sig in forkserver.RELAYED:
            signal.signal(sig, signal.SIG_IGN)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the descriptors stay open for the whole command
    sys.stdout = open(1, "w", 1 if os.isatty(1) else -1, closefd=False)  # noqa: SIM115 - 1: by lines
    sys.stderr = open(2, "w", 1, errors="backslashreplace", closefd=False)  # noqa: SIM115
    sys.argv = ["warmstart", *req["argv"]]


def run_command(req: dict[str, Any], fds: list[int], go: int) -> None:
    """In the forked child: wait for `settle`, become the client's command, run it, exit with its code."""
    if os.read(go, 1) != b"1":
        os._exit(1)
    os.close(go)
    code = 1
    try:
        _become(req, fds)
        from warmstart import cli

        try:
            cli.main(list(req["argv"]))
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        # As the interpreter would at exit, without unwinding into the server's frames (its clean-up).
        for t in threading.enumerate():
            if t is not threading.main_thread() and not t.daemon:
                t.join()
        atexit._run_exitfuncs()
    except KeyboardInterrupt:
        code = 130
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(code)


class Loop:
    """Accepts commands, forks them and reports their ends, on one thread: a fork must not copy other threads.
    `closing` removes the socket once the server stops taking commands."""

    def __init__(self, listener: socket.socket, closing: Callable[[], None], identity: str, log: Any) -> None:
        self.listener, self.closing, self.identity, self.log = listener, closing, identity, log
        self.sel = selectors.DefaultSelector()
        self.children: dict[int, socket.socket | None] = {}  # forked command -> its client's connection
        self.stopping = False
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def run(self) -> None:
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._stop)
        self.sel.register(self.listener, selectors.EVENT_READ, "accept")
        self.sel.register(self.wake_r, selectors.EVENT_READ, "wake")
        while not self.stopping:
            self._once(None)
        self.sel.unregister(self.listener)
        self.listener.close()  # new clients run their commands themselves
        self.closing()
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)  # each cancels as on Ctrl-C, and its client hears how it ended
        deadline = time.monotonic() + _DRAIN_S
        while self.children and time.monotonic() < deadline:
            self._once(1.0)

    def _once(self, timeout: float | None) -> None:
        for key, _ in self.sel.select(timeout):
            try:
                if key.data == "accept":
                    self._accept()
                elif key.data == "wake":
                    self._reap()
                else:
                    self._client_gone(key.data)
            except Exception as e:  # noqa: BLE001 - one client's trouble never ends the server
                self._log(f"internal error, the server goes on: {type(e).__name__}: {e}")

    def _log(self, msg: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            print(f"warmstart fork server: {msg}", file=self.log, flush=True)

    def _stop(self, *_: Any) -> None:
        self.stopping = True

    def _accept(self) -> None:
        conn, _ = self.listener.accept()
        conn.settimeout(5)  # a client that sends nothing holds the server up no longer than this
        try:
            self._start(conn)
        except (OSError, ValueError) as e:
            self._log(f"refused a command: {e}")
            conn.close()

    def _start(self, conn: socket.socket) -> None:
        client, uid = forkserver.peer(conn)
        if uid != os.geteuid():
            raise ValueError(f"its client (pid {client}) runs as uid {uid}")
        req, fds = forkserver.receive(conn)
        try:
            why = "it runs other code (restart the server)" if req.get("code") != self.identity else fits(client)
            if why:
                conn.sendall(b"refused\n")
                raise ValueError(why)
            self._fork(conn, client, req, fds)
        finally:
            for fd in fds:
                os.close(fd)

    def _fork(self, conn: socket.socket, client: int, req: dict[str, Any], fds: list[int]) -> None:
        """Fork the command, settle it, tell the client its pid (with a pidfd), and let it run once the client
        has said go: a client gone before that leaves a child that exits without running anything."""
        go_r, go_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                self._in_child(conn, go_w)
                run_command(req, fds, go_r)
            finally:
                os._exit(1)  # never back into the server's loop
        os.close(go_r)
        self.children[pid] = None  # reaped however it ends
        try:
            settle(pid, client)
            pidfd = os.pidfd_open(pid)
            try:
                conn.sendmsg([f"pid {pid}\n".encode()],
                             [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [pidfd]))])
            finally:
                os.close(pidfd)
            if conn.recv(3, socket.MSG_WAITALL) != b"go\n":
                raise ValueError(f"its client (pid {client}) left before its command ran")
        except (OSError, ValueError):
            os.close(go_w)
            with contextlib.suppress(OSError):
                conn.sendall(b"refused\n")
            raise
        self.children[pid] = conn
        self.sel.register(conn, selectors.EVENT_READ, pid)
        os.write(go_w, b"1")
        os.close(go_w)
        self._log(f"pid {pid} for client {client}: warmstart {' '.join(req['argv'])}")

    def _in_child(self, conn: socket.socket, go_w: int) -> None:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.setsid()  # not in the server's session: its terminal's signals are not the command's
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGINT)  # the server dies: cancelled
        os.close(go_w)
        self.sel.close()
        self.listener.close()
        for c in self.children.values():
            if c:
                c.close()
        conn.close()
        os.close(self.wake_r)
        os.close(self.wake_w)

    def _client_gone(self, pid: int) -> None:
        conn = self.children.get(pid)
        if conn is None:
            return
        try:
            if conn.recv(64):
                return  # the client sends nothing: ignore it
        except OSError:
            pass  # reset: gone too
        self.sel.unregister(conn)
        conn.close()
        self.children[pid] = None
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGINT)  # cancelled as on Ctrl-C (still the child: not reaped yet)

    def _reap(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self.wake_r, 512):
                pass
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.children.pop(pid, None)
            if conn is None:
                continue
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(conn)
            end = (f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
                   else f"exit {os.waitstatus_to_exitcode(status)}")
            with contextlib.suppress(OSError):
                conn.sendall(f"{end}\n".encode())
            conn.close()
