"""`warmstart doctor`: whether this host has what checkpoint and restore need, one check a row, each failing
one with its fix. Checks only read: nothing is installed or changed."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from warmstart import config, paths
from warmstart.criu import binary as criu
from warmstart.errors import WarmstartError


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True  # a failing optional check (the GPU on a CPU host) is a warning, not a failure


def _criu() -> Check:
    try:
        binary = criu.find()
    except WarmstartError as e:
        return Check("CRIU >= 4.2", False, e.problem, e.fix)
    try:
        r = subprocess.run([binary.path, "check"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return Check("CRIU >= 4.2 and `criu check`", False, f"{binary.path} check did not finish: {e}",
                     "run `criu check --all` by hand to see what it waits for")
    last = (r.stdout + r.stderr).strip().splitlines()[-1:] or [""]
    return Check("CRIU >= 4.2 and `criu check`", r.returncode == 0, f"{binary.path} {binary.version}: {last[0]}",
                 "see `criu check --all`; a kernel without checkpoint/restore support cannot be used")


def _file_flag(path: str, name: str, good: Callable[[str], bool], fix: str, required: bool = True) -> Check:
    try:
        value = Path(path).read_text().strip()
    except OSError:
        return Check(name, False, f"{path} is missing", fix, required)
    return Check(name, good(value), f"{path} = {value}", fix, required)


_USERFAULTFD = ("/proc/sys/vm/unprivileged_userfaultfd", "/dev/userfaultfd")


def _kernel() -> list[Check]:
    return [
        _file_flag("/proc/sys/kernel/io_uring_disabled", "io_uring refused (or workers started by warmstart run)",
                   lambda v: v == "2", "workers started by `warmstart run` refuse io_uring anyway; for others: "
                   "sysctl kernel.io_uring_disabled=2", required=False),
        Check("pidfd and clone3 (kernel >= 5.5)", _kernel_at_least(5, 5), os.uname().release,
              "run a kernel of 5.5 or newer"),
        Check("userfaultfd", any(Path(p).exists() for p in _USERFAULTFD),
              "lazy restores need it (optional)", "a kernel with CONFIG_USERFAULTFD", required=False),
        Check("cgroup v2", Path("/sys/fs/cgroup/cgroup.controllers").exists(), "/sys/fs/cgroup",
              "cgroup v1 works for plain restores; Kubernetes nodes should run v2", required=False),
    ]


_VIRTIO_BALLOON, _F_REPORTING = "0x0005", 5  # device id; feature bit VIRTIO_BALLOON_F_REPORTING


def free_page_reporting(devices: Path = Path("/sys/bus/virtio/devices")) -> bool:
    """Whether a virtio balloon reports the guest's free pages to the host, which then takes them back: memory new
    to the guest is backed again on first touch (6-17x slower to write on the VMs in docs/benchmarks.md)."""
    try:
        entries = list(devices.iterdir())
    except OSError:
        return False
    for d in entries:
        try:
            if (d / "device").read_text().strip() != _VIRTIO_BALLOON:
                continue
            features = (d / "features").read_text().strip()
        except OSError:
            continue
        if len(features) > _F_REPORTING and features[_F_REPORTING] == "1":
            return True
    return False


def _memory() -> Check:
    reporting = free_page_reporting()
    return Check("guest memory kept backed (no free page reporting)", not reporting,
                 "virtio-balloon free page reporting is on: memory this VM frees goes back to its host, and new "
                 "memory is slow to touch, so a first checkpoint and several replicas at once run slower"
                 if reporting else "no virtio balloon reports free pages",
                 "give the VM memory backed up front (no balloon free page reporting); timings vary with it "
                 "(docs/design.md, whose time is it)", required=False)


def _kernel_at_least(major: int, minor: int) -> bool:
    parts = (os.uname().release.split(".") + ["0"])[:2]
    return tuple(int("".join(c for c in p if c.isdigit()) or 0) for p in parts) >= (major, minor)


def _gpu() -> Check:
    if not Path("/dev/nvidiactl").exists():
        return Check("NVIDIA driver with the checkpoint API", False, "no NVIDIA device on this host",
                     "only CPU workers can be checkpointed here", required=False)
    from warmstart.gpu import driver

    try:
        return Check("NVIDIA driver with the checkpoint API", True,
                     f"driver {driver.driver_version()}, CUDA {driver.cuda_version()}")
    except WarmstartError as e:
        return Check("NVIDIA driver with the checkpoint API", False, e.problem, e.fix)


def _space(name: str, path: Path, need: int = 1 << 30) -> Check:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    return Check(f"free space: {name}", free >= need, f"{path}: {free / 2**30:.1f} GiB free",
                 f"free space under {probe} (or point {name} elsewhere)")


def checks(artifacts: Path | None = None) -> list[Check]:
    s = config.current()
    rows = [Check("root", os.geteuid() == 0, f"euid {os.geteuid()}", "run warmstart as root"), _criu(),
            *_kernel(), _memory(), _gpu(), _space("WARMSTART_HOME", paths.home(), 64 << 20),
            _space("WARMSTART_IMAGE_CACHE", s.image_cache), _space("/dev/shm", Path("/dev/shm"))]
    if artifacts:
        rows.append(_space("artifacts (-o)", artifacts, 4 << 30))
    return rows


def failed(rows: list[Check]) -> list[Check]:
    return [r for r in rows if r.required and not r.ok]
