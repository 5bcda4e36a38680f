"""`warmstart run`: start a worker under management, in a shape CRIU can checkpoint.

The worker gets its own session (no controlling terminal, so no --shell-job), stdin from /dev/null,
stdout and stderr appended to a log file (O_APPEND: CRIU then does not insist the file keeps its size,
so each replica can log to a file of its own), a control directory for the quiesce/resume protocol,
a seccomp filter that refuses io_uring, and, for an engine named with --engine, its adapter's environment.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from warmstart import paths, procs, registry
from warmstart.criu import seccomp
from warmstart.errors import UsageError, WorkerError
from warmstart.quiesce import control, engines
from warmstart.registry import WorkerRecord
from warmstart.worker import protocol

LOG = "worker.log"
CONTROL = "control"


def prepare_dirs(name: str) -> tuple[Path, Path, Path]:
    d = paths.state_dir("workers", paths.check_name(name))
    paths.private_dir(d / CONTROL)
    log = d / LOG
    os.close(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600))
    return d, d / CONTROL, log


def start(name: str, command: list[str], engine: str = "plain", env: dict[str, str] | None = None,
           cwd: str | None = None) -> WorkerRecord:
    if not command:
        raise UsageError("no command to run", "pass it after --, e.g. `warmstart run -- python server.py`")
    exe = shutil.which(command[0]) if "/" not in command[0] else command[0]
    if not exe or not os.access(exe, os.X_OK):
        raise UsageError(f"command not found: {command[0]}", "check the command and PATH")
    engines.check(engine)
    adapter = engines.for_engine(engine)
    registry.claim(name)
    worker_dir, control_dir, log = prepare_dirs(name)
    full_env = {**os.environ, **(env or {}), **(adapter.env(worker_dir) if adapter else {}),
                protocol.ENV_CONTROL_DIR: str(control_dir), "WARMSTART_WORKER_NAME": name, "PYTHONUNBUFFERED": "1"}
    log_fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd, env=full_env,
                                cwd=cwd, start_new_session=True, close_fds=True,
                                preexec_fn=seccomp.refuse_io_uring)
    finally:
        os.close(log_fd)
    started = procs.start_time(proc.pid) or 0
    rec = WorkerRecord(name=name, kind="run", pid=proc.pid, started=started, command=command, engine=engine,
                       log=str(log), control_dir=str(control_dir),
                       port=adapter.port(command) if adapter else None)
    registry.save(rec)
    return rec


def wait_ready(rec: WorkerRecord, timeout_s: float, stop: Callable[[], None] = lambda: None) -> control.WorkerInfo:
    """Wait until the worker is warm: an engine serves a completion, an SDK worker announces itself. `stop`
    raises to end the wait early (a cancel)."""
    adapter = engines.for_engine(rec.engine)
    if adapter and rec.port:
        try:
            adapter.wait_healthy(rec.port, timeout_s, alive=rec.alive, stop=stop)
        except WorkerError as e:
            raise WorkerError(f"{e.problem}: {_tail(Path(rec.log))}", f"see its log: {rec.log}") from None
        adapter.check_warm(rec.port)
        return control.WorkerInfo(pid=rec.pid, engine=adapter.name, model=adapter.model(rec.port), port=rec.port)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = control.worker_info(Path(rec.control_dir), rec.pid)
        if info:
            return info
        if not rec.alive():
            tail = _tail(Path(rec.log))
            raise WorkerError(f"worker {rec.name!r} exited during start-up: {tail}", f"see its log: {rec.log}")
        stop()
        time.sleep(0.05)
    raise WorkerError(f"worker {rec.name!r} did not report ready within {timeout_s:g} s",
                      f"see its log: {rec.log}; raise --timeout for slow starts")


def _tail(log: Path, n: int = 1) -> str:
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except FileNotFoundError:
        return "(no log)"
    return " | ".join(lines[-n:]) or "(empty log)"
