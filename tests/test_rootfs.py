"""The rootfs diff (image/rootfs.py) on real overlayfs mounts: what a container wrote over its image (files made
and changed, deletions, a directory replaced, links, a fifo, a socket, an excluded path) is taken from the upper
dir and put back into a second overlay of the same image as it was; nothing outside that root is touched, and
an archive naming a path outside it is refused. Needs root (mount); skipped elsewhere with the reason."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from warmstart.artifact.manifest import RootfsDiff
from warmstart.errors import ArtifactError, UsageError
from warmstart.image import rootfs

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting overlayfs needs root")


def _overlay(base: Path, lower: Path, name: str) -> tuple[Path, Path]:
    """An overlay of `lower` as a container runtime mounts one: returns (merged, upper)."""
    upper, work, merged = base / f"{name}-upper", base / f"{name}-work", base / f"{name}-merged"
    for d in (upper, work, merged):
        d.mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={lower},upperdir={upper},workdir={work}", str(merged)], check=True)
    return merged, upper


@pytest.fixture()
def image(tmp_path: Path) -> Iterator[Path]:
    """The container image's layer: a few files, a directory, a symlink."""
    lower = tmp_path / "lower"
    (lower / "etc" / "app").mkdir(parents=True)
    (lower / "etc" / "app" / "conf").write_text("image conf\n")
    (lower / "etc" / "hosts").write_text("image hosts\n")
    (lower / "var" / "cache" / "old").mkdir(parents=True)
    (lower / "var" / "cache" / "old" / "entry").write_text("stale\n")
    (lower / "opt").mkdir()
    (lower / "opt" / "tool").write_text("tool\n")
    (lower / "lib").symlink_to("opt")
    yield lower
    subprocess.run(f"grep -o ' {tmp_path}/[^ ]*-merged' /proc/mounts | xargs -r -n1 umount", shell=True, check=False)


def _write_as_a_container_would(root: Path) -> None:
    (root / "tmp").mkdir()
    (root / "tmp" / "worker.log").write_text("line 1\nline 2\n")
    os.chmod(root / "tmp" / "worker.log", 0o640)
    os.chown(root / "tmp" / "worker.log", 1234, 5678)
    (root / "etc" / "app" / "conf").write_text("changed conf\n")  # a lower file copied up and changed
    (root / "etc" / "hosts").unlink()  # a whiteout
    subprocess.run(["rm", "-rf", str(root / "var" / "cache")], check=True)
    (root / "var" / "cache").mkdir()  # replaced whole: an opaque directory
    (root / "var" / "cache" / "new").write_text("fresh\n")
    (root / "tmp" / "link").symlink_to("/etc/app/conf")
    os.link(root / "tmp" / "worker.log", root / "tmp" / "hard")
    os.mkfifo(root / "tmp" / "fifo")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(root / "tmp" / "sock"))
    (root / "root" / ".cache").mkdir(parents=True)
    (root / "root" / ".cache" / "big").write_bytes(b"x" * 4096)


def _tree(root: Path) -> dict[str, tuple[object, ...]]:
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            p = Path(dirpath) / n
            st = os.lstat(p)
            body: object = (os.readlink(p) if stat.S_ISLNK(st.st_mode) else
                            p.read_bytes() if stat.S_ISREG(st.st_mode) else None)
            out[str(p.relative_to(root))] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid,
                                             st.st_gid, body)
    return out


def test_what_a_container_wrote_comes_back_in_a_fresh_overlay_of_its_image(image: Path, tmp_path: Path) -> None:
    source, upper = _overlay(tmp_path, image, "source")
    _write_as_a_container_would(source)
    diff = rootfs.capture(upper, tmp_path / "artifact", ["/root/.cache"], lambda: None)
    assert diff.deleted == ["/etc/hosts"] and diff.opaque == ["/var/cache"] and diff.skipped == ["/tmp/sock"]

    placeholder, _ = _overlay(tmp_path, image, "placeholder")
    outside = tmp_path / "outside"
    outside.mkdir()
    (placeholder / "tmp").symlink_to(outside)  # the placeholder's image has a symlink out where a file goes
    rootfs.apply(str(placeholder), tmp_path / "artifact" / rootfs.ARCHIVE, diff, lambda: None)

    want, got = _tree(source), _tree(placeholder)
    want = {k: v for k, v in want.items() if not k.startswith("root/.cache") and k != "tmp/sock"}
    assert {k: v for k, v in got.items() if k != "root"} == {k: v for k, v in want.items() if k != "root"}
    assert "root/.cache" not in got  # excluded
    assert (placeholder / "tmp" / "hard").stat().st_ino == (placeholder / "tmp" / "worker.log").stat().st_ino
    assert not list(outside.iterdir())  # nothing written through the placeholder's symlink


def test_an_archive_naming_a_path_outside_the_root_is_refused(image: Path, tmp_path: Path) -> None:
    placeholder, _ = _overlay(tmp_path, image, "placeholder")
    archive = tmp_path / rootfs.ARCHIVE
    evil = tmp_path / "evil"
    evil.write_text("x")
    with tarfile.open(archive, "w") as tar:
        tar.add(evil, arcname="../../evil-written")
    diff = RootfsDiff(upper=str(tmp_path / "upper"), files=1)
    with pytest.raises(ArtifactError, match="names '../../evil-written'"):
        rootfs.apply(str(placeholder), archive, diff, lambda: None)
    assert not (tmp_path.parent / "evil-written").exists()


def test_the_upper_dir_is_found_for_a_process_whose_root_is_an_overlay(image: Path, tmp_path: Path) -> None:
    merged, upper = _overlay(tmp_path, image, "source")
    pid = os.fork()
    if pid == 0:  # a process in the overlay, as a container's worker is (its own root, the host's mounts)
        try:
            os.chroot(merged)
            os.chdir("/")
            time.sleep(60)
        finally:
            os._exit(0)
    try:
        deadline = time.monotonic() + 10
        while os.stat(f"/proc/{pid}/root").st_ino == os.stat("/").st_ino and time.monotonic() < deadline:
            time.sleep(0.01)
        assert rootfs.upper_dir(pid) == upper  # this process sees the host's mounts
        assert rootfs.upper_dir(os.getpid()) is None  # this process shares the host's root
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


@pytest.mark.parametrize("bad", ["relative/path", "/a/../b", "//double"])
def test_an_exclusion_must_be_an_absolute_normal_path(bad: str) -> None:
    with pytest.raises(UsageError, match="not an absolute, normal path"):
        rootfs.check_exclude([bad])
    rootfs.check_exclude(["/", "/root/.cache", "/tmp/x/"])  # these are fine


def test_mountinfo_escapes_are_undone_and_other_characters_kept() -> None:
    assert rootfs._unescape("/var/lib/my\\040dir/caf\u00e9\\011x") == "/var/lib/my dir/caf\u00e9\tx"


def test_the_workers_mount_points_stay_out_of_the_diff(image: Path, tmp_path: Path) -> None:
    assert "/proc" in rootfs.mount_points(os.getpid()) and "/" not in rootfs.mount_points(os.getpid())
    source, upper = _overlay(tmp_path, image, "source")
    (source / "live").mkdir()  # as a runtime makes a ConfigMap's mount point
    (source / "etc" / "resolv.conf").write_text("")
    (source / "tmp").mkdir()
    (source / "tmp" / "kept").write_text("x")
    diff = rootfs.capture(upper, tmp_path / "artifact", [], lambda: None, mounts=["/live", "/etc/resolv.conf"])
    with tarfile.open(tmp_path / "artifact" / rootfs.ARCHIVE) as tar:
        names = tar.getnames()
    assert "tmp/kept" in names and "live" not in names and "etc/resolv.conf" not in names
    assert diff.excluded == []  # what the user excluded; the mount points are the runtime's


def test_a_file_the_placeholder_writes_meanwhile_is_replaced_not_an_error(image: Path, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    source, upper = _overlay(tmp_path, image, "source")
    (source / "etc" / "app" / "conf").write_text("the source's conf\n")
    diff = rootfs.capture(upper, tmp_path / "artifact", [], lambda: None)
    placeholder, _ = _overlay(tmp_path, image, "placeholder")
    remove, raced = rootfs._remove, []

    def remove_then_race(root_fd: int, rel: str, keep_dir: bool = False) -> None:
        remove(root_fd, rel, keep_dir)
        if rel.endswith("conf") and not raced:  # the placeholder's process writes it right after the removal
            raced.append(rel)
            (placeholder / "etc" / "app" / "conf").write_text("the placeholder's own\n")

    monkeypatch.setattr(rootfs, "_remove", remove_then_race)
    rootfs.apply(str(placeholder), tmp_path / "artifact" / rootfs.ARCHIVE, diff, lambda: None)
    assert raced and (placeholder / "etc" / "app" / "conf").read_text() == "the source's conf\n"
