"""The pre-restore gates (warmstart/gates.py): each refuses with one line naming itself, the difference and the
fix, and each can be bypassed by name, loudly. The host's gates as preflight runs them, the GPUs' as the
placement runs them; the Kubernetes side (node label, image digest, the annotation) is in tests/test_k8s.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from warmstart import gates
from warmstart.artifact.manifest import GpuState
from warmstart.errors import IncompatibleArtifact, UsageError
from warmstart.gpu.driver import Gpu
from warmstart.gpu.placement import plan
from warmstart.host import HostInfo, gates_of

SOURCE = HostInfo(arch="x86_64", kernel="6.8.0-45-generic", cpu_model="EPYC 9654",
                  cpu_flags=["avx", "avx2", "avx512f", "sse4_2"], criu_version="4.2.1")
A = "GPU-11111111-2222-3333-4444-555555555555"
B = "GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
GiB = 1 << 30
H100 = "NVIDIA H100 80GB HBM3"
A100 = "NVIDIA A100-SXM4-80GB"


def host_gates(skip: frozenset[str] = frozenset(), **target: object) -> list[str]:
    """What preflight announces for SOURCE's image on a host like SOURCE but for `target`; raises its refusal."""
    heard: list[str] = []
    gates.enforce(gates_of(SOURCE, SOURCE.model_copy(update=target)), skip, heard.append, context="artifact: ")
    return heard


# gate -> (a target host it refuses, words its refusal must name)
HOST_REFUSALS = {
    "cpu-arch": ({"arch": "aarch64"}, ["x86_64", "aarch64"]),
    "cpu-features": ({"cpu_flags": ["avx", "sse4_2"], "cpu_model": "Xeon E5"}, ["avx2", "avx512f", "Xeon E5"]),
    "kernel": ({"kernel": "6.11.0-9-generic"}, ["6.11.0-9-generic", "6.8.0-45-generic", "kernel"]),
    "criu-version": ({"criu_version": "4.1"}, ["4.1", "4.2.1", "older"]),
}


@pytest.mark.parametrize("gate", HOST_REFUSALS)
def test_a_host_gate_refuses_in_one_line_naming_itself_the_difference_the_fix_and_the_bypass(gate: str) -> None:
    target, words = HOST_REFUSALS[gate]
    with pytest.raises(gates.Refused) as e:
        host_gates(**target)
    assert [r.gate for r in e.value.refusals] == [gate]
    line = e.value.line()
    assert "\n" not in line and line.startswith(f"artifact: gate {gate}: ")
    assert all(w in line for w in words), line
    assert f"--skip-gate {gate}" in line and "may crash" in line
    assert e.value.exit_code == 4  # an IncompatibleArtifact, as before the gates


@pytest.mark.parametrize("gate", HOST_REFUSALS)
def test_a_bypassed_host_gate_is_announced_not_refused(gate: str) -> None:
    target, words = HOST_REFUSALS[gate]
    (warning,) = host_gates(frozenset({gate}), **target)
    assert warning.startswith(f"{gates.WARNING}gate {gate} bypassed: ") and words[0] in warning
    with pytest.raises(gates.Refused):  # bypassing one gate leaves the others standing
        host_gates(frozenset(HOST_REFUSALS) - {gate}, **target)


def test_the_same_host_passes_silently_and_kernel_patch_releases_do_not_count() -> None:
    assert host_gates() == []
    assert host_gates(kernel="6.8.12") == [] and host_gates(kernel="6.8.0-90-generic") == []
    assert host_gates(cpu_flags=[*SOURCE.cpu_flags, "amx_tile"]) == []
    assert host_gates(criu_version="4.3") == []


def test_several_refusals_are_one_line_each_joined() -> None:
    with pytest.raises(gates.Refused) as e:
        host_gates(arch="aarch64", kernel="5.15.0")
    assert [r.gate for r in e.value.refusals] == ["cpu-arch", "kernel"]
    assert "gate cpu-arch:" in str(e.value) and "gate kernel:" in str(e.value)


def test_a_fact_missing_on_one_side_is_noted_never_refused() -> None:
    assert host_gates(criu_version="") == ["note: gate criu-version not evaluated: CRIU's version here is unknown"]
    assert gates.kernel("", "6.8") == gates.Unknown("kernel", "the kernel release is not known on both sides")
    assert isinstance(gates.driver(None, "580.1"), gates.Unknown)
    assert isinstance(gates.image_digest("", "sha256:aa"), gates.Unknown)
    assert isinstance(gates.image_digest("repo@sha256:aa", ""), gates.Unknown)


def test_the_image_digest_compares_digests_however_the_runtime_spells_them() -> None:
    assert gates.image_digest("registry.example.com/vllm@sha256:aa", "other.mirror/vllm@sha256:aa") is None
    assert gates.image_digest("registry.example.com/vllm@sha256:aa", "sha256:aa") is None
    r = gates.image_digest("registry.example.com/vllm@sha256:aa", "registry.example.com/vllm@sha256:bb")
    assert isinstance(r, gates.Refusal) and r.gate == "image-digest"
    assert "sha256:aa" in r.problem and "sha256:bb" in r.problem


def test_the_bypass_is_named_the_way_the_caller_can_bypass() -> None:
    r = gates.kernel("6.8.0", "6.11.0")
    assert isinstance(r, gates.Refusal)
    assert "--skip-gate kernel" in r.line()
    assert 'annotation warmstart.dev/skip-gates: "kernel"' in r.line('annotation warmstart.dev/skip-gates: "{gate}"')


def test_skip_names_are_checked_and_may_be_comma_separated() -> None:
    assert gates.parse_skip(["kernel,driver", " gpu-model ", ""]) == {"kernel", "driver", "gpu-model"}
    with pytest.raises(UsageError) as e:
        gates.parse_skip(["kernel", "kernal"])
    assert "kernal" in e.value.problem and all(g in e.value.fix for g in gates.GATES)


def test_an_unknown_gate_on_the_command_line_is_a_usage_error_listing_the_gates(tmp_path: Path) -> None:
    binary = Path(sys.executable).parent / "warmstart"
    r = subprocess.run([str(binary), "restore", str(tmp_path / "none"), "--skip-gate", "kernel", "--skip-gate",
                        "bogus"], capture_output=True, text=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin", "WARMSTART_HOME": str(tmp_path / "home")})
    assert r.returncode == 2, r.stderr
    (error,) = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert "bogus" in error and "image-digest" in error


# ---- the GPUs' gates, in the placement ----

def state(uuid: str = A, name: str = H100) -> GpuState:
    return GpuState(pid=42, gpu_uuid=uuid, gpu_name=name, memory_bytes=10 * GiB)


def gpu(index: int, uuid: str, name: str = H100) -> Gpu:
    return Gpu(index=index, uuid=uuid, name=name, total_bytes=80 * GiB, free_bytes=70 * GiB)


def place(states: list[GpuState], here: list[Gpu], skip: frozenset[str] = frozenset(), here_driver: str = "580.159.04",
          requested: str | None = None) -> tuple[dict[str, str], list[str]]:
    heard: list[str] = []
    got = plan(states, here, artifact_driver="580.159.04", here_driver=here_driver, requested=requested,
               skip=skip, report=heard.append)
    return got, heard


# gate -> (states, GPUs here, driver here, words of the refusal)
GPU_REFUSALS = {
    "driver": ([state()], [gpu(0, A)], "570.86.10", ["580.159.04", "570.86.10", "older"]),
    "gpu-model": ([state()], [gpu(0, B, A100)], "580.159.04", [H100, A100]),
    "gpu-count": ([state(A), state(B)], [gpu(0, A)], "580.159.04", ["needs 2 GPU(s)", "1 GPU(s)"]),
}


@pytest.mark.parametrize("gate", GPU_REFUSALS)
def test_a_gpu_gate_refuses_naming_itself_and_its_bypass(gate: str) -> None:
    states, here, drv, words = GPU_REFUSALS[gate]
    with pytest.raises(gates.Refused) as e:
        place(states, here, here_driver=drv)
    assert [r.gate for r in e.value.refusals] == [gate]
    assert all(w in str(e.value) for w in words), str(e.value)
    assert f"--skip-gate {gate}" in e.value.line()


@pytest.mark.parametrize("gate", GPU_REFUSALS)
def test_a_bypassed_gpu_gate_places_anyway_and_says_so(gate: str) -> None:
    states, here, drv, _ = GPU_REFUSALS[gate]
    got, heard = place(states, here, frozenset({gate}), here_driver=drv)
    assert set(got) == {s.gpu_uuid for s in states} and set(got.values()) == {here[0].uuid}
    assert heard == [line for line in heard if line.startswith(f"{gates.WARNING}gate {gate} bypassed")] != []


def test_a_requested_gpu_of_another_model_is_the_gpu_model_gate() -> None:
    here = [gpu(0, A), gpu(1, B, "NVIDIA L4")]
    with pytest.raises(gates.Refused, match="GPU 1 is NVIDIA L4"):
        place([state()], here, requested="1")
    assert place([state()], here, frozenset({"gpu-model"}), requested="1")[0] == {A: B}


def test_bypassing_the_count_cannot_place_onto_no_gpu() -> None:
    with pytest.raises(gates.Refused, match="this host has no GPU"):
        place([state()], [])
    with pytest.raises(IncompatibleArtifact, match="no GPU to restore it onto") as e:
        place([state()], [], frozenset({"gpu-count"}))
    assert not isinstance(e.value, gates.Refused)


def test_a_driver_unknown_here_is_noted_and_not_refused() -> None:
    heard: list[str] = []
    assert plan([state()], [gpu(0, A)], artifact_driver="580.159.04", here_driver=None, report=heard.append) == {A: A}
    assert heard == ["note: gate driver not evaluated: the NVIDIA driver's version is not known on both sides"]
