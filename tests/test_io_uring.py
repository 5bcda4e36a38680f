"""`warmstart run` refuses io_uring to the worker alone; a process holding io_uring gets a clear error."""

from __future__ import annotations

import errno
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, cli

SCRIPT = REPO / "tests" / "workers" / "io_uring.py"


def _wait_line(path: Path) -> str:
    for _ in range(200):
        text = path.read_text() if path.exists() else ""
        if "io_uring_setup" in text:
            return text.strip()
        time.sleep(0.05)
    raise TimeoutError(path)


def test_worker_gets_enosys_while_the_host_does_not(need_criu, home: Path) -> None:
    r = cli("run", "--name", "uring", "--", sys.executable, str(SCRIPT))
    assert r.returncode == 0, r.stderr
    assert _wait_line(home / "workers" / "uring" / "worker.log") == f"io_uring_setup errno={errno.ENOSYS}"
    outside = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True).stdout.strip()
    assert outside != f"io_uring_setup errno={errno.ENOSYS}"  # the filter is the worker's, not the host's


def test_checkpointing_a_process_holding_io_uring_explains_why(need_criu, home: Path, tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "hold"], stdout=subprocess.PIPE, text=True,
                            start_new_session=True, stdin=subprocess.DEVNULL)
    try:
        line = proc.stdout.readline()
        if "errno" in line:
            pytest.skip(f"io_uring is disabled on this host ({line.strip()})")
        r = cli("checkpoint", "--pid", str(proc.pid), "-o", str(tmp_path / "art"))
        assert r.returncode == 5, r.stderr
        assert "holds an io_uring instance" in r.stderr and "warmstart run" in r.stderr
        assert "Traceback" not in r.stderr
        assert not (tmp_path / "art").exists()
        assert proc.poll() is None  # left running
    finally:
        proc.kill()
        proc.wait()
