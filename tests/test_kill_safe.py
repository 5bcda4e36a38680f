"""A checkpoint killed at any moment loses nothing: the worker it quiesced resumes by itself once the lease
runs out, its partial artifact is removed by the next checkpoint, restore or `warmstart gc`, and one lock per
worker refuses a second checkpoint at once. Real CRIU, real processes, real SIGKILL."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import SLOW_QUIESCE, WARMSTART, cli, free_port, http_get, one_error_line
from warmstart.worker import protocol

pytestmark = [pytest.mark.criu, pytest.mark.slow]


def _state(name: str) -> str:
    workers = json.loads(cli("ps", "--json").stdout)["workers"]
    return next(str(w["state"]) for w in workers if w["name"] == name)


def _start_slow(name: str, quiesce_s: float) -> int:
    port = free_port()
    r = cli("run", "--name", name, "--wait", "--", sys.executable, str(SLOW_QUIESCE), str(port), str(quiesce_s))
    assert r.returncode == 0, r.stderr
    return port


def test_a_second_checkpoint_of_one_worker_is_refused_at_once(need_criu, home: Path, tmp_path: Path) -> None:
    _start_slow("slow", 3)
    first = subprocess.Popen([*WARMSTART, "checkpoint", "slow", "-o", str(tmp_path / "a"), "--leave-running"],
                             stderr=subprocess.PIPE, text=True)
    assert first.stderr is not None
    for line in first.stderr:
        if "quiescing" in line:
            break
    t0 = time.monotonic()
    one_error_line(cli("checkpoint", "slow", "-o", str(tmp_path / "b")), 5, "another checkpoint", "is running")
    assert time.monotonic() - t0 < 5  # at once, not after the first one's quiesce
    assert first.wait(timeout=60) == 0, first.stderr.read()
    assert (tmp_path / "a" / "manifest.json").is_file() and not (tmp_path / "b").exists()


def test_a_killed_checkpoint_leaves_the_worker_serving_and_its_partial_removed(need_criu, home: Path,
                                                                               tmp_path: Path) -> None:
    port = _start_slow("slow", 0)
    proc = subprocess.Popen([*WARMSTART, "checkpoint", "slow", "-o", str(tmp_path / "art")],
                            stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        if "recording the process tree" in line:  # quiesced: the worker now waits for a resume
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=10)
    assert _state("slow").startswith("quiesced")
    assert list(tmp_path.glob(".art.partial-*"))  # what the killed checkpoint had staged

    deadline = time.monotonic() + protocol.LEASE_S + 5
    while _state("slow") != "running" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _state("slow") == "running"  # resumed by itself, within the lease
    assert http_get(port) == "ok"

    r = cli("gc", "--json")
    assert r.returncode == 0, r.stderr
    assert [Path(p).name for p in json.loads(r.stdout)["removed"]] == [f".art.partial-{proc.pid}"]
    assert not list(tmp_path.glob(".art*"))
    r = cli("checkpoint", "slow", "-o", str(tmp_path / "art"), "--leave-running")  # and it checkpoints again
    assert r.returncode == 0, r.stderr


def test_a_quiesce_that_times_out_is_cancelled_and_the_worker_resumes(need_criu, home: Path, tmp_path: Path) -> None:
    """The worker finishes its quiesce after warmstart gave up: the cancel waiting for it resumes it at once,
    not only when the lease runs out."""
    _start_slow("slow", 2)
    r = cli("checkpoint", "slow", "-o", str(tmp_path / "art"), "--timeout", "0.5")
    one_error_line(r, 5, "did not acknowledge 'quiesce'")
    time.sleep(2.5)  # its quiesce is over, well inside the lease
    deadline = time.monotonic() + 2
    while _state("slow") != "running" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _state("slow") == "running"
    assert not list(tmp_path.glob(".art*"))


def test_a_full_disk_ends_in_one_line_and_leaves_nothing(need_criu, home: Path, tmp_path: Path) -> None:
    port = _start_slow("slow", 0)
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], check=True)
    try:
        r = cli("checkpoint", "slow", "-o", str(small / "art"))
        assert r.returncode in (3, 6), r.stderr  # the disk filled under CRIU (6) or under warmstart (3)
        line = one_error_line(r, r.returncode)
        assert "No space left" in line or "no space left" in line, line
        assert list(small.iterdir()) == []  # no partial artifact
    finally:
        subprocess.run(["umount", str(small)], check=True)
    assert http_get(port) == "ok" and _state("slow") == "running"  # resumed, serving
