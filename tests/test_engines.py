"""Engine adapters and /dev/shm handling: unit checks, and warmstart's own error paths against a stand-in server.

The stand-in (tests/workers/fake_engine.py) only exercises how warmstart reacts to an engine that misbehaves;
the real vLLM round trip is tests/test_vllm.py.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import REPO, cli, free_port, http_get, one_error_line, wait_http
from warmstart import linux, procs
from warmstart.criu import shm
from warmstart.errors import EnvironmentProblem, UsageError, WorkerError
from warmstart.quiesce import engines
from warmstart.quiesce.http import flag_value, socket_dir

FAKE = REPO / "tests" / "workers" / "fake_engine.py"
SHM_PAIR = REPO / "tests" / "workers" / "shm_pair.py"


def test_an_engines_socket_directory_is_private_and_never_someone_elses(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # gettempdir() caches TMPDIR
    long = tmp_path / ("w" * 70)  # too long a path for sockets: the directory goes to the temporary directory
    d = socket_dir(long, "rpc")
    assert d.parent == tmp_path and oct(d.stat().st_mode & 0o777) == "0o700"
    other = tmp_path / "x" / ("y" * 70)
    planted = tmp_path / "elsewhere"
    planted.mkdir()
    name = f"warmstart-{hashlib.sha256(str(other / 'rpc').encode()).hexdigest()[:12]}"
    (tmp_path / name).symlink_to(planted)  # what another user of a shared /tmp could leave there first
    with pytest.raises(EnvironmentProblem, match="only this user can write"):
        socket_dir(other, "rpc")


def test_flag_value_and_ports() -> None:
    cmd = ["python", "-m", "vllm.entrypoints.openai.api_server", "--model", "m", "--port=9001"]
    assert flag_value(cmd, "--model") == "m"
    assert flag_value(cmd, "--port") == "9001"
    assert engines.for_engine("vllm").port(cmd) == 9001
    assert engines.for_engine("vllm").port(["vllm", "serve", "m"]) == 8000
    assert engines.for_engine("sglang").port(["python", "-m", "sglang.launch_server"]) == 30000
    assert engines.for_engine("plain") is None and engines.for_engine("my-sdk-engine") is None
    with pytest.raises(UsageError, match="unknown engine 'tgi'"):
        engines.check("tgi")


def test_adapter_environment(tmp_path: Path) -> None:
    env = engines.for_engine("vllm").env(tmp_path)
    assert env["VLLM_SERVER_DEV_MODE"] == "1" and Path(env["VLLM_RPC_BASE_PATH"]).is_dir()
    assert engines.for_engine("vllm").private_dirs(env) == [env["VLLM_RPC_BASE_PATH"]]
    senv = engines.for_engine("sglang").env(tmp_path)
    assert engines.for_engine("sglang").private_dirs(senv) == [senv["TMPDIR"]]
    assert engines.for_engine("vllm").uses_gpu_release(["x", "--enable-sleep-mode"])
    assert not engines.for_engine("sglang").uses_gpu_release(["x"])


def test_engine_not_listening_is_not_warm() -> None:
    with pytest.raises(WorkerError, match="not warm yet"):
        engines.for_engine("vllm").check_warm(free_port())


def test_sparse_copy_keeps_data_and_holes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    with open(src, "wb") as f:
        f.truncate(64 << 20)
        f.seek(32 << 20)
        f.write(b"middle")
        f.seek((64 << 20) - 4)
        f.write(b"tail")
    copied = linux.sparse_copy(src, tmp_path / "dst")
    assert (tmp_path / "dst").read_bytes() == src.read_bytes()
    assert copied < 1 << 20  # only the data, not 64 MiB of holes
    assert (tmp_path / "dst").stat().st_blocks * 512 < 1 << 20


def test_used_by_finds_segments_and_refuses_relinked_files(tmp_path: Path) -> None:
    name = f"warmstart-test-{os.getpid()}"
    seg = Path("/dev/shm") / name
    seg.write_bytes(b"x" * 4096)
    other = tmp_path / "other"
    held = tmp_path / "held"
    held.write_text("data")
    os.link(held, other)
    code = (f"import os,time; a=open({str(seg)!r}); b=open({str(held)!r}); "
            f"os.unlink({str(held)!r}); print('ok', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ok"
        with pytest.raises(WorkerError, match="another name still links it"):
            shm.used_by([p.pid])
        other.unlink()  # now the held file has no name at all: CRIU saves it as a ghost file
        use = shm.used_by([p.pid])
        assert use.names == [name] and not use.remapped
    finally:
        p.kill()
        p.wait()
        seg.unlink(missing_ok=True)


@pytest.mark.criu
def test_engine_answering_health_but_not_completions_is_refused_and_left_running(
        need_criu, home: Path, tmp_path: Path) -> None:
    port = free_port()
    r = cli("run", "--name", "eng", "--engine", "vllm", "--", sys.executable, str(FAKE), "--port", str(port),
            "--mode", "no-completions")
    assert r.returncode == 0, r.stderr
    _wait_health(port)
    one_error_line(cli("checkpoint", "eng", "-o", str(tmp_path / "a")), 5, "answers health but not completions")
    assert not (tmp_path / "a").exists()
    assert http_get(port, "/health") is not None  # still serving, untouched
    r = cli("run", "--name", "eng2", "--engine", "vllm", "--wait", "--timeout", "30", "--", sys.executable,
            str(FAKE), "--port", str(free_port()), "--mode", "no-completions")
    one_error_line(r, 5, "answers health but not completions")


@pytest.mark.criu
def test_engine_dying_during_quiesce(need_criu, home: Path, tmp_path: Path) -> None:
    port = free_port()
    r = cli("run", "--name", "eng", "--engine", "vllm", "--wait", "--timeout", "30", "--", sys.executable,
            str(FAKE), "--port", str(port), "--mode", "dies-on-sleep")
    assert r.returncode == 0, r.stderr
    one_error_line(cli("checkpoint", "eng", "-o", str(tmp_path / "a")), 5, "vLLM did not pause")
    assert not (tmp_path / "a").exists()
    assert not list(tmp_path.glob(".a.partial*"))


@pytest.mark.criu
@pytest.mark.slow
def test_shared_memory_segments_travel_with_each_replica(need_criu, home: Path, tmp_path: Path) -> None:
    """Named /dev/shm segments and a relinked semaphore (CRIU's link_remap) restore into each replica's own /dev/shm."""
    before = set(os.listdir("/dev/shm"))
    port = free_port()
    try:
        assert cli("run", "--name", "pair", "--", sys.executable, str(SHM_PAIR), str(port)).returncode == 0
        wait_http(port)  # its GET counts 1001
        assert http_get(port).split()[0] == "1002"
        r = cli("checkpoint", "pair", "-o", str(tmp_path / "art"))
        assert r.returncode == 0, r.stderr
        saved = sorted(p.name for p in (tmp_path / "art" / "shm").iterdir())
        assert any(n.startswith("psm_") for n in saved) and any(n.startswith("link_remap.") for n in saved), saved
        assert not [n for n in os.listdir("/dev/shm") if n.startswith("link_remap.")]  # nothing left on the host
        assert cli("inspect", str(tmp_path / "art"), "--verify").returncode == 0
        p0, p1 = free_port(), free_port()
        for name, p in (("r0", p0), ("r1", p1)):
            r = cli("restore", str(tmp_path / "art"), "--name", name, "--port", str(p))
            assert r.returncode == 0, r.stderr
        # Each replica counts on in its own copy of the segment, through the child process and the lock.
        assert http_get(p0).split()[0] == "1003"
        assert http_get(p1).split()[0] == "1003"
        assert http_get(p0).split()[0] == "1004"
    finally:
        for n in set(os.listdir("/dev/shm")) - before:  # the source's own segments (it was stopped, not exited)
            Path("/dev/shm", n).unlink(missing_ok=True)


def _wait_health(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            http_get(port, "/health", timeout=2)
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(port)


def test_procs_environ_reads_own_environment() -> None:
    assert procs.environ(os.getpid()).get("PATH") == os.environ.get("PATH")


@pytest.mark.criu
def test_checkpoint_stops_the_whole_source_tree(need_criu, home: Path, tmp_path: Path) -> None:
    """A worker's helper process (here shm_pair's child) must not outlive the worker checkpointed away."""
    port = free_port()
    before = set(os.listdir("/dev/shm"))
    try:
        assert cli("run", "--name", "pair", "--", sys.executable, str(SHM_PAIR), str(port)).returncode == 0
        wait_http(port)
        from warmstart import registry

        family = procs.tree(registry.get("pair").pid)
        assert len(family) >= 2
        assert cli("checkpoint", "pair", "-o", str(tmp_path / "art")).returncode == 0
        assert not [p for p in family if procs.alive(p)]
    finally:
        for n in set(os.listdir("/dev/shm")) - before:
            Path("/dev/shm", n).unlink(missing_ok=True)
