"""Every failure a user can cause: one line naming problem and fix, a non-zero exit, nothing lost or left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, SAVED_STATE, SLOW_QUIESCE, WARMSTART, cli, free_port, http_get, resign, wait_http
from conftest import one_error_line as _one_error_line
from warmstart import demo, procs

pytestmark = [pytest.mark.criu]


def _holders() -> set[int]:
    """Processes that could be replica inits: anything forked from this test's warmstart CLI that outlived it
    (other warmstart processes on the machine have another WARMSTART_HOME)."""
    home = os.environ.get("WARMSTART_HOME")
    return {p for p in map(int, filter(str.isdigit, os.listdir("/proc")))
            if "warmstart" in " ".join(procs.cmdline(p)) and procs.alive(p)
            and procs.environ(p).get("WARMSTART_HOME") == home}




def test_unknown_pid(need_criu, home: Path, tmp_path: Path) -> None:
    r = cli("checkpoint", "--pid", "4999999", "-o", str(tmp_path / "a"))
    _one_error_line(r, 5, "no running process", "4999999")
    assert not (tmp_path / "a").exists()


def test_unknown_worker_name(home: Path, tmp_path: Path) -> None:
    _one_error_line(cli("checkpoint", "nosuch", "-o", str(tmp_path / "a")), 2, "no worker named", "warmstart ps")


def test_missing_criu(home: Path, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the root check comes first")
    r = cli("checkpoint", "--pid", str(os.getpid()), "-o", str(tmp_path / "a"),
            env={"WARMSTART_CRIU": "/nonexistent/criu"})
    _one_error_line(r, 3, "CRIU not found", "setup.sh")


def test_too_old_criu(home: Path, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the root check comes first")
    old = tmp_path / "criu"
    old.write_text("#!/bin/sh\necho 'Version: 3.17.1'\n")
    old.chmod(0o755)
    r = cli("checkpoint", "--pid", str(os.getpid()), "-o", str(tmp_path / "a"), env={"WARMSTART_CRIU": str(old)})
    _one_error_line(r, 3, "3.17.1", ">= 4.2")


@pytest.mark.parametrize("damage,words", [
    ("flip", "does not match its checksum"),
    ("truncate", "truncated"),
    ("manifest", "corrupt"),
])
def test_damaged_artifact_starts_nothing(counter_artifact: Path, damage: str, words: str) -> None:
    pages = next(counter_artifact.glob("images/pages-*.img*"))
    if damage == "flip":
        with open(pages, "r+b") as f:
            f.seek(4096)
            b = f.read(1)
            f.seek(4096)
            f.write(bytes([b[0] ^ 0xFF]))
        bad = str(pages)
    elif damage == "truncate":
        os.truncate(pages, pages.stat().st_size // 2)
        bad = str(pages)
    else:
        (counter_artifact / "manifest.json").write_text('{"schema_version": 1, "worker": 7}')
        bad = "manifest.json"
    before = _holders()
    _one_error_line(cli("restore", str(counter_artifact)), 4, words, bad)
    assert [w for w in json.loads(cli("ps", "--json").stdout)["workers"] if w["kind"] == "replica"] == []
    assert _holders() <= before


def test_incompatible_host_is_refused(counter_artifact: Path) -> None:
    m = json.loads((counter_artifact / "manifest.json").read_text())
    m["host"]["arch"] = "riscv64"
    m["host"]["cpu_flags"].append("avx512_fp16")
    (counter_artifact / "manifest.json").write_text(json.dumps(m))
    resign(counter_artifact)
    _one_error_line(cli("restore", str(counter_artifact)), 4, "cannot be restored here", "riscv64", "avx512_fp16")


def test_busy_port_starts_nothing(counter_artifact: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        _one_error_line(cli("restore", str(counter_artifact), "--port", str(port)), 2, f"port {port}", "--port")
    assert json.loads(cli("ps", "--json").stdout)["workers"] == []


@pytest.mark.parametrize("env, words", [({"WARMSTART_READ_THREADS": "many"}, "WARMSTART_READ_THREADS"),
                                        ({"WARMSTART_HUGE_PAGES": "yes"}, "WARMSTART_HUGE_PAGES")])
def test_bad_read_setting_starts_nothing(counter_artifact: Path, env: dict, words: str) -> None:
    _one_error_line(cli("restore", str(counter_artifact), env=env), 2, words)
    assert json.loads(cli("ps", "--json").stdout)["workers"] == []


@pytest.fixture()
def ref_worker(need_criu, home: Path):
    port = free_port()
    r = cli("run", "--name", "ref", "--wait", "--", sys.executable, "-m", "warmstart.reference.server",
            "--port", str(port), "--kv-cache-mb", "64")
    assert r.returncode == 0, r.stderr
    return port, demo.complete(port)


def test_interrupted_checkpoint_leaves_no_artifact_and_worker_serving(ref_worker, tmp_path: Path) -> None:
    port, before = ref_worker
    out = tmp_path / "art"
    proc = subprocess.Popen([*WARMSTART, "checkpoint", "ref", "-o", str(out)], stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if "dumping" in line:
            proc.send_signal(signal.SIGTERM)  # mid-dump
            break
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 130, rest
    assert "interrupted by SIGTERM" in rest and "Traceback" not in rest
    assert not out.exists() and not list(tmp_path.glob(".art*"))
    assert demo.complete(port) == before  # resumed, serving, same state


def test_interrupted_checkpoint_gives_a_worker_back_what_it_saved(need_criu, home: Path, tmp_path: Path) -> None:
    """The worker reads its saved state back from the staging directory before that directory is removed."""
    port = free_port()
    r = cli("run", "--name", "st", "--wait", "--", sys.executable, str(SAVED_STATE), str(port))
    assert r.returncode == 0, r.stderr
    digest = http_get(port).split()[0]
    out = tmp_path / "art"
    proc = subprocess.Popen([*WARMSTART, "checkpoint", "st", "-o", str(out)], stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if "dumping" in line:
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 130, rest
    assert not out.exists() and not list(tmp_path.glob(".art*"))
    got, _, where = http_get(port).split()
    assert got == digest and where.startswith(str(tmp_path / ".art.partial-"))


def test_dump_dying_midway_leaves_no_artifact(ref_worker, tmp_path: Path) -> None:
    port, before = ref_worker
    small = tmp_path / "small"
    small.mkdir()
    # A filesystem too small for the image: CRIU fails partway through writing pages.
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(small)], check=True)
    try:
        r = cli("checkpoint", "ref", "-o", str(small / "art"))
        _one_error_line(r, 6, "CRIU dump failed")
        assert os.listdir(small) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)
    assert demo.complete(port) == before


def test_quiesce_timeout_leaves_worker_serving(need_criu, home: Path, tmp_path: Path) -> None:
    port = free_port()
    r = cli("run", "--name", "slow", "--wait", "--", sys.executable, str(SLOW_QUIESCE), str(port), "30")
    assert r.returncode == 0, r.stderr
    t0 = time.monotonic()
    _one_error_line(cli("checkpoint", "slow", "-o", str(tmp_path / "art"), "--timeout", "1"), 5,
                    "did not acknowledge 'quiesce' within 1 s")
    assert time.monotonic() - t0 < 20
    assert not (tmp_path / "art").exists()
    assert http_get(port) == "ok"


def test_a_source_that_does_not_resume_after_the_dump_is_named_with_the_finished_artifact(
        need_criu, home: Path, tmp_path: Path) -> None:
    """--leave-running resumes the worker before the artifact is finished; a resume that times out is reported
    once the artifact is whole, which the error line says; the artifact is whole and the worker serving."""
    port = free_port()
    r = cli("run", "--name", "slowr", "--wait", "--", sys.executable, str(SLOW_QUIESCE), str(port), "0", "8")
    assert r.returncode == 0, r.stderr
    r = cli("checkpoint", "slowr", "-o", str(tmp_path / "art"), "--leave-running", "--timeout", "2")
    _one_error_line(r, 5, f"the checkpoint {tmp_path / 'art'} is complete, but its source worker did not resume",
                    "did not acknowledge 'resume' within 2 s")
    assert cli("inspect", str(tmp_path / "art"), "--verify").returncode == 0
    assert http_get(port) == "ok"


def test_a_checkpoint_interrupted_inside_a_long_step_stops_at_once(need_criu, home: Path, tmp_path: Path) -> None:
    """The image passes (and the checksums) look at the interruption every chunk, not only between steps: the
    command says it is stopping and is gone long before the step would have ended (compressing and sealing
    1 GB takes several seconds on 2 cores)."""
    step = "encrypting the image"
    port = free_port()
    r = cli("run", "--name", "big", "--", sys.executable, str(REPO / "tests" / "workers" / "memory.py"), str(port),
            "1024")
    assert r.returncode == 0, r.stderr
    wait_http(port, timeout=120)
    want = http_get(port)
    out = tmp_path / "art"
    proc = subprocess.Popen([*WARMSTART, "checkpoint", "big", "-o", str(out)], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "WARMSTART_COMPRESS": "1", "WARMSTART_ZERO_PAGES": "0"})
    assert proc.stderr is not None
    for line in proc.stderr:
        if step in line:
            time.sleep(0.2)  # inside the step
            sent = time.monotonic()
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 130, rest
    assert time.monotonic() - sent < 1.0, rest  # the step alone takes over 2 s here
    assert "SIGINT: stopping the checkpoint" in rest and "Traceback" not in rest, rest
    assert not out.exists() and not list(tmp_path.glob(".art*"))
    assert http_get(port) == want
