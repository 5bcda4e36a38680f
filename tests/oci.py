"""Real OCI containers for tests: runc (Debian's package), an overlayfs root, cgroups, as containerd runs a pod's.

    problem = oci.why_not(install=True)        # None, or why no container can run here (install: apt-get runc)
    with oci.container([sys.executable, "-m", "warmstart", "placeholder"], binds=[artifacts]) as c:
        c.id       # 64 hex digits, as containerd names a container; /proc/PID/cgroup of its processes names it
        c.pid      # the host pid of its init (pid 1 of its own pid namespace)
        c.upper    # the overlay's upper dir: what the container wrote to its root file system
        c.cri_id   # "containerd://<id>", as a pod's status names it

The root file system is an overlay mounted by the harness (as containerd's snapshotter does): this host's root,
read-only, as the lower layer, so the checkout, its venv and CRIU are where they are here; the upper and work
dirs on a tmpfs of the container's own (overlayfs refuses layers that overlap, and / holds /tmp). Each container
has its own pid, mount, IPC, UTS and network namespaces (the network: loopback only; reach it with
`warmstart.linux.in_network_of(c.pid, fn)`), the cgroup /warmstart-test/<id> in every hierarchy, containerd's
default capabilities, mounts, masked and read-only paths, and no seccomp filter (the chart's pods set
their own no-io-uring profile; `warmstart placeholder` refuses io_uring to its worker itself). `binds` are host
directories mounted read-write at the same path inside. On leaving the block (also on failure) the container is
deleted by force, the overlay and tmpfs unmounted and the directories removed: read `upper` inside the block.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CGROUP_PARENT = "warmstart-test"
# containerd's default capabilities for a container that asks for none (what the chart's source and placeholder
# pods get: their securityContext adds none).
CAPS = [f"CAP_{c}" for c in ("CHOWN DAC_OVERRIDE FSETID FOWNER MKNOD NET_RAW SETGID SETUID SETFCAP SETPCAP "
                             "NET_BIND_SERVICE SYS_CHROOT KILL AUDIT_WRITE").split()]
MASKED = ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
          "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware"]
READONLY = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]


@dataclass(frozen=True)
class Container:
    id: str
    pid: int
    upper: Path
    bundle: Path

    @property
    def cri_id(self) -> str:
        return f"containerd://{self.id}"

    def log(self) -> str:
        """What the container's processes wrote to stdout and stderr so far."""
        log = self.bundle / "log"
        return log.read_text(errors="replace") if log.exists() else ""


def why_not(install: bool = False) -> str | None:
    """Why no container can run here, or None; install: get runc with apt-get first (as scripts/lib.sh does)."""
    if os.geteuid() != 0:
        return "needs root (runc, overlayfs mounts and cgroups)"
    if not shutil.which("runc") and install:
        subprocess.run(["bash", "-c", f"source {REPO}/scripts/lib.sh && install_debs --no-install-recommends runc"],
                       capture_output=True, text=True, timeout=600)
    if not shutil.which("runc"):
        return "needs runc (Debian's package: apt-get install runc)"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "needs overlayfs (modprobe overlay)"
    return None


def config(args: Sequence[str], rootfs: Path, cid: str, binds: Sequence[Path], env: dict[str, str]) -> dict[str, Any]:
    """The runtime config containerd's CRI plugin would write for an unprivileged pod container."""
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
        *({"destination": str(b), "type": "bind", "source": str(b), "options": ["rbind", "rw"]} for b in binds),
    ]
    caps = dict.fromkeys(("bounding", "effective", "permitted"), CAPS)
    return {
        "ociVersion": "1.0.2",
        "process": {"terminal": False, "user": {"uid": 0, "gid": 0}, "args": list(args), "cwd": "/",
                    "env": [f"{k}={v}" for k, v in env.items()], "capabilities": caps,
                    "noNewPrivileges": False},  # allowPrivilegeEscalation's default
        "root": {"path": str(rootfs), "readonly": False},
        "hostname": cid[:12],
        "mounts": mounts,
        "linux": {"namespaces": [{"type": t} for t in ("pid", "mount", "ipc", "uts", "network")],
                  "cgroupsPath": f"/{CGROUP_PARENT}/{cid}", "resources": {"devices": [{"allow": False,
                                                                                      "access": "rwm"}]},
                  "maskedPaths": MASKED, "readonlyPaths": READONLY},
    }


def _run(*cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def _mount_root(base: Path) -> tuple[Path, Path]:
    """A tmpfs at base holding upper/ and work/, and the overlay of / and upper/ at base/rootfs."""
    r = _run("mount", "-t", "tmpfs", "-o", "size=1g,mode=700", "ws-oci", str(base))
    assert r.returncode == 0, r.stderr
    upper, work, rootfs = base / "upper", base / "work", base / "rootfs"
    for d in (upper, work, rootfs):
        d.mkdir()
    r = _run("mount", "-t", "overlay", "overlay", "-o", f"lowerdir=/,upperdir={upper},workdir={work}", str(rootfs))
    assert r.returncode == 0, r.stderr
    return rootfs, upper


def _start(bundle: Path, cid: str) -> int:
    """`runc run -d`: the container's init runs detached; its host pid. Its stdout and stderr are a pipe drained
    into bundle/log, as containerd's shim gives a container pipes (CRIU cannot dump a file of the host's mounts)."""
    read, write = os.pipe()
    threading.Thread(target=_drain, args=(read, bundle / "log"), daemon=True).start()
    try:
        r = subprocess.run(["runc", "run", "-d", "--pid-file", str(bundle / "pid"), "--bundle", str(bundle), cid],
                           stdin=subprocess.DEVNULL, stdout=write, stderr=write, timeout=60)
    finally:
        os.close(write)
    assert r.returncode == 0, f"runc run failed ({r.returncode})"
    return int((bundle / "pid").read_text())


def _drain(fd: int, path: Path) -> None:
    with open(fd, "rb", buffering=0) as pipe, open(path, "ab", buffering=0) as log:
        while chunk := pipe.read(65536):
            log.write(chunk)


def _cleanup(base: Path, cid: str) -> None:
    _run("runc", "delete", "--force", cid)
    for mnt in (base / "rootfs", base):
        for _ in range(50):  # the container's last processes may still hold the overlay for a moment
            if not os.path.ismount(mnt) or _run("umount", str(mnt)).returncode == 0:
                break
            time.sleep(0.1)
        else:
            _run("umount", "--lazy", str(mnt))
    shutil.rmtree(base, ignore_errors=True)
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        try:
            (hierarchy / CGROUP_PARENT).rmdir()  # only once no other test's container is in it
        except OSError:
            pass


@contextmanager
def container(args: Sequence[str], *, binds: Sequence[Path] = (),
              env: dict[str, str] | None = None) -> Iterator[Container]:
    """A running container of `args` (see the module's docstring); deleted with everything it used on exit."""
    cid = secrets.token_hex(32)
    base = Path(tempfile.mkdtemp(prefix="ws-oci-"))
    environment = {"PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"), "HOME": "/root",
                   **(env or {})}
    try:
        rootfs, upper = _mount_root(base)
        bundle = base / "bundle"
        bundle.mkdir()
        (bundle / "config.json").write_text(json.dumps(config(args, rootfs, cid, binds, environment)))
        yield Container(cid, _start(bundle, cid), upper, bundle)
    finally:
        _cleanup(base, cid)
