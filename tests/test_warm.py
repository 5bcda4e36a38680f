"""A checkpoint taken right after `warmstart run` (no --wait) waits for the worker to be warm, so that its
artifact restores into a replica that can be reached; a worker that never gets there is named in a warning."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import cli, free_port, http_get

pytestmark = [pytest.mark.criu, pytest.mark.slow]


def test_a_checkpoint_right_after_run_waits_for_the_sdk(need_criu, home: Path, tmp_path: Path) -> None:
    port = free_port()
    r = cli("run", "--name", "early", "--", sys.executable, "-m", "warmstart.reference.server", "--port", str(port),
            "--kv-cache-mb", "16")
    assert r.returncode == 0, r.stderr
    r = cli("checkpoint", "early", "-o", str(tmp_path / "art"), "--leave-running")
    assert r.returncode == 0, r.stderr
    assert "waiting for worker early to be warm" in r.stderr
    m = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert m["worker"]["sdk"] and m["worker"]["port"] == port
    r = cli("restore", str(tmp_path / "art"), "--json")
    assert r.returncode == 0, r.stderr
    (rep,) = json.loads(r.stdout)["replicas"]
    assert rep["port"] and json.loads(http_get(rep["port"], "/health"))  # reachable from the host


def test_a_process_that_never_listens_is_checkpointed_with_a_warning(need_criu, home: Path, tmp_path: Path) -> None:
    r = cli("run", "--name", "quiet", "--", sys.executable, "-c", "import time; time.sleep(600)")
    assert r.returncode == 0, r.stderr
    r = cli("checkpoint", "quiet", "-o", str(tmp_path / "art"), "--timeout", "1")
    assert r.returncode == 0, r.stderr
    assert "has not joined the SDK nor opened a listening port" in r.stderr
