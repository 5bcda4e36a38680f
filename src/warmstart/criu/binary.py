"""CRIU: finding a binary new enough, the options warmstart dumps and restores with, and its errors."""

from __future__ import annotations

import functools
import os
import re
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from warmstart import config, host
from warmstart.criu import pagefill
from warmstart.errors import EnvironmentProblem, StepFailed

MIN_VERSION = (4, 2)
_SETUP_HINT = "run scripts/setup.sh (it builds CRIU 4.2.1), or point WARMSTART_CRIU at a criu >= 4.2"


@dataclass(frozen=True)
class Criu:
    path: str
    version: str

    @functools.cached_property
    def threaded_reads(self) -> bool:
        """Whether this build carries scripts/criu/parallel-page-reads.patch (it reads the variable below)."""
        try:
            return _READ_THREADS_VAR.encode() in Path(self.path).read_bytes()
        except OSError:
            return False


# Read by the patched restore (scripts/criu/parallel-page-reads.patch); an unpatched CRIU ignores both.
_READ_THREADS_VAR = "CRIU_PAGE_READ_THREADS"
_HUGE_PAGES_VAR = "CRIU_PAGE_READ_THP"


def read_threads() -> int:
    """WARMSTART_READ_THREADS, default one per core, at most 16: the threads a restore reads an image with."""
    return config.current().read_threads


def huge_pages(replicas: int) -> bool:
    """WARMSTART_HUGE_PAGES for a restore of `replicas` at once: 1, always; 0, never; auto (the default): one
    replica, always; several, the page size this host's recent restores of as many were faster with
    (criu/pagefill.py: the better size differed between two VMs of one kind, 2x either way)."""
    mode = config.current().huge_pages
    return mode == "1" or (mode == "auto" and pagefill.choose(replicas))


def restore_env(huge: bool = True) -> dict[str, str]:
    """How a restore reads its pages: read_threads() threads, into huge pages (large anonymous areas) or not."""
    return {_READ_THREADS_VAR: str(read_threads()), _HUGE_PAGES_VAR: "1" if huge else "0"}


def _candidates() -> list[str]:
    chosen = config.current().criu
    if chosen:
        return [chosen]
    # A source checkout set up by scripts/setup.sh keeps its own (patched) build here; it comes first.
    out = [str(Path(__file__).resolve().parents[3] / ".deps" / "criu" / "bin" / "criu")]
    on_path = shutil.which("criu")
    if on_path:
        out.append(on_path)
    return out


def parse_version(text: str) -> str | None:
    m = re.search(r"^Version:\s*([0-9][0-9.]*)", text, re.M)
    return m.group(1) if m else None


def _version_of(path: str) -> str | None:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_version(out.stdout)


def version_ok(version: str) -> bool:
    return host.version_tuple(version)[:2] >= MIN_VERSION


@functools.lru_cache(maxsize=1)
def find() -> Criu:
    """The first CRIU >= 4.2 among WARMSTART_CRIU, PATH and the checkout's .deps; else a clear error."""
    if os.geteuid() != 0:
        raise EnvironmentProblem("checkpoint and restore need root (CRIU ptraces and restores processes)",
                                 "run as root")
    if not stat.S_ISCHR(os.stat("/dev/null").st_mode):
        raise EnvironmentProblem("/dev/null is a regular file on this host, so restored processes see it change",
                                 "recreate it: rm /dev/null && mknod -m 666 /dev/null c 1 3 (scripts/setup.sh does)")
    too_old = []
    for path in _candidates():
        if not os.path.isfile(path):
            continue
        version = _version_of(path)
        if version is None:
            too_old.append(f"{path} (does not run)")
        elif version_ok(version):
            return Criu(path, version)
        else:
            too_old.append(f"{path} is {version}")
    if too_old:
        raise EnvironmentProblem(f"CRIU too old or broken: {', '.join(too_old)}; need >= 4.2", _SETUP_HINT)
    raise EnvironmentProblem("CRIU not found", _SETUP_HINT)


# Options both directions need for inference workers (docs/design.md says why each is there).
_COMMON = ["--file-locks", "--ext-unix-sk", "--tcp-established"]


def dump_args(pid: int, images: Path, log: Path, action_script: str | None = None) -> list[str]:
    args = [
        "dump", "--tree", str(pid), "--images-dir", str(images), "--log-file", str(log), "-v4",
        *_COMMON,
        # warmstart decides the worker's fate after the artifact is complete; an interrupted dump
        # must leave it running.
        "--leave-running",
        # Replicas restore established connections closed, so there is nothing to protect by
        # rewriting the host's firewall during the dump.
        "--network-lock", "skip",
        # Removed files are saved as ghost files inside the image. A file held under a removed name that
        # another name still links gets a link_remap.N name instead: shm.used_by allows that only in
        # /dev/shm, whose segments the action script saves into the artifact (see criu/shm.py).
        "--ghost-limit", str(512 << 20), "--link-remap",
    ]
    if action_script:
        args += ["--action-script", action_script]
    return args


def restore_args(images: Path, work: Path, log: Path, pidfile: Path) -> list[str]:
    return [
        "restore", "--images-dir", str(images), "--work-dir", str(work), "--log-file", str(log), "-v4",
        *_COMMON,
        # Connections of the source worker mean nothing to a replica in its own network namespace.
        "--tcp-close",
        "--restore-detached", "--pidfile", str(pidfile),
    ]


_KNOWN = [
    (re.compile(r"anon_inode:\[io_uring\]"),
     "the worker holds an io_uring instance, which CRIU cannot dump",
     "start it with `warmstart run` (which refuses io_uring to the worker) or set sysctl kernel.io_uring_disabled=2"),
    (re.compile(r"has bad size|Can't open file .*: No such file"),
     "a file the worker had open is missing or changed on this host",
     "restore on a host with the same files (model, code, libraries) at the same paths"),
    (re.compile(r"pid \d+ is busy|Can't fork for \d+: File exists"),
     "a pid the image needs is taken",
     "restore into a fresh pid namespace (warmstart restore does this)"),
    (re.compile(r"Can't dump (?:an )?(?:ctty|tty)|tty"),
     "the worker is attached to a terminal",
     "start it with `warmstart run`, which detaches it from the terminal"),
    (re.compile(r"Unable to seize|ptrace.*Operation not permitted"),
     "CRIU cannot attach to the worker",
     "check it is not traced by a debugger and that warmstart runs as root with CAP_SYS_PTRACE"),
]


# Logged as errors, but CRIU carries on (RLIMIT_NOFILE cannot be raised on some VMs; its kernel-feature probes
# log "tun: Unable to create tun" where /dev/net/tun is absent, in a container), or summaries.
_BENIGN = re.compile(r"RLIMIT_NOFILE|Restoring FAILED|Dumping FAILED|tun: Unable to create tun")


def explain(log_text: str) -> tuple[str, str]:
    """The first error CRIU logged, in words, with a fix where the pattern is known."""
    # "warmstart: " lines come from warmstart's own action script (criu/shm.py), printed into CRIU's log.
    errors = [ln for ln in log_text.splitlines()
              if ("Error (" in ln or ln.startswith(("Error", "warmstart: "))) and not _BENIGN.search(ln)]
    first = errors[0].split("): ", 1)[-1].strip() if errors else "no error line in the log"
    joined = "\n".join(errors)
    for pattern, problem, fix in _KNOWN:
        if pattern.search(joined):
            return f"{problem} ({first})", fix
    return first, "see the CRIU log named above; run with --debug for details"


def run(criu: Criu, args: list[str], log: Path, what: str, timeout: float | None = None,
        env: dict[str, str] | None = None, enter: int | None = None) -> None:
    """Run CRIU to completion in its own session.

    CRIU is never killed midway (subprocess.run would kill it on KeyboardInterrupt): a dump stopped
    while its parasite code is inside the worker can take the worker down with it. The caller defers
    SIGINT/SIGTERM around this call instead.
    """
    # enter: run CRIU inside that process's namespaces (a container's), where the paths it is given (CRIU itself,
    # images) must resolve too. The log is this side's file: CRIU gets it as an open fd. CRIU shares the
    # worker's network, IPC and UTS namespaces too, so the image holds none of them: a restore into a
    # placeholder joins the placeholder's instead of writing the source's hostname and IPC sysctls into it
    # (a pod's /proc/sys is read-only).
    prefix = ["nsenter", f"--target={enter}", "--pid", "--mount", "--net", "--ipc", "--uts", "--"] if enter else []
    if args[0] == "restore":
        env = {**restore_env(), **(env or {})}
    fds: tuple[int, ...] = ()
    if enter:
        fds = (os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600),)
        args = [f"/proc/self/fd/{fds[0]}" if a == str(log) else a for a in args]
    try:
        proc = subprocess.Popen([*prefix, criu.path, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, start_new_session=True, env={**os.environ, **env} if env else None,
                                pass_fds=fds)
    finally:
        for fd in fds:
            os.close(fd)
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as e:
        proc.kill()
        proc.wait()
        raise StepFailed(f"CRIU {what} did not finish in {timeout:.0f} s (log: {log})", "see the log") from e
    if proc.returncode != 0:
        text = log.read_text(errors="replace") if log.exists() else stderr
        problem, fix = explain(text)
        raise StepFailed(f"CRIU {what} failed: {problem} (log: {log})", fix)
