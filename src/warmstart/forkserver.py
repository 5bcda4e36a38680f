"""`warmstart forkserver`: one process that has imported warmstart once and forks a copy of itself for each
`warmstart` command, so that the command starts in milliseconds instead of Python's 0.3-0.4 s of imports
(on a 2-core host, a third of a warm vLLM restore).

The client (`ask`, from the `warmstart` entry point) connects to the socket, checks that the server runs as
its own user, and sends its arguments, environment, umask and ignored signals, with its stdin, stdout, stderr
and working directory as file descriptors. The server (forkloop.py) checks the peer: its user, namespaces,
root, privileges and confinement, and that both run the same code and interpreter (`code_identity`). The
forked command, in a session of its own, then moves into the client's cgroup, takes its resource limits, nice
value and CPU affinity, and runs; the server reports its exit (or signal) back. The client passes on SIGINT,
SIGTERM and SIGHUP through a pidfd; a client that goes away, or a server that dies, gets its command a
SIGINT, which cancels it as Ctrl-C would. Anything that keeps a command from being accepted ends in the
client running the command itself; once it was accepted, never.

Kept to the standard library at module level: the client runs before anything else is imported.
"""

from __future__ import annotations

import array
import contextlib
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
RELAYED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
FDS = 4  # stdin, stdout, stderr, the working directory
_HEADER = struct.Struct("!I")
_MAX_REQUEST = 1 << 20
_FIRST_S = 10.0  # how long a client waits to hear whether its command was taken


def code_identity() -> str:
    """What the server and its clients must share: the interpreter, this package's place and each source file's
    size and mtime."""
    root = Path(__file__).parent
    h = hashlib.sha256(f"{sys.executable}\n{sys.version}\n{root}\n".encode())
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
    before = {sig: signal.getsignal(sig) for sig in RELAYED}
    try:
        taken = _send(conn, path, argv)
        if taken is None:
            return None
        pidfd, rest = taken
        _relay(pidfd)
        conn.sendall(b"go\n")  # from here on the command is the server's to run, never this process's
    except OSError:
        for sig, handler in before.items():
            signal.signal(sig, handler)
        conn.close()
        return None
    except KeyboardInterrupt:  # nothing ran: a command the server forked meanwhile is never let go
        conn.close()
        print("error: interrupted", file=sys.stderr)
        return 130
    try:
        conn.settimeout(None)
        return _wait(pidfd, rest, conn)
    finally:
        conn.close()


def _send(conn: socket.socket, path: Path, argv: list[str]) -> tuple[int, bytes] | None:
    """The request; the command's pidfd and what came after its line, or None where the server refused it."""
    conn.settimeout(_FIRST_S)
    conn.connect(str(path))
    if peer(conn)[1] != os.geteuid():
        return None  # only a server of this user gets this user's environment and terminal
    umask = os.umask(0)
    os.umask(umask)
    ignored = [int(s) for s in RELAYED if signal.getsignal(s) == signal.SIG_IGN]
    body = json.dumps({"argv": argv, "env": dict(os.environ), "umask": umask, "ignored": ignored,
                       "code": code_identity()}).encode()
    cwd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        conn.sendmsg([_HEADER.pack(len(body)) + body],
                     [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [0, 1, 2, cwd]))])
    finally:
        os.close(cwd)
    data, fds = _recv_fds(conn, 256, 1)
    line, _, rest = data.partition(b"\n")
    words = line.split()
    if len(words) != 2 or words[0] != b"pid" or len(fds) != 1:
        for fd in fds:
            os.close(fd)
        return None  # refused before anything ran
    return fds[0], rest


def _relay(pidfd: int) -> None:
    """SIGINT, SIGTERM and SIGHUP go on to the command (those this process ignores, it ignores too)."""
    def relay(sig: int, _: Any) -> None:
        try:
            signal.pidfd_send_signal(pidfd, sig)
        except ProcessLookupError:
            pass

    for sig in RELAYED:
        if signal.getsignal(sig) != signal.SIG_IGN:
            signal.signal(sig, relay)


def _wait(pidfd: int, rest: bytes, conn: socket.socket) -> int:
    """Until the server says how the command ended; end as the command did."""
    data = rest
    try:
        while b"\n" not in data:
            more = conn.recv(256)
            if not more:
                break
            data += more
    except OSError:
        pass
    os.close(pidfd)
    words = data.partition(b"\n")[0].split()
    if len(words) == 2 and words[0] == b"exit":
        return int(words[1])
    if len(words) == 2 and words[0] == b"signal":
        sig = int(words[1])
        with contextlib.suppress(OSError, ValueError):  # SIGKILL and SIGSTOP have no handler to reset
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)  # ended by a signal, as the command was
        return 128 + sig
    print("error: the warmstart fork server went away while it ran this command (it was cancelled) — see the "
          "server's log, then run the command again", file=sys.stderr)
    return 1


# ---- the server ----

def serve(path: Path, log: Any = sys.stderr) -> None:
    """Serve until SIGTERM or SIGINT: import everything once, then fork for each accepted command."""
    from warmstart import forkloop

    forkloop.preload()
    listener, ino = forkloop.listen(path)
    identity = code_identity()
    print(f"warmstart fork server: serving on {path}", file=log, flush=True)
    try:
        forkloop.Loop(listener, lambda: forkloop.unlink_ours(path, ino), identity, log).run()
    finally:
        listener.close()
        forkloop.unlink_ours(path, ino)


def _recv_fds(conn: socket.socket, size: int, most: int) -> tuple[bytes, list[int]]:
    """One read and the descriptors that came with it, close-on-exec."""
    fds = array.array("i")
    data, anc, _, _ = conn.recvmsg(size, socket.CMSG_SPACE(most * fds.itemsize), socket.MSG_CMSG_CLOEXEC)
    for level, kind, raw in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(raw[: len(raw) - len(raw) % fds.itemsize])
    return data, list(fds)


def receive(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """One request: its JSON body and the descriptors that came with it (ValueError or OSError if malformed,
    the descriptors then closed)."""
    data, fds = _recv_fds(conn, _HEADER.size + 65536, FDS)
    try:
        if not data and not fds:
            raise ValueError("a client connected and sent nothing")
        if len(fds) != FDS or len(data) < _HEADER.size:
            raise ValueError("no request with stdin, stdout, stderr and a directory")
        (size,) = _HEADER.unpack(data[: _HEADER.size])
        if size > _MAX_REQUEST:
            raise ValueError("request too large")
        body = data[_HEADER.size:]
        while len(body) < size:
            more = conn.recv(size - len(body))
            if not more:
                raise ValueError("request cut short")
            body += more
        return json.loads(body), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise

