"""`warmstart forkserver`: one process that has imported warmstart once and forks a copy of itself for each
`warmstart` command, so that the command starts in milliseconds instead of Python's 0.3-0.4 s of imports
(on a 2-core host, a third of a warm vLLM restore).

The client (`ask`, from the `warmstart` entry point) connects to the socket, checks that the server runs as
its own user, and sends its arguments, environment, working directory and umask, with its stdin, stdout and
stderr as file descriptors. The server checks the peer's user, that the peer is in the server's namespaces, and
that both run the same code (`code_identity`: a changed checkout makes the client run the command itself). The
forked command then moves into the client's cgroup, takes its resource limits and CPU affinity, and runs as if
started there; the server reports its exit (or signal) back. The client passes on SIGINT, SIGTERM and SIGHUP;
a client that goes away gets its command a SIGTERM, which cancels it as Ctrl-C would. Anything that keeps
a command from being accepted (no server, another user's, older code, another container) ends in the client
running the command itself.

Kept to the standard library at module level: the client runs before anything else is imported.
"""

from __future__ import annotations

import array
import hashlib
import json
import os
import signal
import socket
import struct
import sys
from pathlib import Path
from typing import Any

DEFAULT_SOCKET = Path("/run/warmstart/forkserver.sock")
ENV = "WARMSTART_FORKSERVER"  # the socket's path; "0" never uses one
_RELAYED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_HEADER = struct.Struct("!I")
_MAX_REQUEST = 1 << 20
_NAMESPACES = ("mnt", "pid", "net", "user", "ipc", "uts", "cgroup")


def code_identity() -> str:
    """What the server and its clients must share: this package's place and each source file's size and mtime."""
    root = Path(__file__).parent
    h = hashlib.sha256(str(root).encode())
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for f in sorted(files):
            if f.endswith(".py"):
                st = os.stat(os.path.join(dirpath, f))
                h.update(f"{dirpath}/{f} {st.st_size} {st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def socket_path(env: dict[str, str] | os._Environ[str]) -> Path | None:
    """The server's socket for a client with this environment: WARMSTART_FORKSERVER, else the default where it
    exists; None for "0"."""
    chosen = env.get(ENV, "")
    if chosen == "0":
        return None
    return Path(chosen) if chosen else DEFAULT_SOCKET


def peer(conn: socket.socket) -> tuple[int, int]:
    pid, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return pid, uid


# ---- the client ----

def ask(argv: list[str]) -> int | None:
    """Run this command through the server; its exit code, or None where no server took it (run it here)."""
    path = socket_path(os.environ)
    if path is None or not path.exists():
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
        if peer(conn)[1] != os.geteuid():
            return None  # only a server of this user gets this user's environment and terminal
        umask = os.umask(0)
        os.umask(umask)
        body = json.dumps({"argv": argv, "env": dict(os.environ), "cwd": os.getcwd(), "umask": umask,
                           "code": code_identity()}).encode()
        conn.sendmsg([_HEADER.pack(len(body)) + body],
                     [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [0, 1, 2]))])
        reply = conn.makefile("r")
        first = reply.readline().split()
        if len(first) != 2 or first[0] != "pid":
            return None  # refused before anything ran
        return _wait(int(first[1]), reply)
    except OSError:
        return None
    except KeyboardInterrupt:  # before the command's pid came: the server cancels it once this side is gone
        print("error: interrupted", file=sys.stderr)
        return 130
    finally:
        conn.close()


def _wait(pid: int, reply: Any) -> int:
    """Pass signals on to the command until the server says how it ended; the exit code the shell would see."""
    def relay(sig: int, _: Any) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    for sig in _RELAYED:
        signal.signal(sig, relay)
    line = reply.readline().split()
    if len(line) == 2 and line[0] == "exit":
        return int(line[1])
    if len(line) == 2 and line[0] == "signal":
        return 128 + int(line[1])
    print("error: the warmstart fork server went away while it ran this command — see its log, then run the "
          "command again", file=sys.stderr)
    return 1


# ---- the server ----

def serve(path: Path, log: Any = sys.stderr) -> None:
    """Serve until SIGTERM or SIGINT: import everything once, then fork for each accepted command."""
    from warmstart import forkloop

    forkloop.preload()
    listener = forkloop.listen(path)
    identity = code_identity()
    print(f"warmstart fork server: serving on {path}", file=log, flush=True)
    try:
        forkloop.Loop(listener, identity, log).run()
    finally:
        listener.close()
        path.unlink(missing_ok=True)


def receive(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """One request: its JSON body and the three descriptors that came with it (ValueError if malformed)."""
    fds = array.array("i")
    data, anc, _, _ = conn.recvmsg(_HEADER.size + 65536, socket.CMSG_SPACE(3 * fds.itemsize))
    for level, kind, raw in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(raw[: len(raw) - len(raw) % fds.itemsize])
    if len(data) < _HEADER.size:
        raise ValueError("no request")
    (size,) = _HEADER.unpack(data[: _HEADER.size])
    if size > _MAX_REQUEST:
        raise ValueError("request too large")
    body = data[_HEADER.size:]
    while len(body) < size:
        more = conn.recv(size - len(body))
        if not more:
            raise ValueError("request cut short")
        body += more
    if len(fds) != 3:
        for fd in fds:
            os.close(fd)
        raise ValueError("no stdin, stdout and stderr")
    return json.loads(body), list(fds)


def same_namespaces(pid: int) -> bool:
    """Whether that process shares this one's namespaces (a client in a container runs its command itself)."""
    try:
        return all(os.stat(f"/proc/{pid}/ns/{n}").st_ino == os.stat(f"/proc/self/ns/{n}").st_ino
                   for n in _NAMESPACES)
    except OSError:
        return False
