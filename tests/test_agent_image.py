"""The agent image (deploy/image/), built by scripts/build-agent-image.sh with Debian's own tools (no Docker daemon,
no registry), unpacked into an OCI bundle and run under a real OCI runtime (runc) as the chart's DaemonSet runs it:
privileged (every capability this host grants, no seccomp, nothing masked) in the host's pid namespace. warmstart
and CRIU must both work inside it, and the archive must carry the name the chart's values default to.

The build takes a few minutes the first time and is reused while its inputs are unchanged (.deps/agent-image/).
It needs root on Debian 12; the script installs mmdebstrap, umoci and runc. Elsewhere these tests skip with the
reason, unless WARMSTART_REQUIRE_CRIU=1 (set by .ci/run) or CI=true, where they fail: CI must build the image.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "scripts" / "build-agent-image.sh"
VALUES = REPO / "deploy" / "helm" / "warmstart" / "values.yaml"
REQUIRED = os.environ.get("WARMSTART_REQUIRE_CRIU") == "1" or os.environ.get("CI") == "true"
TOOLS = ("mmdebstrap", "umoci", "runc")
# Linux capabilities by number (capability.h); a privileged container gets those this host's bounding set holds.
CAPS = ("CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID SETPCAP LINUX_IMMUTABLE "
        "NET_BIND_SERVICE NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK IPC_OWNER SYS_MODULE SYS_RAWIO SYS_CHROOT "
        "SYS_PTRACE SYS_PACCT SYS_ADMIN SYS_BOOT SYS_NICE SYS_RESOURCE SYS_TIME SYS_TTY_CONFIG MKNOD LEASE "
        "AUDIT_WRITE AUDIT_CONTROL SETFCAP MAC_OVERRIDE MAC_ADMIN SYSLOG WAKE_ALARM BLOCK_SUSPEND AUDIT_READ "
        "PERFMON BPF CHECKPOINT_RESTORE").split()
_ids = itertools.count()

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def _why_not() -> str | None:
    """Why the image cannot be built here, or None."""
    if os.geteuid() != 0:
        return "needs root (mmdebstrap, chroot and runc)"
    release = Path("/etc/os-release").read_text() if Path("/etc/os-release").exists() else ""
    if "VERSION_CODENAME=bookworm" not in release:
        return "builds on Debian 12 only (use deploy/image/Dockerfile elsewhere)"
    missing = [t for t in TOOLS if not shutil.which(t)]
    if missing and not REQUIRED:
        return f"needs {', '.join(missing)}: run scripts/build-agent-image.sh once (it installs them), or set CI=true"
    return None


def _chart_image() -> tuple[str, str, str]:
    image = yaml.safe_load(VALUES.read_text())["image"]
    return image["repository"], str(image["tag"]), image["pullPolicy"]


@pytest.fixture(scope="module")
def archive() -> Path:
    problem = _why_not()
    if problem:
        if REQUIRED:
            pytest.fail(f"the agent image is required here: {problem}")
        pytest.skip(problem)
    started = time.monotonic()
    r = subprocess.run([str(BUILD)], capture_output=True, text=True, timeout=1400)
    assert r.returncode == 0, r.stderr[-4000:]
    path = Path(r.stdout.strip().splitlines()[-1])
    print(f"agent image {path} ready in {time.monotonic() - started:.0f} s")
    return path


@pytest.fixture(scope="module")
def layout(archive: Path) -> Iterator[Path]:
    """The archive unpacked as an OCI image layout."""
    d = Path(tempfile.mkdtemp(prefix="ws-agent-image-"))
    with tarfile.open(archive) as tar:
        tar.extractall(d / "layout", filter="tar")
    yield d / "layout"
    shutil.rmtree(d)


@pytest.fixture(scope="module")
def bundle(layout: Path) -> Iterator[Path]:
    """The chart's default image unpacked into an OCI runtime bundle (rootfs/ and umoci's config.json)."""
    _, tag, _ = _chart_image()
    b = layout.parent / "bundle"
    r = subprocess.run(["umoci", "unpack", "--image", f"{layout}:{tag}", str(b)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    yield b
    shutil.rmtree(b)


def _privileged(config: dict[str, Any], args: list[str]) -> dict[str, Any]:
    """The bundle's runtime config as the kubelet makes it for the DaemonSet: privileged: true and hostPID: true."""
    bounding = int(next(ln.split()[1] for ln in Path("/proc/self/status").read_text().splitlines()
                        if ln.startswith("CapBnd:")), 16)
    caps = [f"CAP_{name}" for bit, name in enumerate(CAPS) if bounding >> bit & 1]
    process = {**config["process"], "args": args, "terminal": False, "noNewPrivileges": False,
               "capabilities": dict.fromkeys(("bounding", "effective", "inheritable", "permitted", "ambient"), caps)}
    linux = {k: v for k, v in config["linux"].items() if k not in ("maskedPaths", "readonlyPaths", "seccomp")}
    linux["namespaces"] = [ns for ns in linux["namespaces"] if ns["type"] != "pid"]  # the host's pid namespace
    mounts = [{**m, "options": [o for o in m.get("options", []) if o != "ro"]} if m["destination"] == "/sys" else m
              for m in config["mounts"]]
    return {**config, "process": process, "linux": linux, "mounts": mounts}


def run_in_image(bundle: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a command in the image under runc (as the DaemonSet's container), to completion."""
    original = bundle / "config.json.umoci"
    if not original.exists():
        shutil.copy(bundle / "config.json", original)
    config = _privileged(json.loads(original.read_text()), list(args))
    (bundle / "config.json").write_text(json.dumps(config))
    cid = f"ws-agent-image-test-{os.getpid()}-{next(_ids)}"
    try:
        return subprocess.run(["runc", "run", "--bundle", str(bundle), cid], capture_output=True, text=True,
                              timeout=120, stdin=subprocess.DEVNULL)
    finally:
        subprocess.run(["runc", "delete", "--force", cid], capture_output=True, timeout=60)


def test_the_archive_carries_the_charts_default_image_name(layout: Path) -> None:
    repository, tag, pull_policy = _chart_image()
    assert pull_policy == "IfNotPresent"  # an imported image is used, never pulled from a registry that lacks it
    version = next(ln.split('"')[1] for ln in (REPO / "pyproject.toml").read_text().splitlines()
                   if ln.startswith("version = "))
    assert tag == version
    (entry,) = json.loads((layout / "index.json").read_text())["manifests"]
    # `ctr images import` names the image by this annotation, as the kubelet resolves warmstart/agent:TAG.
    assert entry["annotations"]["io.containerd.image.name"] == f"docker.io/{repository}:{tag}"
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == tag
    manifest = json.loads((layout / "blobs" / "sha256" / entry["digest"].split(":")[1]).read_text())
    config = json.loads((layout / "blobs" / "sha256" / manifest["config"]["digest"].split(":")[1]).read_text())
    # The DaemonSet's args (agent --claim=...) replace CMD: the container runs `warmstart agent --claim=...`.
    assert config["config"]["Entrypoint"] == ["warmstart"] and config["config"]["Cmd"] == ["agent"]
    assert len(manifest["layers"]) == 2  # the Debian base, then CRIU and warmstart


def test_warmstart_runs_in_the_image(bundle: Path) -> None:
    r = run_in_image(bundle, "warmstart", "agent", "--help")
    assert r.returncode == 0 and "Kubernetes node agent" in r.stdout, r.stdout + r.stderr
    r = run_in_image(bundle, "warmstart", "--version")
    assert r.returncode == 0 and r.stdout.strip() == f"warmstart {_chart_image()[1]}", r.stdout + r.stderr
    imports = "import warmstart.k8s.agent, kubernetes, prometheus_client"  # the k8s extra's libraries
    r = run_in_image(bundle, "python", "-c", imports)
    assert r.returncode == 0, r.stderr


def test_criu_check_passes_in_the_image_as_the_daemonset_runs_it(bundle: Path) -> None:
    r = run_in_image(bundle, "criu", "--version")
    assert r.returncode == 0 and "Version: 4." in r.stdout, r.stdout + r.stderr
    r = run_in_image(bundle, "criu", "check")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Looks good" in r.stdout + r.stderr
    # warmstart in the image finds that CRIU (on PATH: the checkout's .deps/criu does not exist there).
    r = run_in_image(bundle, "python", "-c", "from warmstart.criu import binary; print(binary.find().path)")
    assert r.returncode == 0 and r.stdout.strip() == "/usr/local/sbin/criu", r.stdout + r.stderr


@pytest.fixture()
def containerd() -> Iterator[list[str]]:
    """A private containerd (its own root, state and socket; CRI off) and the ctr command line that talks to it."""
    if not (shutil.which("containerd") and shutil.which("ctr")):
        pytest.skip("needs containerd and ctr (Debian's containerd package) to import the archive")
    d = Path(tempfile.mkdtemp(prefix="ws-ctd-"))
    (d / "config.toml").write_text(f'version = 2\nroot = "{d}/root"\nstate = "{d}/state"\n'
                                   'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
                                   f'[grpc]\n  address = "{d}/sock"\n')
    with open(d / "log", "w") as log:
        proc = subprocess.Popen(["containerd", "--config", str(d / "config.toml")], stdout=log, stderr=log)
    ctr = ["ctr", "--address", str(d / "sock"), "--namespace", "k8s.io"]
    try:
        deadline = time.monotonic() + 30
        while subprocess.run([*ctr, "version"], capture_output=True).returncode != 0:
            assert proc.poll() is None and time.monotonic() < deadline, (d / "log").read_text()[-2000:]
            time.sleep(0.2)
        yield ctr
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        assert not [ln for ln in Path("/proc/mounts").read_text().splitlines() if f" {d}/" in ln]
        shutil.rmtree(d)


def test_containerd_imports_it_under_the_charts_name_and_runs_it_privileged(archive: Path,
                                                                           containerd: list[str]) -> None:
    repository, tag, _ = _chart_image()
    name = f"docker.io/{repository}:{tag}"
    r = subprocess.run([*containerd, "images", "import", str(archive)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    listed = subprocess.run([*containerd, "images", "ls", "-q"], capture_output=True, text=True, timeout=60)
    assert name in listed.stdout.split(), listed.stdout
    r = subprocess.run([*containerd, "run", "--rm", "--privileged", name, f"ws-agent-image-test-{os.getpid()}",
                        "criu", "check"], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 0 and "Looks good" in r.stdout + r.stderr, r.stdout + r.stderr
