"""Restore into the namespaces of a process that already holds them: a Kubernetes placeholder container's init.

    warmstart ── fork ──► helper: setns(target's pid ns), unshare(mnt) ── fork ──► runner, in the target's pid ns:
                                                                               mounts that pid ns's /proc privately,
                                                                               criu restore --join-ns net,ipc,uts,mnt
                                                                               of /proc/1 (the target)

Nothing is created: the restored worker lives in the target's pid, mount, network, IPC and UTS namespaces and,
once CRIU exits, is a child of the target (the namespace's init). What the worker needs on the target's file
system (its log file, control directory, per-replica directories, /dev/shm segments) is made through
/proc/<target>/root, and calls to the worker's port go through a thread that joined the target's network.
"""

from __future__ import annotations

import errno
import os
import tempfile
import time
from pathlib import Path

from warmstart import linux, procs
from warmstart.criu import binary as criu
from warmstart.criu import shm
from warmstart.criu.binary import Criu
from warmstart.errors import StepFailed, UsageError, WarmstartError
from warmstart.replica.sandbox import detach_fds, read_msg, send_error, send_msg

_JOINED = ("net", "ipc", "uts", "mnt")


def check_target(pid: int) -> None:
    """The target must be running and be the init (pid 1) of its own pid namespace, as a pod container's is."""
    if not procs.alive(pid):
        raise UsageError(f"no running process with pid {pid} to restore into", "pass the placeholder's host pid")
    nspid = procs.nspid(pid)
    if len(nspid) < 2 or nspid[-1] != 1:
        raise UsageError(f"process {pid} is not the init of its own pid namespace",
                         "pass the host pid of a placeholder container's first process")


def target_path(target: int, path: str) -> Path:
    """A path as the target's mount namespace sees it, reachable from here: its symlinks resolved inside the
    target's root (through /proc/PID/root the kernel would resolve an absolute one on the host)."""
    root = Path(f"/proc/{target}/root")
    return root / resolve_in_root(root, path).lstrip("/")


def resolve_in_root(root: Path, path: str) -> str:
    parts, links = [p for p in path.split("/") if p], 0
    out: list[str] = []
    while parts:
        part = parts.pop(0)
        if part in (".", ".."):
            if part == ".." and out:
                out.pop()
            continue
        here = root.joinpath(*out, part)
        if not here.is_symlink():
            out.append(part)
            continue
        links += 1
        if links > 40:
            raise OSError(errno.ELOOP, "too many symlinks", path)
        link = os.readlink(here)
        parts[:0] = [p for p in link.split("/") if p]
        if link.startswith("/"):
            out = []
    return "/" + "/".join(out)


def prepare_files(target: int, log_path: str | None, dirs: list[str], shm_src: Path | None) -> None:
    """Create what the restored worker reopens by path in the target's file system. Every path resolves inside
    the target's root: a symlink the container holds cannot send root's writes onto the host."""
    root = os.open(f"/proc/{target}/root", os.O_PATH | os.O_DIRECTORY)
    try:
        if log_path:
            linux.makedirs_in_root(root, os.path.dirname(log_path))
            # The mode warmstart gives worker logs (pipeline/run.py): CRIU refuses a file whose mode changed.
            os.close(linux.open_in_root(root, log_path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600))
        for d in dirs:
            linux.makedirs_in_root(root, d)
        if shm_src:
            held = linux.open_in_root(root, "/dev/shm", os.O_PATH | os.O_DIRECTORY)
            try:
                shm.place(shm_src, Path(f"/proc/self/fd/{held}"))
            finally:
                os.close(held)
    finally:
        os.close(root)


def restore(target: int, criu_bin: Criu, restore_args: list[str], log: Path, pidfile: Path, timeout_s: float,
            needed_ids: list[int]) -> tuple[int, float]:
    """Run `criu restore` inside the target's namespaces; return (the worker's host pid, CRIU's seconds).

    needed_ids: the pids and thread ids the image restores; they must be free in the target's namespace.
    """
    busy = sorted(set(needed_ids) & set(_ids_in(target)))
    if busy:
        raise StepFailed(f"ids {busy[:5]} the image restores are taken in the namespace of process {target}",
                         "restore into a fresh placeholder container")
    joins = [a for ns in _JOINED for a in ("--join-ns", f"{ns}:/proc/1/ns/{ns}")]
    r, w = os.pipe()
    helper = os.fork()
    if helper == 0:
        code = 1
        try:
            os.close(r)
            detach_fds(keep={w})
            linux.setns(f"/proc/{target}/ns/pid", linux.CLONE_NEWPID)  # children are born in the target's pid namespace
            _move_pid_counter(needed_ids)
            linux.unshare(linux.CLONE_NEWNS)
            runner = os.fork()
            if runner == 0:
                _run(criu_bin, restore_args + joins, log, timeout_s, w)
            _, status = os.waitpid(runner, 0)
            code = os.waitstatus_to_exitcode(status)
        except BaseException as e:
            send_error(w, f"cannot enter the namespaces of {target}: {e}",
                       "run as root; the target must still be running")
        finally:
            os._exit(code)
    os.close(w)
    try:
        msg = read_msg(r, timeout_s + 10)  # the runner's own CRIU timeout reports first
    finally:
        os.close(r)
        os.waitpid(helper, 0)
    if msg is None:
        raise StepFailed(f"restore into process {target} did not finish within {timeout_s:g} s", f"see {log}")
    if msg.get("event") == "error":
        raise StepFailed(msg.get("problem", "restore failed"), msg.get("fix", ""))
    inner = int(pidfile.read_text().strip())
    for child in procs.children(target):
        if procs.nspid(child)[-1:] == [inner]:
            return child, float(msg["seconds"])
    raise StepFailed(f"the restored worker (pid {inner} inside) is not a child of {target}", f"see {log}")


def _ids_in(target: int) -> list[int]:
    """The ids in use in the target's pid namespace (its /proc is not ours: walk its processes from here)."""
    return procs.inner_ids(procs.tree(target))


def start_of_widest_gap(needed: list[int], pid_max: int) -> int:
    """A last-pid value after which the most ids are free before the next needed one (pids wrap at pid_max)."""
    ids = sorted({i for i in needed if 0 < i < pid_max} | {1})
    gaps = [(b - a, a) for a, b in zip(ids, ids[1:] + [ids[0] + pid_max], strict=True)]
    return max(gaps)[1]


def _move_pid_counter(needed: list[int]) -> None:
    """Point the target namespace's pid counter at the widest run of ids the image does not need, so that
    neither the runner nor CRIU's own processes take one it restores (a container's worker is pid 2 or 3)."""
    start = start_of_widest_gap(needed, int(Path("/proc/sys/kernel/pid_max").read_text()))
    child = os.fork()
    if child == 0:  # the first process born in the target namespace: ns_last_pid applies to its namespace
        try:
            Path("/proc/sys/kernel/ns_last_pid").write_text(str(start))
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(child, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise OSError("cannot set the target namespace's ns_last_pid")


def _join_cgroups() -> bool:
    """Move this process into the target's cgroups (pid 1 here), so that the restored worker is charged to,
    limited with and stopped with the placeholder's container, not the source's, whose cgroups the image
    names. A container's /sys/fs/cgroup holds only its own cgroups: each hierarchy is mounted afresh here
    (this mount namespace is private). False, moving nothing, in a cgroup namespace of our own."""
    lines = [line.split(":", 2) for line in Path("/proc/1/cgroup").read_text().splitlines()]
    if any(".." in path.split("/") for _, _, path in lines):
        return False
    where = Path(tempfile.mkdtemp(prefix="warmstart-cgroup-"))
    try:
        for _, controllers, path in lines:
            kind = "cgroup" if controllers else "cgroup2"
            opts = f"none,{controllers}" if controllers.startswith("name=") else controllers or None
            linux.mount(kind, str(where), kind, 0, opts)
            try:
                (where / path.lstrip("/") / "cgroup.procs").write_text(str(os.getpid()))
            finally:
                linux.umount(str(where))
    finally:
        where.rmdir()
    return True


def _images_outside_shm(args: list[str]) -> tuple[list[str], str | None]:
    """Images inflated into this side's /dev/shm, which the target's is about to hide, bound at a directory of
    the temporary directory instead (in this private mount namespace); the new args and that directory."""
    i = args.index("--images-dir") + 1
    if Path(args[i]).parent != Path("/dev/shm"):
        return args, None
    view = tempfile.mkdtemp(prefix="warmstart-images-view-")
    linux.mount(args[i], view, None, linux.MS_BIND)
    return [*args[:i], view, *args[i + 1:]], view


def _run(criu_bin: Criu, args: list[str], log: Path, timeout_s: float, w: int) -> None:
    try:
        linux.mount("none", "/", None, linux.MS_REC | linux.MS_PRIVATE)
        view = None
        # This pid namespace's own view of /proc.
        linux.mount("proc", "/proc", "proc", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC)
        # CRIU makes the worker's ghost files (files it held deleted, as a multiprocessing semaphore in /dev/shm)
        # in the target's file system, and removes them from here: here, /dev/shm is the target's (pid 1 now).
        if target_path(1, "/dev/shm").is_dir() and os.path.isdir("/dev/shm"):
            args, view = _images_outside_shm(args)
            linux.bind_from("/proc/1/ns/mnt", "/dev/shm", "/dev/shm")
        if _join_cgroups():  # the worker CRIU forks stays in them
            args = [*args, "--manage-cgroups=ignore"]
        t0 = time.monotonic()
        try:
            criu.run(criu_bin, args, log, "restore", timeout=timeout_s)
        finally:
            if view:
                linux.umount(view)
                os.rmdir(view)
        send_msg(w, {"event": "restored", "seconds": time.monotonic() - t0})
        os._exit(0)
    except WarmstartError as e:
        send_error(w, e.problem, e.fix)
    except BaseException as e:
        send_error(w, f"restore runner failed: {e}", "run with --debug")
    os._exit(1)
