"""The fork server's side (forkserver.py says what it is for): accept a command, check its client, fork, give
the forked command its client's process settings, report how it ended."""

from __future__ import annotations

import atexit
import os
import resource
import selectors
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from warmstart import forkserver
from warmstart.errors import EnvironmentProblem

_LIMITS = [getattr(resource, n) for n in dir(resource) if n.startswith("RLIMIT_") and n != "RLIMIT_OFILE"]
_DRAIN_S = 60.0  # how long a stopping server waits for its commands to end
_SAME_STATUS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp", "Groups")


def preload() -> None:
    """What a command would import, imported once here so that each fork starts with it."""
    import rich.console  # noqa: F401
    import rich.table  # noqa: F401

    import warmstart.api  # noqa: F401
    import warmstart.cli  # noqa: F401
    import warmstart.pipeline.checkpoint  # noqa: F401
    import warmstart.pipeline.restore  # noqa: F401


def listen(path: Path) -> socket.socket:
    """The server's socket, 0600 in a directory only this user can write; a symlink there is refused."""
    from warmstart import paths

    paths.private_dir(path.parent, setting=forkserver.ENV)
    if path.is_symlink() or (path.exists() and not path.is_socket()):
        raise EnvironmentProblem(f"{path} exists and is not a socket", f"remove it, or set {forkserver.ENV}")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path.unlink(missing_ok=True)  # a server that was killed left it
    old = os.umask(0o177)
    try:
        s.bind(str(path))
    finally:
        os.umask(old)
    s.listen(64)
    return s


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return {k: fields.get(k, "").strip() for k in _SAME_STATUS}


def _cgroups(pid: int) -> str:
    with open(f"/proc/{pid}/cgroup") as f:
        return f.read()


def fits(client: int) -> str | None:
    """Why a command of that process cannot run here as it would there (None: it can): another container, other
    privileges, or another cgroup outside cgroup v2 (where the forked command cannot simply follow it)."""
    if not forkserver.same_namespaces(client):
        return "the client is in other namespaces"
    try:
        if _status(client) != _status(os.getpid()):
            return "the client has other capabilities, groups or seccomp"
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


def run_command(req: dict[str, Any], fds: list[int], go: int) -> None:
    """In the forked child: wait for `settle`, become the client's command, run it, exit with its code."""
    if os.read(go, 1) != b"1":
        os._exit(1)
    os.close(go)
    for i, fd in enumerate(fds):
        os.dup2(fd, i)
        os.close(fd)
    os.environ.clear()
    os.environ.update(req["env"])
    try:
        os.chdir(req["cwd"])
    except OSError as e:
        os.write(2, f"error: cannot run in {req['cwd']} ({e.strerror}) — cd to a directory that exists\n".encode())
        os._exit(2)
    os.umask(int(req["umask"]))
    sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the descriptors stay open for the whole command
    sys.stdout = open(1, "w", 1 if os.isatty(1) else -1, closefd=False)  # noqa: SIM115 - 1: by lines
    sys.stderr = open(2, "w", 1, errors="backslashreplace", closefd=False)  # noqa: SIM115
    sys.argv = ["warmstart", *req["argv"]]
    code = 1
    try:
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
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


class Loop:
    """Accepts commands, forks them and reports their ends, on one thread: a fork must not copy other threads."""

    def __init__(self, listener: socket.socket, identity: str, log: Any) -> None:
        self.listener, self.identity, self.log = listener, identity, log
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
        for pid in self.children:
            os.kill(pid, signal.SIGTERM)  # each cancels as on Ctrl-C, and its client hears how it ended
        deadline = time.monotonic() + _DRAIN_S
        while self.children and time.monotonic() < deadline:
            self._once(1.0)

    def _once(self, timeout: float | None) -> None:
        for key, _ in self.sel.select(timeout):
            if key.data == "accept":
                self._accept()
            elif key.data == "wake":
                self._reap()
            else:
                self._client_gone(key.data)

    def _stop(self, *_: Any) -> None:
        self.stopping = True

    def _accept(self) -> None:
        conn, _ = self.listener.accept()
        conn.settimeout(5)  # a client that sends nothing holds the server up no longer than this
        try:
            self._start(conn)
        except (OSError, ValueError) as e:
            print(f"warmstart fork server: refused a command: {e}", file=self.log, flush=True)
            conn.close()

    def _start(self, conn: socket.socket) -> None:
        client, uid = forkserver.peer(conn)
        if uid != os.geteuid():
            raise ValueError(f"its client (pid {client}) runs as uid {uid}")
        req, fds = forkserver.receive(conn)
        why = "it runs other code (restart the server)" if req.get("code") != self.identity else fits(client)
        if why:
            for fd in fds:
                os.close(fd)
            conn.sendall(b"refused\n")
            raise ValueError(why)
        go_r, go_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                self._in_child(conn, go_w)
                run_command(req, fds, go_r)
            finally:
                os._exit(1)  # never back into the server's loop
        os.close(go_r)
        for fd in fds:
            os.close(fd)
        try:
            settle(pid, client)
        except OSError:
            os.close(go_w)  # the child exits without running anything
            self.children[pid] = None
            conn.sendall(b"refused\n")
            raise
        os.write(go_w, b"1")
        os.close(go_w)
        self.children[pid] = conn
        conn.sendall(f"pid {pid}\n".encode())
        self.sel.register(conn, selectors.EVENT_READ, pid)
        print(f"warmstart fork server: pid {pid} for client {client}: warmstart {' '.join(req['argv'])}",
              file=self.log, flush=True)

    def _in_child(self, conn: socket.socket, go_w: int) -> None:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
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
        if conn.recv(64):
            return  # the client sends nothing: ignore it
        self.sel.unregister(conn)
        conn.close()
        self.children[pid] = None
        try:
            os.kill(pid, signal.SIGTERM)  # cancelled as on Ctrl-C: what it started is undone
        except ProcessLookupError:
            pass

    def _reap(self) -> None:
        try:
            while os.read(self.wake_r, 512):
                pass
        except BlockingIOError:
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
            self.sel.unregister(conn)
            end = (f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
                   else f"exit {os.waitstatus_to_exitcode(status)}")
            try:
                conn.sendall(f"{end}\n".encode())
            except OSError:
                pass
            conn.close()
