"""GPU decisions that need no GPU: where a restore goes, what it refuses, the cuda-checkpoint interface,
the chunked checksums, and the reference decoder against transformers' own Llama."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from warmstart.artifact import store
from warmstart.artifact.manifest import FileEntry, GpuState
from warmstart.cuda_checkpoint import device_map
from warmstart.errors import IncompatibleArtifact, UsageError
from warmstart.gpu.driver import Gpu, uuid_bytes
from warmstart.gpu.placement import plan

A = "GPU-11111111-2222-3333-4444-555555555555"
B = "GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
C = "GPU-99999999-8888-7777-6666-555555555555"
GiB = 1 << 30
H100 = "NVIDIA H100 80GB HBM3"


def state(uuid: str = A, gib: float = 10, name: str = H100) -> GpuState:
    return GpuState(pid=42, gpu_uuid=uuid, gpu_name=name, memory_bytes=int(gib * GiB))


def gpu(index: int, uuid: str, free_gib: float, name: str = H100) -> Gpu:
    return Gpu(index=index, uuid=uuid, name=name, total_bytes=80 * GiB, free_bytes=int(free_gib * GiB))


def plan_(states, here, **kw):
    kw.setdefault("artifact_driver", "580.159.04")
    kw.setdefault("here_driver", "580.159.04")
    return plan(states, here, **kw)


def test_default_is_the_gpu_it_was_on() -> None:
    assert plan_([state(B)], [gpu(0, A, 70), gpu(1, B, 70)]) == {B: B}


def test_else_the_first_same_model_gpu_with_room() -> None:
    here = [gpu(0, C, 70, name="NVIDIA A100-SXM4-80GB"), gpu(1, A, 5), gpu(2, B, 70)]
    assert plan_([state(A)], here) == {A: B}


def test_replicas_multiply_the_memory_needed() -> None:
    with pytest.raises(IncompatibleArtifact, match=r"3 replica\(s\) need 30.0 GiB.*25.0 GiB free"):
        plan_([state(A)], [gpu(0, A, 25)], replicas=3)
    assert plan_([state(A)], [gpu(0, A, 31)], replicas=3) == {A: A}


def test_memory_mapped_again_on_resume_counts_per_replica() -> None:
    with pytest.raises(IncompatibleArtifact, match=r"2 replica\(s\) need 28.0 GiB"):
        plan_([state(A)], [gpu(0, A, 27)], replicas=2, remap_bytes=4 * GiB)
    assert plan_([state(A)], [gpu(0, A, 29)], replicas=2, remap_bytes=4 * GiB) == {A: A}


def test_other_model_is_refused_naming_both() -> None:
    with pytest.raises(IncompatibleArtifact, match="checkpointed on NVIDIA H100.*this host has NVIDIA A100"):
        plan_([state(A)], [gpu(0, C, 70, name="NVIDIA A100-SXM4-80GB")])


def test_older_driver_is_refused_newer_is_fine() -> None:
    with pytest.raises(IncompatibleArtifact, match="driver 580.159.04; this host has 570.86.10, which is older"):
        plan_([state(A)], [gpu(0, A, 70)], here_driver="570.86.10")
    assert plan_([state(A)], [gpu(0, A, 70)], here_driver="590.1") == {A: A}


def test_no_gpu_here_is_refused() -> None:
    with pytest.raises(IncompatibleArtifact, match="this host has no GPU"):
        plan_([state(A)], [])


def test_requested_gpu_by_index_uuid_or_prefix() -> None:
    here = [gpu(0, A, 70), gpu(1, B, 70)]
    assert plan_([state(A)], here, requested="1") == {A: B}
    assert plan_([state(A)], here, requested=B) == {A: B}
    assert plan_([state(A)], here, requested=B[:12]) == {A: B}


def test_requested_gpu_must_exist_match_and_have_room() -> None:
    here = [gpu(0, A, 70), gpu(1, C, 70, name="NVIDIA L4"), gpu(2, B, 2)]
    with pytest.raises(UsageError, match="no GPU '7' on this host"):
        plan_([state(A)], here, requested="7")
    with pytest.raises(IncompatibleArtifact, match="GPU 1 is NVIDIA L4"):
        plan_([state(A)], here, requested="1")
    with pytest.raises(IncompatibleArtifact, match="GPU 2 has 2.0 GiB free"):
        plan_([state(A)], here, requested="2")


def test_processes_without_gpu_memory_tie_nothing() -> None:
    assert plan_([GpuState(pid=1, gpu_uuid="", gpu_name="")], []) == {}
    with pytest.raises(UsageError, match="no GPU state, so --gpu"):
        plan_([], [gpu(0, A, 70)], requested="0")


def test_uuid_and_device_map_parsing() -> None:
    assert uuid_bytes(A) == bytes.fromhex("11111111222233334444555555555555")
    assert device_map(f"{A}={B}, {B}={A}") == {A: B, B: A}
    for bad in ("x=y", A, f"{A}=GPU-12"):
        with pytest.raises(UsageError, match="bad --device-map entry"):
            device_map(bad)


def _cuda_checkpoint(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "warmstart", "cuda-checkpoint", *args],
                          capture_output=True, text=True, timeout=60)


def test_cuda_checkpoint_help_names_the_flags_criu_probes_for() -> None:
    r = _cuda_checkpoint("-h")
    assert r.returncode == 0
    for flag in ("--toggle", "--action", "--get-state", "--get-restore-tid", "--timeout", "--device-map"):
        assert flag in r.stdout


@pytest.mark.parametrize("args, words", [
    (["--action", "explode", "--pid", "1"], "invalid choice"),
    (["--get-state"], "--pid is required"),
    (["--pid", "1"], "nothing to do"),
    (["--get-state", "--pid", "1", "--bogus"], "unknown argument"),
])
def test_cuda_checkpoint_bad_arguments_fail_in_one_line(args: list[str], words: str) -> None:
    r = _cuda_checkpoint(*args)
    assert r.returncode == 2
    assert words in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_chunked_checksum_is_a_hash_of_chunk_hashes(tmp_path: Path) -> None:
    data = os.urandom(5 << 20)
    (tmp_path / "big").write_bytes(data)
    got = store._hash_all(tmp_path, [("big", len(data), 1 << 20)])
    want = hashlib.sha256(b"".join(hashlib.sha256(data[o : o + (1 << 20)]).digest()
                                   for o in range(0, len(data), 1 << 20))).hexdigest()
    assert got == {"big": want}
    assert store.chunk_size_for(10 << 20) == 0 and store.chunk_size_for(1 << 30) == store.TREE_CHUNK


def test_tiny_chunk_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 1 MiB"):
        FileEntry(path="images/x", size=10, sha256="0" * 64, chunk_bytes=1)


def test_decoder_matches_transformers_greedy_generation() -> None:
    torch = pytest.importorskip("torch")
    from transformers import AutoTokenizer, LlamaForCausalLM

    from warmstart.reference import decode, load, model

    d = str(model.ensure())
    m = LlamaForCausalLM.from_pretrained(d).eval()
    ids = AutoTokenizer.from_pretrained(d)("Checkpoint me, then restore me").input_ids
    assert load.tokenizer(d).encode("Checkpoint me, then restore me").ids == ids
    with torch.inference_mode():
        want = m.generate(torch.tensor([ids]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                          pad_token_id=257)[0, len(ids) :].tolist()
    config = load.config(d)
    weights, region = load.weights(d, "cpu", "float32")
    assert region is None
    cache = torch.zeros(decode.cache_bytes(config, 64, 4), dtype=torch.uint8)
    assert decode.Decoder(weights, config, cache, 64, use_graph=False).generate(ids, 24) == want


def test_the_sdk_never_starts_cuda_in_a_process_that_does_not_use_it() -> None:
    """lmem.shrink() runs on every quiesce: in a CPU worker (torch imported, CUDA untouched) it must do nothing,
    not even load the driver, or CRIU would find GPU device files in the process."""
    code = ("import sys\ntry:\n    import torch\nexcept ImportError:\n    torch = None\n"
            "from warmstart.worker import lmem\n"
            "assert lmem.shrink() == []\n"
            "assert 'cuda.bindings.driver' not in sys.modules\n"
            "assert torch is None or not torch.cuda.is_initialized()\n"
            "lmem.regrow([])\nprint('untouched')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "untouched", r.stderr


def test_a_failed_quiesce_leaves_the_reference_worker_serving(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    from warmstart.reference import model, server

    engine = server.Engine(str(model.ensure()), 1, "cpu", "float32", 64, graph=False)
    want = engine.complete("still here", 4)

    def broken(_t: object) -> None:
        raise OSError("madvise failed")

    monkeypatch.setattr(server, "_discard", broken)
    with pytest.raises(OSError, match="madvise failed"):
        engine.quiesce()
    assert engine.gate.acquire(blocking=False), "the request gate stayed closed after the failed quiesce"
    engine.gate.release()
    assert engine.complete("still here", 4) == want
