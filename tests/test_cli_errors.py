"""Every usage mistake, run through the installed `warmstart` binary: exit 2, one `error:` line naming the
problem, no traceback (typer carries its own copy of click, whose exceptions must be caught too)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BINARY = Path(sys.executable).parent / "warmstart"

MISTAKES = [
    (["bogus"], "No such command"),
    (["checkpoint"], "Missing option '--output'"),
    (["checkpoint", "w", "--pid", "1", "-o", "/tmp/x"], "not both"),
    (["ps", "--bogus"], "No such option"),
    (["restore", "/tmp/x", "--replicas", "0"], "--replicas"),
    (["restore", "/tmp/x", "--port", "99999"], "--port"),
    (["restore", "/tmp/x", "--port", "-5"], "--port"),
    (["restore", "/tmp/x", "--timeout", "0"], "--timeout"),
    (["restore", "/tmp/x", "--into", "1", "--replicas", "2"], "--into"),
    (["run", "--name", "x"], "no command to run"),
    (["weights", "serve", "--device", "tpu"], "unknown device"),
]


@pytest.mark.parametrize("args,words", MISTAKES, ids=[" ".join(a) for a, _ in MISTAKES])
def test_a_usage_mistake_exits_2_with_one_line(args: list[str], words: str, tmp_path: Path) -> None:
    assert BINARY.is_file(), f"{BINARY} is not installed (scripts/setup.sh installs it)"
    r = subprocess.run([str(BINARY), *args], capture_output=True, text=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin", "WARMSTART_HOME": str(tmp_path / "home")})
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and words in errors[0], r.stderr


def test_bare_warmstart_shows_the_help_and_exits_2(tmp_path: Path) -> None:
    r = subprocess.run([str(BINARY)], capture_output=True, text=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin", "WARMSTART_HOME": str(tmp_path / "home")})
    assert r.returncode == 2 and "Usage" in r.stdout + r.stderr and "internal error" not in r.stderr


def test_version() -> None:
    from warmstart import __version__

    r = subprocess.run([sys.executable, "-m", "warmstart", "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == f"warmstart {__version__}", r.stdout + r.stderr


def test_help_shows_flags_as_flags_and_runs_usage_its_command() -> None:
    def helptext(*args: str) -> str:
        r = subprocess.run([sys.executable, "-m", "warmstart", *args, "--help"], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout

    run = helptext("run")
    assert "Usage: warmstart run [OPTIONS] -- CMD [ARGS]..." in run
    for text in (run, helptext(), helptext("restore"), helptext("checkpoint")):
        assert "<bool>" not in text and "--help" in text


def test_a_signal_while_run_waits_ends_in_one_line_and_stops_the_worker(home: Path) -> None:
    import signal
    import time

    from conftest import cli, one_error_line

    # An engine worker that never serves: `--wait` would wait out its timeout.
    p = subprocess.Popen([str(BINARY), "run", "--name", "slowpoke", "--engine", "vllm", "--wait", "--timeout", "60",
                          "--", sys.executable, "-c", "import time; time.sleep(100)"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while "slowpoke" not in cli("ps").stdout:
        assert time.monotonic() < deadline and p.poll() is None
        time.sleep(0.1)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    one_error_line(subprocess.CompletedProcess(p.args, p.returncode, out, err), 130, "interrupted by SIGTERM")
    assert "slowpoke" not in cli("ps").stdout  # what it had started was undone
