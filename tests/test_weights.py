"""The weight service on CPU: weights stay out of the image, a restore maps them again by content hash.

Real processes throughout: the service (`warmstart weights serve`), the reference worker mapping its weights
from it, real CRIU. The GPU path (CUDA VMM, exportable handles) runs in bench/gpu.py on the H100.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import WARMSTART, cli, evict_pages, free_port, one_error_line
from warmstart import procs
from warmstart.reference import model
from warmstart.reference.model import ModelShape
from warmstart.weights import client as weights
from warmstart.weights import layout

pytestmark = [pytest.mark.criu, pytest.mark.slow]

# ~545 MB of float32 weights: larger than everything else the worker's image holds (~280 MB).
SHAPE = ModelShape(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16,
                   num_key_value_heads=4)
PROMPT = {"prompt": "shared weights", "max_tokens": 12}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the model, so a test may change its files."""
    d = tmp_path_factory.mktemp("model") / "m"
    shutil.copytree(model.ensure(SHAPE), d)
    return d


@pytest.fixture()
def service(tmp_path: Path):
    sock = tmp_path / "weights.sock"
    p = subprocess.Popen([*WARMSTART, "weights", "serve", "--socket", str(sock)], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while not sock.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    yield sock, p
    p.kill()
    p.wait()


def _complete(port: int) -> str:
    import urllib.request

    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(PROMPT).encode())
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())["choices"][0]["text"]


def test_layout_places_each_file_aligned(model_dir: Path) -> None:
    files = sorted(model_dir.glob("*.safetensors"))
    lay = layout.plan(files)
    assert all(f.offset % layout.ALIGN == 0 for f in lay.files)
    assert lay.size >= sum(f.size for f in lay.files)
    names = {t.name for t in lay.tensors}
    assert "model.embed_tokens.weight" in names and "lm_head.weight" in names
    assert layout.Layout.from_json(json.loads(json.dumps(lay.to_json()))) == lay
    with pytest.raises(ValueError, match="not a safetensors file"):
        layout.read_header(model_dir / "config.json")


def test_weights_stay_out_of_the_image_and_restore_by_hash(need_criu, home: Path, tmp_path: Path, model_dir: Path,
                                                           service) -> None:
    sock, svc = service
    port = free_port()
    r = cli("run", "--name", "w", "--wait", "--timeout", "120", "--", sys.executable, "-m",
            "warmstart.reference.server", "--port", str(port), "--model", str(model_dir), "--kv-cache-mb", "8",
            "--weights-socket", str(sock))
    assert r.returncode == 0, r.stderr
    expected = _complete(port)

    r = cli("checkpoint", "w", "-o", str(tmp_path / "art"), "--json")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    refs = manifest["worker"]["weights"]
    assert len(refs) == 1 and refs[0]["socket"] == str(sock) and len(refs[0]["hash"]) == 64
    weight_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    assert manifest["image_bytes"] < weight_bytes, (manifest["image_bytes"], weight_bytes)

    for name in ("a", "b"):  # a replica killed and brought back: the service still holds the weights
        if name == "b":
            evict_pages(tmp_path / "art")  # the image is read ahead, then the service is asked for the weights
        r = cli("restore", str(tmp_path / "art"), "--name", name, "--json")
        assert r.returncode == 0, r.stderr
        rport = json.loads(r.stdout)["replicas"][0]["port"]
        assert _complete(rport) == expected
        assert cli("stop", name).returncode == 0
    status, _ = weights.request(str(sock), {"op": "status"})
    assert len(status["sets"]) == 1 and status["sets"][0]["served"] == 3  # loaded once, mapped three times

    # Changed weight files: the service reloads them, and the restore refuses another content hash.
    with open(next(model_dir.glob("*.safetensors")), "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x01\x02\x03\x04")
    one_error_line(cli("restore", str(tmp_path / "art"), "--name", "c"), 5, "weight hash mismatch")
    assert not [n for n in ("c",) if (home / "workers" / n / "worker.json").exists()]
    assert weights.request(str(sock), {"op": "status"})[0]["ok"]  # and the service keeps serving

    svc.kill()
    svc.wait()
    one_error_line(cli("restore", str(tmp_path / "art"), "--name", "d"), 5, "cannot reach the weight service")
    assert not (home / "workers" / "d" / "worker.json").exists()
    assert not [p for p in procs.children(1) if "warmstart.reference.server" in " ".join(procs.cmdline(p))
                and procs.environ(p).get("WARMSTART_WORKER_NAME") in ("c", "d")]
