"""A manifest that would make a restore act outside the artifact, or on numbers out of range, is refused when it
is loaded (exit 4), before anything starts: a table of hostile manifests, each applied to a real one."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import cli, one_error_line, resign
from test_logic import _fake_artifact
from warmstart.artifact import store
from warmstart.errors import ArtifactError

Edit = Callable[[dict[str, Any]], None]


def _set(path: str, value: object) -> Edit:
    def edit(m: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = m
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        node[int(last) if last.isdigit() else last] = value
    return edit


HOSTILE: list[tuple[str, Edit]] = [
    ("absolute file path", _set("files.0.path", "/etc/shadow")),
    ("file path climbing out", _set("files.0.path", "images/../../etc/shadow")),
    ("file path outside images, shm, saved", _set("files.0.path", "manifest.json")),
    ("file path with an empty part", _set("files.0.path", "images//x")),
    ("negative size", _set("files.0.size", -1)),
    ("a digest that is not SHA-256", _set("files.0.sha256", "abc")),
    ("relative log path", _set("worker.log_path", "worker.log")),
    ("log path climbing", _set("worker.log_path", "/run/warmstart/../../etc/passwd")),
    ("control dir not normal", _set("worker.control_dir", "/tmp//x")),
    ("private dir relative", _set("worker.private_dirs", ["sockets"])),
    ("a NUL in a path", _set("worker.log_path", "/tmp/a\x00b")),
    ("port above 65535", _set("worker.port", 70000)),
    ("port -1", _set("worker.port", -1)),
    ("listening port 0", _set("worker.listen_ports", [0])),
    ("pid 0", _set("worker.pid", 0)),
    ("an id above pid_max", _set("worker.ids", [1 << 23])),
    ("weights socket relative", _set("worker.weights", [{"socket": "w.sock", "files": ["/m/a"], "hash": "ab" * 32,
                                                          "bytes": 1, "device": "cpu"}])),
    ("weights hash not hex", _set("worker.weights", [{"socket": "/run/w.sock", "files": ["/m/a"], "hash": "../x",
                                                       "bytes": 1, "device": "cpu"}])),
    ("working set path relative", _set("working_set", [{"path": "lib.so", "size": 1, "ranges": [[0, 1]]}])),
    ("working set negative range", _set("working_set", [{"path": "/lib.so", "size": 1, "ranges": [[-4096, 1]]}])),
]


@pytest.mark.parametrize("edit", [e for _, e in HOSTILE], ids=[n for n, _ in HOSTILE])
def test_a_hostile_manifest_is_refused_at_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, edit: Edit) -> None:
    art = _fake_artifact(tmp_path, monkeypatch)
    m = json.loads((art / "manifest.json").read_text())
    edit(m)
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="corrupt"):
        store.load(art)


def test_a_5000_digit_number_is_corrupt_not_a_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    art = _fake_artifact(tmp_path, monkeypatch)
    text = (art / "manifest.json").read_text()
    (art / "manifest.json").write_text(text.replace('"image_bytes": 0', '"image_bytes": ' + "9" * 5000, 1))
    with pytest.raises(ArtifactError, match="corrupt"):
        store.load(art)


def test_nesting_deeper_than_the_stack_is_corrupt_not_a_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    art = _fake_artifact(tmp_path, monkeypatch)
    (art / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ArtifactError, match="corrupt"):
        store.load(art)


def test_the_real_manifest_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The table's edits are what makes each one fail: the manifest they start from is valid."""
    assert store.load(_fake_artifact(tmp_path, monkeypatch)).files


@pytest.mark.criu
@pytest.mark.slow
def test_a_restore_creates_no_path_outside_its_own_directories(need_criu, home: Path, tmp_path: Path) -> None:
    """Even a signed manifest (a trusted key's holder gone rogue, or a mistake) cannot make a restore create
    directories or files elsewhere on the host."""
    import sys

    from conftest import COUNTER, cli, free_port, one_error_line, resign, wait_http

    port = free_port()
    assert cli("run", "--name", "src", "--", sys.executable, str(COUNTER), str(port)).returncode == 0
    wait_http(port)
    assert cli("checkpoint", "src", "-o", str(tmp_path / "art")).returncode == 0
    m = json.loads((tmp_path / "art" / "manifest.json").read_text())
    m["worker"]["private_dirs"] = ["/opt/warmstart-planted/dir"]
    (tmp_path / "art" / "manifest.json").write_text(json.dumps(m))
    resign(tmp_path / "art")
    one_error_line(cli("restore", str(tmp_path / "art")), 4, "/opt/warmstart-planted/dir", "does not exist")
    assert not Path("/opt/warmstart-planted").exists()


@pytest.mark.criu
@pytest.mark.slow
def test_a_weights_socket_that_is_no_service_of_this_user_is_not_connected_to(counter_artifact: Path,
                                                                              tmp_path: Path) -> None:
    """A signed manifest may still name any path as its weight service: a restore connects only to a socket this
    user's service made, so not to another user's daemon, and never through a symlink."""
    import socket as socketlib

    sock = tmp_path / "other.sock"
    s = socketlib.socket(socketlib.AF_UNIX)
    s.bind(str(sock))
    s.listen()
    os.chown(sock, 65534, 65534)  # another user's daemon
    (tmp_path / "link.sock").symlink_to(sock)
    try:
        for path in (sock, tmp_path / "link.sock"):
            m = json.loads((counter_artifact / "manifest.json").read_text())
            m["worker"]["weights"] = [{"socket": str(path), "files": ["/m/a"], "hash": "ab" * 32, "bytes": 1,
                                       "device": "cpu"}]
            (counter_artifact / "manifest.json").write_text(json.dumps(m))
            resign(counter_artifact)
            one_error_line(cli("restore", str(counter_artifact)), 5, "not the socket of a weight service")
        s.settimeout(0.5)
        with pytest.raises(TimeoutError):
            s.accept()  # nobody connected
    finally:
        s.close()


def test_replica_mount_points_are_created_owner_only(tmp_path: Path) -> None:
    """A worker's path missing on this host is created for the replica's bind mount, each new level 0700 and a
    file 0600, whatever the umask; what already exists keeps its mode."""
    from warmstart.replica.sandbox import mount_point

    old = os.umask(0)
    try:
        d = tmp_path / "a" / "b" / "control"
        os.close(mount_point(d, directory=True))
        f = tmp_path / "logs" / "worker.log"
        os.close(mount_point(f, directory=False))
    finally:
        os.umask(old)
    assert [oct(p.stat().st_mode & 0o777) for p in (tmp_path / "a", tmp_path / "a" / "b", d)] == ["0o700"] * 3
    assert d.is_dir() and f.is_file() and oct(f.stat().st_mode & 0o777) == "0o600"
    assert oct((tmp_path / "logs").stat().st_mode & 0o777) == "0o700"
    tmp_path.chmod(0o755)
    os.close(mount_point(tmp_path, directory=True))
    assert oct(tmp_path.stat().st_mode & 0o777) == "0o755"


def test_replica_mount_point_through_a_symlink_is_refused(tmp_path: Path) -> None:
    """A link at the worker's path (another user's, in /tmp) must not choose what a replica's copy covers."""
    from warmstart.errors import IncompatibleArtifact
    from warmstart.replica.sandbox import mount_point

    target = tmp_path / "elsewhere"
    target.mkdir()
    link = tmp_path / "warmstart-control"
    link.symlink_to(target)
    with pytest.raises(IncompatibleArtifact, match="symbolic link"):
        mount_point(link, directory=True)
    dangling = tmp_path / "dangling.log"
    dangling.symlink_to(tmp_path / "nowhere.log")
    with pytest.raises(IncompatibleArtifact, match="symbolic link"):
        mount_point(dangling, directory=False)
    assert not (tmp_path / "nowhere.log").exists()


def test_a_symlink_at_a_workers_path_is_refused_before_any_replica_starts(tmp_path: Path) -> None:
    """The host-side check a restore makes of every bind target first: exit 4's error, not a replica's failure."""
    from warmstart.errors import IncompatibleArtifact
    from warmstart.pipeline.replicas import _check_bind_target

    (tmp_path / "real").mkdir()
    (tmp_path / "control").symlink_to(tmp_path / "real")
    with pytest.raises(IncompatibleArtifact, match="symbolic link") as e:
        _check_bind_target(str(tmp_path / "control"))
    assert e.value.exit_code == 4
    _check_bind_target(str(tmp_path / "real"))  # a real directory passes
