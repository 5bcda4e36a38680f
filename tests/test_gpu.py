"""GPU round trip on a real NVIDIA GPU: CUDA lock+checkpoint, CRIU dump, restore, CUDA restore+unlock."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from conftest import cli, free_port, raw_pages
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
    """bf16 weights in a kept region: saved into the artifact on quiesce, read back by the source and the
    replica, never in the CUDA checkpoint or CRIU's image."""
    from warmstart.reference import model

    model_dir = model.ensure(model.TINY, "bfloat16")
    wbytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    port = free_port()
    t0 = time.monotonic()
    r = cli("run", "--name", "gref", "--wait", "--", sys.executable, "-m", "warmstart.reference.server",
            "--port", str(port), "--device", "cuda", "--kv-cache-mb", "1024", "--model", str(model_dir))
    assert r.returncode == 0, r.stderr
    before = demo.complete(port)
    cold = time.monotonic() - t0
    r = cli("checkpoint", "gref", "-o", str(tmp_path / "art"), "--leave-running", "--json")
    assert r.returncode == 0, r.stderr
    ck = json.loads(r.stdout)
    assert "cuda_checkpoint" in ck["steps"] and "cuda_restore" in ck["steps"]
    assert ck["paused_s"] < ck["checkpoint_s"]  # its GPU back before the artifact was finished
    assert demo.complete(port) == before  # the source got its GPU back
    # Again: the source read its weights back from the first artifact and saves them into the second.
    r = cli("checkpoint", "gref", "-o", str(tmp_path / "art2"), "--leave-running", "--json")
    assert r.returncode == 0, r.stderr
    assert demo.complete(port) == before
    assert "could not be unpinned" not in (home / "workers" / "gref" / "worker.log").read_text()
    saved = sorted((tmp_path / "art" / "saved").iterdir())
    assert sum(p.stat().st_size for p in saved) >= wbytes, saved  # the weights
    with open(sorted(model_dir.glob("*.safetensors"))[-1], "rb") as f:
        f.seek(-(1 << 20), os.SEEK_END)
        sample = f.read(64)  # random bf16 weights: these 64 bytes are nowhere else
    assert any(sample in p.read_bytes() for p in saved)
    pages = raw_pages(tmp_path / "art" / "images")
    assert pages and not any(sample in data for data in pages)
    m = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert any(g["gpu_uuid"].startswith("GPU-") and g["memory_bytes"] > 0 for g in m["gpus"])
    assert m["worker"]["gpu_bytes_to_remap"] >= (1024 << 20) + wbytes  # the KV pool and the kept weights

    r = cli("restore", str(tmp_path / "art"), "--name", "grep", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)["replicas"][0]
    assert demo.complete(rep["port"]) == before
    print(f"\nGPU reference worker: cold {cold:.2f}s, checkpoint {ck['checkpoint_s']}s {ck['steps']}, "
          f"image {ck['image_bytes'] / 1e6:.0f} MB, restore ready {rep['ready_s']}s (CRIU {rep['criu_s']}s)")


def _nvml_used(pid: int) -> int:
    from warmstart.gpu import driver as cuda

    return cuda.process_gpu_memory().get(pid, ("", 0))[1]


def test_kv_release_graph_remap_and_cuda_checkpoint_tool(need_criu, home: Path, tmp_path: Path) -> None:
    """The KV region leaves the image; the NVIDIA-style tool toggles a worker; --gpu picks the target."""
    from warmstart import registry
    from warmstart.gpu import driver as cuda

    port = free_port()
    r = cli("run", "--name", "kv", "--wait", "--", sys.executable, "-m", "warmstart.reference.server",
            "--port", str(port), "--device", "cuda", "--kv-cache-mb", "2048")
    assert r.returncode == 0, r.stderr
    pid = registry.get("kv").pid
    before = demo.complete(port)
    used = _nvml_used(pid)
    assert used > 2 << 30

    # NVIDIA's flags, as CRIU's CUDA plugin calls them.
    tool = lambda *a: cli("cuda-checkpoint", *a, "--pid", str(pid))  # noqa: E731
    assert tool("--get-state").stdout.strip() == "running"
    assert tool("--toggle").returncode == 0
    assert tool("--get-state").stdout.strip() == "checkpointed"
    assert int(tool("--get-restore-tid").stdout.strip()) > 0
    uuid = cuda.process_gpu_memory().get(pid, ("", 0))[0] or cuda.gpus()[0].uuid
    r = tool("--action", "restore", "--device-map", f"{uuid}={uuid}")
    assert r.returncode == 0, r.stderr
    assert tool("--get-state").stdout.strip() == "locked"
    assert tool("--action", "unlock").returncode == 0
    assert demo.complete(port) == before  # the CUDA graph and weights came back

    r = cli("checkpoint", "kv", "-o", str(tmp_path / "art"), "--json")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "art" / "manifest.json").read_text())
    (g,) = [g for g in m["gpus"] if g["gpu_name"]]
    assert g["memory_bytes"] < used - (1900 << 20), (used, g)  # the 2 GiB KV region was released
    assert m["driver_version"] and m["cuda_version"]
    assert m["worker"]["gpu_bytes_to_remap"] >= 2 << 30  # the SDK reported the region it will map again

    # Refused before anything starts: an unknown GPU, and more replicas than the GPU has memory for.
    r = cli("restore", str(tmp_path / "art"), "--gpu", "7")
    assert r.returncode == 2 and "no GPU '7'" in r.stderr
    r = cli("restore", str(tmp_path / "art"), "--replicas", "200")
    assert r.returncode == 4 and "replica(s) need" in r.stderr
    assert registry.all_records() == []

    r = cli("restore", str(tmp_path / "art"), "--gpu", g["gpu_uuid"], "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)["replicas"][0]
    assert demo.complete(rep["port"]) == before
    assert _nvml_used(rep["pid"]) > 2 << 30  # the KV region is mapped again in the replica


def test_lock_timeout_on_a_busy_gpu_leaves_the_worker_running(need_criu, home: Path, tmp_path: Path) -> None:
    from warmstart import registry
    from warmstart.gpu import driver as cuda

    busy = Path(__file__).parent / "workers" / "gpu_busy.py"
    r = cli("run", "--name", "busy", "--", sys.executable, str(busy), "400")
    assert r.returncode == 0, r.stderr
    rec = registry.get("busy")
    log = Path(rec.log)
    deadline = time.monotonic() + 120
    while "ready" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # inside a batch of queued kernels, seconds long
    r = cli("checkpoint", "busy", "-o", str(tmp_path / "art"), "--timeout", "0.3")
    assert r.returncode == 5, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "lockable point" in errors[0], r.stderr
    assert not (tmp_path / "art").exists()
    assert cuda.state(rec.pid) == "running"
    seen = log.read_text().count("batch")
    deadline = time.monotonic() + 120
    while log.read_text().count("batch") <= seen and time.monotonic() < deadline:
        time.sleep(0.2)
    assert log.read_text().count("batch") > seen  # still computing


def test_weights_from_the_gpu_weight_service(need_criu, home: Path, tmp_path: Path) -> None:
    """Weights in the service's exportable GPU memory: not in the CUDA checkpoint, mapped again on restore."""
    import subprocess

    from warmstart import registry
    from warmstart.reference import model
    from warmstart.reference.model import ModelShape

    model_dir = model.ensure(ModelShape(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                                        num_attention_heads=16, num_key_value_heads=4), "bfloat16", device="cuda")
    wbytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    sock = tmp_path / "w.sock"
    svc = subprocess.Popen([sys.executable, "-m", "warmstart", "weights", "serve", "--device", "cuda:0",
                            "--socket", str(sock)])
    try:
        deadline = time.monotonic() + 60
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        common = ["--device", "cuda", "--kv-cache-mb", "256", "--model", str(model_dir)]
        port = free_port()
        r = cli("run", "--name", "plainw", "--wait", "--", sys.executable, "-m", "warmstart.reference.server",
                "--port", str(port), *common)
        assert r.returncode == 0, r.stderr
        want = demo.complete(port)
        assert cli("checkpoint", "plainw", "-o", str(tmp_path / "plain")).returncode == 0
        plain_image = json.loads((tmp_path / "plain" / "manifest.json").read_text())["image_bytes"]

        port = free_port()
        r = cli("run", "--name", "sharedw", "--wait", "--", sys.executable, "-m", "warmstart.reference.server",
                "--port", str(port), *common, "--weights-socket", str(sock))
        assert r.returncode == 0, r.stderr
        assert demo.complete(port) == want  # same weights, mapped from the service
        r = cli("checkpoint", "sharedw", "-o", str(tmp_path / "art"))
        assert r.returncode == 0, r.stderr
        m = json.loads((tmp_path / "art" / "manifest.json").read_text())
        assert m["worker"]["weights"][0]["device"] == "cuda:0"
        # The plain worker's weights travel in its artifact (saved from its kept region, packed to about 0.75 of
        # their bytes: worker/bf16pack.py); these do not.
        assert m["image_bytes"] < plain_image - 0.7 * wbytes, (plain_image, m["image_bytes"], wbytes)
        for name in ("r1", "r2"):  # restored twice: the service keeps the weights resident
            r = cli("restore", str(tmp_path / "art"), "--name", name, "--json")
            assert r.returncode == 0, r.stderr
            assert demo.complete(json.loads(r.stdout)["replicas"][0]["port"]) == want
            assert cli("stop", name).returncode == 0
        assert registry.all_records() == []
    finally:
        svc.kill()
        svc.wait()


def test_kept_region_and_local_memory_across_a_release(tmp_path: Path) -> None:
    """A kept region's bytes come back exactly after release/restore, through host memory and through a file;
    a damaged file fails the restore and leaves the region unmapped; the SDK's local-memory shrink frees GPU
    memory and is undone."""
    import torch
    from cuda.bindings import driver as d

    from warmstart.gpumem.region import GpuRegion
    from warmstart.worker import lmem, savedir

    region = GpuRegion(300 << 20, 0, keep=True)
    data = region.tensor(torch)
    want = torch.randint(0, 256, (data.numel(),), dtype=torch.uint8, device="cuda")
    data.copy_(want)
    torch.cuda.synchronize()
    free = torch.cuda.mem_get_info()[0]
    region.release()
    assert not region.mapped and torch.cuda.mem_get_info()[0] >= free + (290 << 20)
    region.restore()
    assert region.mapped and torch.equal(region.tensor(torch), want)
    region.join()  # the host copy, unpinned and freed on a thread of its own
    assert region.unpin_error is None

    def free_now() -> int:
        torch.cuda.empty_cache()  # torch.equal's 300 MiB of temporaries stay in torch's cache otherwise
        return torch.cuda.mem_get_info()[0]

    savedir.use(str(tmp_path))
    free = free_now()
    try:
        region.release()
        saved = tmp_path / region.file_name
        assert saved.stat().st_size == region.nbytes and free_now() >= free + (290 << 20)
        region.restore()
        assert torch.equal(region.tensor(torch), want)
        with pytest.raises(FileExistsError):  # never over a file it may have been restored from
            region.release()
        assert region.mapped
        savedir.use(str(tmp_path / "next"))  # the next checkpoint's directory
        (tmp_path / "next").mkdir()
        region.release()
        saved = tmp_path / "next" / region.file_name
        os.truncate(saved, region.nbytes - 4096)
        with pytest.raises(OSError, match="truncated"):
            region.restore()
        assert not region.mapped and free_now() >= free + (290 << 20)
        savedir.use(None)
        with pytest.raises(RuntimeError, match="did not say where"):
            region.restore()
    finally:
        savedir.use(None)
    region._saved = False  # start over: mapped again, zeroed
    region.restore()
    assert not region.tensor(torch).any()

    free = torch.cuda.mem_get_info()[0]
    saved = lmem.shrink()
    assert len(saved) == 1 and saved[0][2] > lmem.QUIESCED_STACK_BYTES  # the one active context's stack
    assert d.cuCtxGetLimit(d.CUlimit.CU_LIMIT_STACK_SIZE)[1] == lmem.QUIESCED_STACK_BYTES
    assert torch.cuda.mem_get_info()[0] >= free + (100 << 20), "no local memory was freed"
    lmem.regrow(saved)
    assert d.cuCtxGetLimit(d.CUlimit.CU_LIMIT_STACK_SIZE)[1] == saved[0][2]
    region.tensor(torch).copy_(want)  # kernels still run
    assert torch.equal(region.tensor(torch), want)


def test_a_packed_region_comes_back_bit_for_bit_from_a_smaller_file(tmp_path: Path, monkeypatch) -> None:
    """bf16 weights saved packed (warmstart.gpumem.bf16pack) take ~3/4 of the bytes and come back exactly, a
    piece that is not bf16 included; no scratch memory stays behind; a damaged file fails the restore cleanly."""
    import torch

    from warmstart.gpumem import bf16kernel
    from warmstart.gpumem.region import GpuRegion
    from warmstart.worker import savedir

    region = GpuRegion(100 << 20, 0, keep=True, pack_bf16=True)
    data = region.tensor(torch)
    raw = 8 << 20  # the last piece: random bytes, saved as they are
    w = (torch.randn((data.numel() - raw) // 2, device="cuda") * 0.02).to(torch.bfloat16)
    w[:8] = torch.tensor([0.0, float("nan"), float("inf"), -1.0, 3e38, 1e-30, 65504.0, -0.0])
    data[: data.numel() - raw] = w.view(torch.uint8)
    data[data.numel() - raw:] = torch.randint(0, 256, (raw,), dtype=torch.uint8, device="cuda")
    want = data.clone()
    torch.cuda.synchronize()
    savedir.use(str(tmp_path))
    try:
        reserved = torch.cuda.memory_reserved()
        region.release()
        saved = tmp_path / region.file_name
        assert saved.suffix == ".bf16p" and saved.stat().st_size < 0.78 * (region.nbytes - raw) + raw
        region.restore()
        assert bf16kernel.get(0) is not None  # unpacked by the kernel, not torch's fallback
        assert torch.cuda.memory_reserved() <= reserved  # the (un)packing's scratch went back to the driver
        assert torch.equal(region.tensor(torch), want)
        for where, kernels in (("torch", {0: None}), ("next", bf16kernel._kernels)):  # the fallback, then again
            monkeypatch.setattr(bf16kernel, "_kernels", kernels)
            savedir.use(str(tmp_path / where))
            (tmp_path / where).mkdir()
            region.release()
            region.restore()
            assert torch.equal(region.tensor(torch), want), where
        monkeypatch.undo()
        savedir.use(str(tmp_path / "damaged"))
        (tmp_path / "damaged").mkdir()
        region.release()
        saved = tmp_path / "damaged" / region.file_name
        with open(saved, "r+b") as f:
            f.write(b"NOTPACKD")
        with pytest.raises(OSError, match="truncated or foreign"):
            region.restore()
        assert not region.mapped
    finally:
        savedir.use(None)
