"""Who this host is, as far as restoring a process image cares, and whether an image fits it.

`gates` and `check_compatible` are pure functions over two `HostInfo` values so that the decision is testable
without a second machine.
"""

from __future__ import annotations

import platform
from pathlib import Path

from pydantic import BaseModel

from warmstart import gates
from warmstart.gates import version_tuple as version_tuple  # the one parser of dotted versions

# CPU features a process may have picked code paths for at start-up (glibc's ifuncs, torch's kernels):
# a restored process that finds one missing dies with SIGILL at some later instruction.
_RELEVANT_FLAGS = (
    "sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "avx512f", "avx512bw", "avx512cd",
    "avx512dq", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8",
    "sha_ni", "aes", "pclmulqdq", "popcnt", "movbe", "rdrand", "rdseed", "adx", "vaes", "vpclmulqdq",
)


class HostInfo(BaseModel):
    arch: str
    kernel: str
    cpu_model: str
    cpu_flags: list[str]
    criu_version: str = ""


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = "unknown", set[str]()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except FileNotFoundError:
        return model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == "unknown":
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return model, flags


def current(criu_version: str = "") -> HostInfo:
    model, flags = _cpuinfo()
    return HostInfo(
        arch=platform.machine(),
        kernel=platform.release(),
        cpu_model=model,
        cpu_flags=sorted(f for f in flags if f in _RELEVANT_FLAGS),
        criu_version=criu_version,
    )


def gates_of(source: HostInfo, target: HostInfo) -> list[gates.Result]:
    """The host's gates for an image made on `source`, restored on `target`."""
    return [
        gates.cpu_arch(source.arch, target.arch),
        gates.cpu_features(source.cpu_model, source.cpu_flags, target.cpu_model, target.cpu_flags),
        gates.kernel(source.kernel, target.kernel),
        gates.criu_version(source.criu_version, target.criu_version),
    ]


def check_compatible(source: HostInfo, target: HostInfo) -> list[str]:
    """Reasons the image made on `source` cannot be restored on `target`; empty when it can."""
    return [r.problem for r in gates.judge(gates_of(source, target), skip=()).refused]
