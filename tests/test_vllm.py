"""A real vLLM server (CPU build, tiny local model) under warmstart: warm check, checkpoint, two replicas.

Needs vLLM in its own virtualenv (`scripts/setup.sh --vllm` makes .deps/vllm; WARMSTART_VLLM_PYTHON points
elsewhere). Skips with the reason where it is missing, unless WARMSTART_REQUIRE_VLLM=1 (set by .ci/run).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, cli, free_port
from warmstart import procs, registry
from warmstart.pipeline import run
from warmstart.quiesce import engines
from warmstart.reference import model

pytestmark = [pytest.mark.criu, pytest.mark.slow, pytest.mark.timeout(900)]

VLLM_PYTHON = Path(os.environ.get("WARMSTART_VLLM_PYTHON", REPO / ".deps" / "vllm" / "bin" / "python"))
PROMPT = "The quick brown fox"


@pytest.fixture(scope="session")
def need_vllm() -> None:
    problem = None
    if not VLLM_PYTHON.exists():
        problem = f"{VLLM_PYTHON} does not exist"
    else:
        r = subprocess.run([str(VLLM_PYTHON), "-c", "import vllm"], capture_output=True, text=True)
        if r.returncode != 0:
            problem = f"vllm does not import: {r.stderr.strip().splitlines()[-1:]}"
    if problem:
        if os.environ.get("WARMSTART_REQUIRE_VLLM") == "1":
            pytest.fail(f"vLLM is required here: {problem}")
        pytest.skip(f"needs vLLM (scripts/setup.sh --vllm): {problem}")


def vllm_command(model_dir: Path, port: int) -> list[str]:
    return [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--served-model-name", "tiny", "--port", str(port), "--max-model-len", "256", "--dtype", "float32",
            "--kv-cache-memory-bytes", str(64 << 20)]


def test_vllm_server_round_trip_and_two_replicas(need_criu, need_vllm, home: Path, tmp_path: Path) -> None:
    vllm = engines.for_engine("vllm")
    port = free_port()
    r = cli("run", "--name", "vllm", "--engine", "vllm", "--", *vllm_command(model.ensure(), port))
    assert r.returncode == 0, r.stderr

    # Not warm yet (it takes tens of seconds to start): refused, and left starting as it was.
    r = cli("checkpoint", "vllm", "-o", str(tmp_path / "early"))
    assert r.returncode == 5, r.stderr
    assert "not warm yet" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "early").exists()
    source = registry.get("vllm")
    assert source.alive()

    run.wait_ready(source, 600)
    expected = vllm.complete(port, PROMPT)
    assert expected and vllm.complete(port, PROMPT) == expected  # greedy: repeatable

    r = cli("checkpoint", "vllm", "-o", str(tmp_path / "art"), "--json")
    assert r.returncode == 0, r.stderr
    assert not procs.alive(source.pid, source.started)
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    w = manifest["worker"]
    assert (w["engine"], w["model"], w["port"]) == ("vllm", "tiny", port)
    assert w["private_dirs"] and any(f["path"].startswith("shm/psm_") for f in manifest["files"])

    r = cli("restore", str(tmp_path / "art"), "--replicas", "2", "--json")
    assert r.returncode == 0, r.stderr
    replicas = json.loads(r.stdout)["replicas"]
    assert len(replicas) == 2 and len({x["port"] for x in replicas}) == 2
    for rep in replicas:
        assert vllm.complete(rep["port"], PROMPT) == expected
    for rep in replicas:  # and each goes on serving: a second, different request
        assert vllm.complete(rep["port"], PROMPT + " jumps", max_tokens=4)

    # A replica is checkpointed in turn: warm-checked on the port it listens on in its own namespaces (its
    # record holds the host port forwarded to it), and its artifact restores as the first one did.
    again, last = replicas[0], replicas[1]
    r = cli("checkpoint", again["name"], "-o", str(tmp_path / "again"))
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "again" / "manifest.json").read_text())["worker"]["port"] == port
    r = cli("restore", str(tmp_path / "again"), "--json")
    assert r.returncode == 0, r.stderr
    (third,) = json.loads(r.stdout)["replicas"]
    assert vllm.complete(third["port"], PROMPT) == expected

    for rep in (last, third):
        assert cli("stop", rep["name"]).returncode == 0
        assert not procs.alive(rep["pid"])
    assert not procs.alive(again["pid"])
    assert not [n for n in os.listdir("/dev/shm") if n.startswith("link_remap.")]
