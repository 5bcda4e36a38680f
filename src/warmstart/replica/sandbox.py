"""A restored replica's own pid, mount and network namespaces, held by a small pid-1 process.

    warmstart (host) ── fork ──► intermediate: unshare(pid|mnt|net) ── fork ──► init (pid 1 inside)
                                 reports init's host pid, exits               mounts /proc, lo up, binds,
                                                                              runs `criu restore`, forwards
                                                                              host ports, reaps, waits

The host ports are bound before unshare, so their sockets stay in the host's network namespace while
every connection init opens lands in the replica's. When the restored worker exits, init exits and the
kernel kills whatever is left in the pid namespace; the mount and network namespaces go with the last
process. A replica that fails to restore therefore leaves nothing behind.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import signal
import socket
import stat
import struct
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from warmstart import linux, procs
from warmstart.criu import binary as criu
from warmstart.criu import shm
from warmstart.criu.binary import Criu
from warmstart.errors import EnvironmentProblem, IncompatibleArtifact, StepFailed, UsageError, WarmstartError

_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1

def bind_host_port(port: int) -> socket.socket:
    """Listen on 127.0.0.1:port (0: any free port) in the host's network namespace."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", port))
    except OSError as e:
        s.close()
        raise UsageError(f"host port {port} is not available ({e.strerror})", "pass a free --port") from e
    s.listen(128)
    return s


@dataclass
class SandboxSpec:
    criu_bin: Criu
    restore_args: list[str]  # criu restore --restore-detached ..., run by init
    log: Path  # CRIU's log file, read for the error when the restore fails
    pidfile: Path  # where CRIU writes the restored root's pid
    binds: list[tuple[str, str]] = field(default_factory=list)  # (host path, path to cover inside)
    forwards: list[tuple[socket.socket, int]] = field(default_factory=list)  # (host listener, inner port)
    shm_src: Path | None = None  # the artifact's saved /dev/shm segments, copied into the replica's /dev/shm
    # (host directory, where CRIU reads it): images inflated into the host's /dev/shm, which the replica's own
    # /dev/shm then hides, so they are bound elsewhere first (image/inflated.py)
    images: tuple[str, str] | None = None
    timeout_s: float = 120.0
    criu_env: dict[str, str] = field(default_factory=dict)  # how CRIU reads the pages (criu.restore_env)


@dataclass
class Sandbox:
    holder_pid: int
    holder_started: int
    _reader: int

    def wait_restored(self, timeout_s: float) -> float:
        """Block until init reports the restore done; return the command's seconds. Raise on failure."""
        msg = read_msg(self._reader, timeout_s)
        os.close(self._reader)
        if msg is None:
            kill(self)
            raise StepFailed(f"replica did not report within {timeout_s:g} s", "see the replica's CRIU log")
        if msg.get("event") == "error":
            raise StepFailed(msg.get("problem", "restore failed"), msg.get("fix", ""))
        return float(msg["seconds"])

    def worker_pid(self) -> int | None:
        kids = procs.children(self.holder_pid)
        return kids[0] if kids else None


def read_msg(fd: int, timeout_s: float) -> dict[str, Any] | None:
    buf = b""
    deadline = time.monotonic() + timeout_s
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            return {"event": "error", "problem": "replica's init exited before reporting",
                    "fix": "see the replica's CRIU log"}
        buf += chunk
    msg: dict[str, Any] = json.loads(buf.split(b"\n", 1)[0])
    return msg


def detach_fds(keep: set[int]) -> None:
    """Close everything inherited from the caller (its stdout may be a pipe someone reads to EOF)."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    for fd in map(int, os.listdir("/proc/self/fd")):
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def send_msg(fd: int, msg: dict[str, Any]) -> None:
    os.write(fd, (json.dumps(msg) + "\n").encode())


def send_error(fd: int, problem: str, fix: str) -> None:
    """Report a forked helper's failure to its parent; the parent may be gone already."""
    try:
        send_msg(fd, {"event": "error", "problem": problem, "fix": fix})
    except OSError:
        pass


def start(spec: SandboxSpec) -> Sandbox:
    """Fork the replica's init; returns at once (the restore runs concurrently with the caller)."""
    if os.geteuid() != 0:
        raise EnvironmentProblem("restoring into new namespaces needs root", "run as root")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # intermediate
        code = 1
        try:
            os.close(r)
            detach_fds(keep={w, *(sock.fileno() for sock, _ in spec.forwards)})
            os.setsid()
            linux.unshare(linux.CLONE_NEWNS | linux.CLONE_NEWPID | linux.CLONE_NEWNET)
            init = os.fork()
            if init == 0:
                _init_main(spec, w)  # never returns
            send_msg(w, {"event": "holder", "pid": init})
            code = 0
        except BaseException as e:  # report every failure to the parent, then leave
            send_error(w, f"cannot create the replica's namespaces: {e}",
                       "run as root on a kernel with pid, mount and network namespaces")
        finally:
            os._exit(code)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    msg = read_msg(r, 10)
    if not msg or msg.get("event") != "holder":
        os.close(r)
        raise StepFailed((msg or {}).get("problem", "could not start the replica's namespaces"),
                         (msg or {}).get("fix", ""))
    holder = int(msg["pid"])
    for s, _ in spec.forwards:
        s.close()  # init holds them now
    return Sandbox(holder_pid=holder, holder_started=procs.start_time(holder) or 0, _reader=r)


def kill(sb: Sandbox) -> None:
    """SIGKILL the replica's init: the kernel then kills everything in its pid namespace."""
    if procs.alive(sb.holder_pid, sb.holder_started):
        try:
            os.kill(sb.holder_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 5
    while procs.alive(sb.holder_pid, sb.holder_started) and time.monotonic() < deadline:
        time.sleep(0.01)


# ---- inside the replica: pid 1 ----

def _lo_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifr = fcntl.ioctl(s, _SIOCGIFFLAGS, struct.pack("16sH14x", b"lo", 0))
        flags = struct.unpack("16sH", ifr[:18])[1]
        fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | _IFF_UP))


def _prepare_mounts(binds: list[tuple[str, str]], shm_src: Path | None, images: tuple[str, str] | None) -> None:
    linux.mount("none", "/", None, linux.MS_REC | linux.MS_PRIVATE)  # nothing done here may reach the host
    linux.mount("proc", "/proc", "proc", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC)
    if images:
        linux.mount(images[0], images[1], None, linux.MS_BIND)
    # Each replica gets its own POSIX shared memory and semaphores: names the source used must not clash. The
    # segments may come from the host's /dev/shm (opened sealed ones): held open, they stay reachable under it.
    held = os.open(shm_src, os.O_RDONLY | os.O_DIRECTORY) if shm_src else None
    linux.mount("tmpfs", "/dev/shm", "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "mode=1777")
    if held is not None:
        shm.place(Path(f"/proc/self/fd/{held}"))
        os.close(held)
    for src, dst in binds:
        fd = mount_point(Path(dst), directory=Path(src).is_dir())
        try:
            linux.mount(src, f"/proc/self/fd/{fd}", None, linux.MS_BIND)  # onto what was checked, not a new link
        except OSError as e:
            raise OSError(e.errno, f"mount {dst}: {e.strerror}") from e
        finally:
            os.close(fd)


def mount_point(dst: Path, directory: bool) -> int:
    """An O_PATH descriptor of the worker's path `dst`, to bind a replica's own copy over. A path missing on this
    host is created (the source worker's paths may not exist here), owner-only; a path that is a symbolic link is
    refused: a link another user placed in /tmp must not choose what the replica's copy covers."""
    missing = [p for p in (dst, *dst.parents) if not os.path.lexists(p)]
    for p in reversed(missing):
        if p != dst or directory:
            os.mkdir(p, 0o700)
        else:
            os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
    fd = os.open(dst, os.O_PATH | os.O_NOFOLLOW)
    if stat.S_ISLNK(os.fstat(fd).st_mode):
        os.close(fd)
        raise link_refused(str(dst))
    return fd


def link_refused(path: str) -> IncompatibleArtifact:
    return IncompatibleArtifact(f"the worker's path {path} is a symbolic link on this host, and a replica's own "
                                "copy of it is never mounted through one",
                                f"remove the link (warmstart creates {path} itself where it is missing)")


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(1 << 16):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _connect_inner(port: int) -> socket.socket | None:
    for host in ("127.0.0.1", "::1"):
        try:
            return socket.create_connection((host, port), timeout=5)
        except OSError:
            continue
    return None


def _relay(client: socket.socket, port: int) -> None:
    upstream = _connect_inner(port)
    if upstream is None:
        client.close()
        return
    upstream.settimeout(None)
    t = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
    t.start()
    _pump(client, upstream)
    t.join()
    client.close()
    upstream.close()


def _forward(listener: socket.socket, port: int) -> None:
    while True:
        try:
            client, _ = listener.accept()
        except OSError:
            return
        threading.Thread(target=_relay, args=(client, port), daemon=True).start()


def _init_main(spec: SandboxSpec, w: int) -> None:
    root = 0
    try:
        _prepare_mounts(spec.binds, spec.shm_src, spec.images)
        _lo_up()
        t0 = time.monotonic()
        criu.run(spec.criu_bin, spec.restore_args, spec.log, "restore", timeout=spec.timeout_s, env=spec.criu_env)
        root = int(spec.pidfile.read_text().strip())
        send_msg(w, {"event": "restored", "seconds": time.monotonic() - t0})
    except WarmstartError as e:
        send_error(w, e.problem, e.fix)
        os._exit(1)
    except BaseException as e:
        send_msg(w, {"event": "error", "problem": f"replica init failed: {e}", "fix": "run with --debug",
                  "trace": traceback.format_exc()})
        os._exit(1)
    os.close(w)

    def stop(signum: int, _frame: object) -> None:
        try:
            os.kill(root, signal.SIGTERM)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for listener, port in spec.forwards:
        threading.Thread(target=_forward, args=(listener, port), daemon=True).start()
    while True:
        try:
            pid, _ = os.wait()
        except ChildProcessError:
            break
        if pid == root:
            break
    os._exit(0)
