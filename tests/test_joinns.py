"""Restore into the namespaces of an already-running placeholder process, as a pod sandbox holds them (real CRIU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import (
    COUNTER,
    REPO,
    SAVED_STATE,
    WARMSTART,
    cli,
    evict_pages,
    free_port,
    get_when_up,
    http_get,
    kept_image,
    one_error_line,
    wait_http,
)
from warmstart import linux, procs
from warmstart.image import codec
from warmstart.replica import joinns

pytestmark = [pytest.mark.criu]


@pytest.fixture()
def placeholder():
    """`warmstart placeholder` as pid 1 of its own pid, mount and network namespaces (loopback up)."""
    p = subprocess.Popen(["unshare", "--pid", "--fork", "--mount", "--net", "--mount-proc", "sh", "-c",
                          "ip link set lo up && exec " + " ".join(WARMSTART) + " placeholder"],
                         start_new_session=True, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not procs.children(p.pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    ph = procs.children(p.pid)[0]
    yield ph
    p.kill()
    p.wait()
    procs.terminate(ph, grace_s=1)


def _ns(pid: int, kind: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{kind}")


def test_restore_into_placeholder_namespaces(need_criu, home: Path, tmp_path: Path, placeholder: int) -> None:
    port = free_port()
    assert cli("run", "--name", "src", "--", sys.executable, str(COUNTER), str(port)).returncode == 0
    wait_http(port)
    boot = http_get(port).split()[1]
    assert cli("checkpoint", "src", "-o", str(tmp_path / "art")).returncode == 0

    r = cli("restore", str(tmp_path / "art"), "--into", str(placeholder), "--name", "in-pod", "--json")
    assert r.returncode == 0, r.stderr
    wpid = json.loads(r.stdout)["replicas"][0]["pid"]
    assert procs.children(placeholder) == [wpid]  # the placeholder is its parent: no namespace was created
    for kind in ("pid", "mnt", "net", "ipc", "uts"):
        assert _ns(wpid, kind) == _ns(placeholder, kind), kind
    n, b, _ = linux.in_network_of(placeholder, lambda: http_get(port)).split()
    assert b == boot and int(n) > 0  # the counter's state survived, served inside the pod's network
    with pytest.raises(OSError):
        http_get(port, timeout=2)  # and not in the host's

    assert cli("stop", "in-pod").returncode == 0
    deadline = time.monotonic() + 10
    while procs.alive(placeholder) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not procs.alive(placeholder)  # the placeholder ends with its worker, as the pod's container would


def test_a_compressed_image_restores_into_a_placeholder(need_criu, home: Path, tmp_path: Path,
                                                        placeholder: int) -> None:
    """An image stored compressed, not in the page cache: inflated into /dev/shm, read by CRIU in the copy of the
    host's mount namespace, and gone afterwards."""
    port = free_port()
    r = cli("run", "--name", "mem", "--", sys.executable, str(REPO / "tests" / "workers" / "memory.py"), str(port),
            "64")
    assert r.returncode == 0, r.stderr
    wait_http(port, timeout=120)
    want = http_get(port).split()[0]
    assert cli("checkpoint", "mem", "-o", str(tmp_path / "art"), env={"WARMSTART_COMPRESS": "1"}).returncode == 0
    assert [p for p in codec.packed(tmp_path / "art" / "images") if p.name.startswith("pages-")]
    evict_pages(tmp_path / "art")
    kept_image(tmp_path / "art").unlink()  # as on a node that did not make the artifact: this restore inflates
    before = set(Path("/dev/shm").glob("warmstart-images-*"))
    r = cli("restore", str(tmp_path / "art"), "--into", str(placeholder), "--name", "mem-in", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["inflate_s"] > 0
    assert linux.in_network_of(placeholder, lambda: http_get(port)).split() == [want, want]
    # The inflated image went once CRIU had read it (other programs may make segments there meanwhile).
    assert set(Path("/dev/shm").glob("warmstart-images-*")) <= before
    assert kept_image(tmp_path / "art").is_file()  # kept for the next restore on this node
    assert cli("stop", "mem-in").returncode == 0


def _runs(pid: int, script: Path) -> bool:
    """Whether that process is Python running `script` (not a fork of the sh whose command line names it)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return len(args) > 1 and args[1] == str(script).encode()


def test_container_process_to_placeholder(need_criu, home: Path, tmp_path: Path, placeholder: int) -> None:
    """A worker in a 'container' (own pid, mount and network namespaces, not its init) is dumped from inside
    them and restored into another 'pod' — the Kubernetes data plane, with real CRIU, on one machine."""
    port = free_port()
    src = subprocess.Popen(["unshare", "--pid", "--fork", "--mount", "--net", "--mount-proc", "sh", "-c",
                            f"exec </dev/null >/dev/null 2>&1; ip link set lo up; "
                            f"setsid {sys.executable} {COUNTER} {port} & wait"], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        worker = None
        while worker is None and time.monotonic() < deadline:
            # The worker, not the `ip` that sh forks first (a grandchild too, named in sh's command line until it
            # execs, and gone a moment later).
            kids = [k for c in procs.children(src.pid) for k in procs.children(c) if _runs(k, COUNTER)]
            worker = kids[0] if kids else None
            time.sleep(0.05)
        assert worker and procs.nspid(worker)[-1] != worker  # nested: not the host's view
        boot = linux.in_network_of(worker, lambda: get_when_up(port)).split()[1]
        r = cli("checkpoint", "--pid", str(worker), "-o", str(tmp_path / "art"))
        assert r.returncode == 0, r.stderr
        r = cli("restore", str(tmp_path / "art"), "--into", str(placeholder), "--name", "moved", "--json")
        assert r.returncode == 0, r.stderr
        n, b, _ = linux.in_network_of(placeholder, lambda: http_get(port)).split()
        assert b == boot
    finally:
        src.kill()
        src.wait()


def test_saved_files_are_refused_into_a_placeholder(need_criu, home: Path, tmp_path: Path, placeholder: int) -> None:
    """A worker inside the pod could not read the artifact's saved/ files: refused before anything starts."""
    port = free_port()
    assert cli("run", "--name", "st", "--wait", "--", sys.executable, str(SAVED_STATE), str(port)).returncode == 0
    assert cli("checkpoint", "st", "-o", str(tmp_path / "art")).returncode == 0
    assert (tmp_path / "art" / "saved" / "state.bin").is_file()
    one_error_line(cli("restore", str(tmp_path / "art"), "--into", str(placeholder)), 4, "cannot read")
    assert procs.children(placeholder) == []


def test_restore_into_a_process_that_is_no_namespace_init(need_criu, home: Path, tmp_path: Path) -> None:
    one_error_line(cli("restore", str(tmp_path / "none"), "--into", str(os.getpid())), 2,
                   "not the init of its own pid namespace")
    one_error_line(cli("restore", str(tmp_path / "none"), "--into", "4999999"), 2, "no running process")
    one_error_line(cli("restore", str(tmp_path / "none"), "--into", "1", "--replicas", "2"), 2, "one replica")


def test_pid_counter_lands_in_the_widest_free_run() -> None:
    assert joinns.start_of_widest_gap([2, 3], 32768) == 3  # a container's worker: high pids are free
    assert joinns.start_of_widest_gap([100, 30000], 32768) == 100
    assert joinns.start_of_widest_gap([5000, 5001, 32000], 32768) == 5001


def test_paths_in_a_containers_root_resolve_inside_it(tmp_path: Path) -> None:
    """A placeholder's files are made through /proc/PID/root, where the kernel would resolve an absolute symlink
    the container planted on the host: they resolve inside the container's root instead (openat2 RESOLVE_IN_ROOT
    for what is created, the same walk for the control directory's path)."""
    import os

    from warmstart import linux
    from warmstart.replica import joinns

    root, host = tmp_path / "root", tmp_path / "host"
    (root / "etc").mkdir(parents=True)
    host.mkdir()
    (root / "logs").symlink_to(str(host))  # absolute: on the host it names tmp_path/host
    (root / "up").symlink_to("../../../../../../" + str(host).lstrip("/"))
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    try:
        with pytest.raises(FileNotFoundError):  # the link's target does not exist in the container's root
            linux.open_in_root(fd, "/logs/worker.log", os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        (root / str(host).lstrip("/")).mkdir(parents=True)
        os.close(linux.open_in_root(fd, "/logs/worker.log", os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600))
        linux.makedirs_in_root(fd, "/up/control/x")
    finally:
        os.close(fd)
    assert list(host.iterdir()) == []  # nothing reached the "host"
    assert (root / str(host).lstrip("/") / "worker.log").is_file()
    assert (root / str(host).lstrip("/") / "control" / "x").is_dir()
    assert joinns.resolve_in_root(root, "/logs/worker.log") == str(host) + "/worker.log"
    assert joinns.resolve_in_root(root, "/up") == str(host)
    assert joinns.resolve_in_root(root, "/../../etc/./") == "/etc"
