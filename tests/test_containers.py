"""The agent's node data plane on real OCI containers: runc, an overlayfs root, cgroups (tests/oci.py), real CRIU.

A source container runs the reference worker under `warmstart placeholder -- ...` as the chart's source pods do,
a target container plain `warmstart placeholder`; the test then does what the agent's checkpoint() and restore()
do on the node: find the processes through the container id in /proc/PID/cgroup (k8s/containers.py), checkpoint
the worker with the source left serving, restore it into the target's namespaces, and asks both for a completion.
No kubelet and no containerd (tests/live/ runs those).

It needs root, runc and CRIU; elsewhere it skips with the reason, unless WARMSTART_REQUIRE_CRIU=1 (set by .ci/run)
or CI=true, where it fails, and first installs runc with apt-get (as scripts/build-agent-image.sh does).
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import pytest

import oci
from conftest import free_port, http_get
from warmstart import api, demo, linux, procs
from warmstart.errors import WorkerError
from warmstart.k8s import containers

REQUIRED = os.environ.get("WARMSTART_REQUIRE_CRIU") == "1" or os.environ.get("CI") == "true"
PLACEHOLDER = [sys.executable, "-m", "warmstart", "placeholder"]

pytestmark = [pytest.mark.criu, pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def runc() -> None:
    problem = oci.why_not(install=REQUIRED)
    if problem:
        if REQUIRED:
            pytest.fail(f"real containers are required here: {problem}")
        pytest.skip(problem)


def _ns(pid: int, kind: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{kind}")


def _complete(pid: int, port: int, timeout_s: float = 180) -> str:
    """A completion from the worker on `port` in the network namespace of `pid`, once it answers."""
    def ask() -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                http_get(port, "/health", timeout=2)
                return demo.complete(port)
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    return linux.in_network_of(pid, ask)


def _worker(c: oci.Container, timeout_s: float = 30) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return containers.worker_pid(c.cri_id)
        except WorkerError:
            if time.monotonic() > deadline:
                raise AssertionError(c.log()) from None
            time.sleep(0.1)


def test_a_source_container_is_checkpointed_and_restored_into_a_placeholder_container(
        need_criu, runc, home: Path, tmp_path: Path) -> None:
    from warmstart.reference import model

    artifacts = tmp_path / "artifacts"  # the chart's artifact volume: at the same path in both containers
    artifacts.mkdir()
    port = free_port()
    server = [sys.executable, "-m", "warmstart.reference.server", "--port", str(port), "--kv-cache-mb", "16",
              "--model", str(model.ensure())]
    # The init writes into its container's root first (the overlay's upper dir): a file, a deletion, and a log
    # its worker inherits open (fd 3), which CRIU restores only if the placeholder's root has it. Then it becomes
    # the placeholder.
    held = f"/var/tmp/warmstart-held-{os.getpid()}.log"
    script = (f'echo source > /etc/warmstart-test-marker && rm /etc/motd && echo started > {held} && exec 3>>{held} '
              '&& exec "$@"')
    source = ["sh", "-c", script, "sh", *PLACEHOLDER, "--", *server]
    with oci.container(source, binds=[artifacts]) as src:
        worker = _worker(src)
        assert (src.upper / "etc" / "warmstart-test-marker").read_text() == "source\n"
        assert containers.init_pid(src.cri_id) == src.pid
        assert procs.nspid(worker)[-1] != 1 and worker in containers.pids_of(src.cri_id)
        want = _complete(src.pid, port)

        # As Agent.checkpoint: the init's child, left serving.
        res = api.checkpoint(worker, artifacts / "ref", leave_running=True, engine="reference")
        assert res.manifest.image_bytes > 0
        diff = res.manifest.rootfs
        assert diff is not None and "/etc/motd" in diff.deleted and diff.files >= 2, diff
        assert os.readlink(f"/proc/{worker}/fd/3").endswith(held)

        with oci.container(PLACEHOLDER, binds=[artifacts]) as target:
            # As Agent.restore: into the placeholder container's init.
            init = containers.init_pid(target.cri_id)
            assert init == target.pid
            started = time.monotonic()
            rr = api.restore_into(artifacts / "ref", init, name="default.replica-0")
            restore_s = time.monotonic() - started
            replica = rr.replicas[0].pid
            assert procs.children(init) == [replica]  # the placeholder is its parent
            for kind in ("pid", "mnt", "net", "ipc", "uts"):
                assert _ns(replica, kind) == _ns(init, kind), kind
            assert os.stat(f"/proc/{replica}/root").st_dev == os.stat(f"/proc/{init}/root").st_dev  # its overlay
            # Charged to the placeholder's container, not the source's.
            assert replica in containers.pids_of(target.cri_id)
            assert replica not in containers.pids_of(src.cri_id)

            # What the source's container wrote is in the placeholder's root (CRIU needed the held log there).
            root = Path(f"/proc/{init}/root")
            assert (root / "etc" / "warmstart-test-marker").read_text() == "source\n"
            assert not (root / "etc" / "motd").exists() and Path("/etc/motd").exists()
            assert os.readlink(f"/proc/{replica}/fd/3") == held
            assert not Path(held).exists()  # written inside the containers' roots only
            assert _complete(init, port) == want
            assert _complete(src.pid, port) == want and containers.worker_pid(src.cri_id) == worker
            print(f"checkpoint {res.seconds:.1f} s ({res.manifest.image_bytes / 1e6:.0f} MB), "
                  f"restore {restore_s:.1f} s")


def test_a_container_is_removed_with_its_mounts_and_cgroups_even_on_failure(runc) -> None:
    with pytest.raises(RuntimeError), oci.container(["sleep", "600"]) as c:
        assert procs.nspid(c.pid)[-1] == 1 and containers.pids_of(c.cri_id) == [c.pid]
        assert len(c.id) == 64 and c.cri_id == f"containerd://{c.id}"
        assert [n for _, n in linux.in_network_of(c.pid, socket.if_nameindex)] == ["lo"]
        raise RuntimeError("the test failed")
    assert not procs.alive(c.pid) and containers.pids_of(c.cri_id) == []
    assert str(c.bundle.parent) not in Path("/proc/mounts").read_text() and not c.bundle.parent.exists()
    assert not list(Path("/sys/fs/cgroup").glob(f"*/{oci.CGROUP_PARENT}/{c.id}"))
