"""GPU round trip on a real NVIDIA GPU: CUDA lock+checkpoint, CRIU dump, restore, CUDA restore+unlock."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from conftest import cli, free_port
from warmstart import demo


def _gpu_problem() -> str | None:
    if not Path("/dev/nvidiactl").exists():
        return "no NVIDIA device on this host"
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    return None if torch.cuda.is_available() else "torch sees no CUDA device"


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_gpu_problem() is not None, reason=str(_gpu_problem()))]


def test_reference_worker_on_gpu_round_trips(need_criu, home: Path, tmp_path: Path) -> None:
    port = free_port()
    t0 = time.monotonic()
    r = cli("run", "--name", "gref", "--wait", "--", sys.executable, "-m", "warmstart.reference.server",
            "--port", str(port), "--device", "cuda", "--kv-cache-mb", "1024")
    assert r.returncode == 0, r.stderr
    before = demo.complete(port)
    cold = time.monotonic() - t0
    r = cli("checkpoint", "gref", "-o", str(tmp_path / "art"), "--leave-running", "--json")
    assert r.returncode == 0, r.stderr
    ck = json.loads(r.stdout)
    assert "cuda_checkpoint" in ck["steps"]
    assert demo.complete(port) == before  # the source got its GPU back
    m = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert any(g["gpu_uuid"].startswith("GPU-") and g["memory_bytes"] > 0 for g in m["gpus"])

    r = cli("restore", str(tmp_path / "art"), "--name", "grep", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)["replicas"][0]
    assert demo.complete(rep["port"]) == before
    print(f"\nGPU reference worker: cold {cold:.2f}s, checkpoint {ck['checkpoint_s']}s {ck['steps']}, "
          f"image {ck['image_bytes'] / 1e6:.0f} MB, restore ready {rep['ready_s']}s (CRIU {rep['criu_s']}s)")
