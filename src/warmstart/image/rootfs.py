"""What a containerized worker wrote over its image: taken from its root's overlay upper dir at checkpoint, put
back inside a placeholder's root before CRIU restores the worker there.

An overlay's upper dir holds every file the container created or changed (copied up whole), a whiteout (a
0/0 character device) for each path it deleted, and a `trusted.overlay.opaque` mark on each directory it
replaced. The checkpoint writes the files into rootfs/diff.tar (sealed with the image when encryption is on)
and the deletions and replaced directories into the manifest, minus the paths the user excludes. Restoring,
every path is resolved inside the placeholder's root with openat2(RESOLVE_IN_ROOT), so nothing in the
archive, nor a symlink the placeholder's image holds, can reach outside it.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tarfile
from collections.abc import Callable, Collection
from pathlib import Path

from warmstart import linux
from warmstart.artifact.manifest import RootfsDiff
from warmstart.errors import ArtifactError, StepFailed, UsageError

ARCHIVE = "diff.tar"
_OPAQUE = "trusted.overlay.opaque"
_METACOPY = "trusted.overlay.metacopy"
_COPY = 1 << 20


def _unescape(s: str) -> str:
    """mountinfo's octal escapes (\\040 for a space, \\011, \\012, \\134); the rest of the path as it is."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def upper_dir(pid: int) -> Path | None:
    """The overlay upper dir under the root file system of process `pid`, seen from here; None when the
    process shares this root (not in a container) or its root is no overlay."""
    here, there = os.stat("/"), os.stat(f"/proc/{pid}/root")
    if (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino):
        return None
    root = None
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields, _, rest = line.partition(" - ")
        if fields.split()[4] == "/":
            root = rest.split()  # the last mount on "/" is the one the process sees
    if not root or root[0] != "overlay" or len(root) < 3:
        return None
    opts = dict(o.partition("=")[::2] for o in root[2].split(","))
    upper = _unescape(opts.get("upperdir", ""))
    if not upper.startswith("/"):
        return None
    # The path is the mounter's: here if this process sees the host's mounts, else through the host's init.
    for seen in (Path(upper), Path(f"/proc/1/root{upper}")):
        try:
            if seen.is_dir() and os.access(seen, os.R_OK | os.X_OK):
                return seen
        except OSError:
            continue
    raise StepFailed(f"the worker's container root is an overlay whose upper dir {upper} cannot be read from here",
                     "run warmstart in the host's mount namespace, or where the host's /proc/1/root is readable")


def check_exclude(exclude: Collection[str]) -> None:
    """Exclusions are container paths: absolute, normal. Checked before a checkpoint starts."""
    bad = [e for e in exclude
           if not e.startswith("/") or os.path.normpath(e) != (e.rstrip("/") or "/") or e.startswith("//")]
    if bad:
        raise UsageError(f"rootfs exclusion {bad[0][:200]!r} is not an absolute, normal path",
                         "name container paths like /root/.cache")


def mount_points(pid: int) -> list[str]:
    """Where process `pid` sees mounts other than its root: a container runtime made those paths in the upper
    dir to mount over (/etc/hosts, a ConfigMap's directory, /dev ...); a placeholder has its own mounts there,
    often read-only, so they stay out of the diff."""
    out = []
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        point = _unescape(line.split()[4])
        if point != "/":
            out.append(point)
    return out


def _excluded(rel: str, exclude: Collection[str]) -> bool:
    return any(rel == e or rel.startswith(e.rstrip("/") + "/") for e in exclude)


def capture(upper: Path, out_dir: Path, exclude: Collection[str], stop: Callable[[], None],
            mounts: Collection[str] = ()) -> RootfsDiff:
    """Write what `upper` holds into out_dir/diff.tar, but for `exclude` and the worker's `mount_points`;
    return the record of it for the manifest (which lists the exclusions the user asked for)."""
    diff = RootfsDiff(upper=str(upper), excluded=sorted(exclude))
    exclude = {*exclude, *mounts}
    out_dir.mkdir(mode=0o700, exist_ok=True)
    with tarfile.open(out_dir / ARCHIVE, "w", format=tarfile.PAX_FORMAT) as tar:
        for dirpath, dirs, files in os.walk(upper, onerror=_raise):
            stop()
            rel_dir = os.path.relpath(dirpath, upper)
            prefix = "" if rel_dir == "." else "/" + rel_dir
            for name in sorted(dirs + files):
                _add(tar, Path(dirpath) / name, f"{prefix}/{name}", diff, exclude, dirs)
    return diff


def _raise(e: OSError) -> None:
    raise StepFailed(f"cannot read the container's overlay upper dir: {e}", "check the agent runs privileged")


def _add(tar: tarfile.TarFile, path: Path, rel: str, diff: RootfsDiff, exclude: Collection[str],
         dirs: list[str]) -> None:
    st = os.lstat(path)
    if _excluded(rel, exclude):
        if path.name in dirs:
            dirs.remove(path.name)  # os.walk does not descend into it
        return
    if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
        diff.deleted.append(rel)
        return
    if stat.S_ISSOCK(st.st_mode) or stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        diff.skipped.append(rel)  # a socket is made again by whoever binds it; devices come from the runtime
        return
    xattrs = _xattrs(path)
    if _METACOPY in xattrs:
        raise StepFailed(f"{rel} in the container's overlay ({path}) holds metadata only (overlay metacopy=on)",
                         "mount the container's overlay without metacopy, or exclude the path")
    if stat.S_ISDIR(st.st_mode) and xattrs.get(_OPAQUE) == b"y":
        diff.opaque.append(rel)
    tar.add(path, arcname=rel.lstrip("/"), recursive=False)
    diff.files += 1
    diff.bytes += st.st_size if stat.S_ISREG(st.st_mode) else 0


def _xattrs(path: Path) -> dict[str, bytes]:
    try:
        return {n: os.getxattr(path, n, follow_symlinks=False) for n in (_OPAQUE, _METACOPY)
                if n in os.listxattr(path, follow_symlinks=False)}
    except OSError:
        return {}


def apply(root: str, archive: Path, diff: RootfsDiff, stop: Callable[[], None]) -> None:
    """Put the diff into the root file system at `root` (a placeholder's /proc/PID/root): deletions, replaced
    directories emptied, then every archived entry with its owner, mode and times."""
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    try:
        for rel in diff.deleted:
            _remove(root_fd, rel)
        for rel in diff.opaque:
            _empty(root_fd, rel)
        with tarfile.open(archive, "r:") as tar:
            for m in tar:
                stop()
                _extract(root_fd, tar, m)
    except (OSError, tarfile.TarError) as e:
        raise StepFailed(f"cannot put what the worker's container wrote into the placeholder's root: {e}",
                         "check the placeholder runs the source's image and has room") from None
    finally:
        os.close(root_fd)


def _parent(root_fd: int, rel: str, create: bool = True) -> tuple[int, str]:
    """(an O_PATH fd of rel's parent inside the root, made if missing, and rel's last component)."""
    parent, _, name = rel.rstrip("/").rpartition("/")
    if create:
        linux.makedirs_in_root(root_fd, parent or "/")
    return linux.open_in_root(root_fd, parent or "/", os.O_PATH | os.O_DIRECTORY), name


def _remove(root_fd: int, rel: str, keep_dir: bool = False) -> None:
    try:
        fd, name = _parent(root_fd, rel, create=False)
    except FileNotFoundError:
        return
    try:
        is_dir = stat.S_ISDIR(os.lstat(name, dir_fd=fd).st_mode)
        if is_dir and keep_dir:
            return
        if is_dir:
            shutil.rmtree(name, dir_fd=fd)
        else:
            os.unlink(name, dir_fd=fd)
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)


def _empty(root_fd: int, rel: str) -> None:
    linux.makedirs_in_root(root_fd, rel)
    fd = linux.open_in_root(root_fd, rel, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in os.listdir(fd):
            _remove(root_fd, f"{rel.rstrip('/')}/{name}")
    finally:
        os.close(fd)


def _safe(name: str) -> str:
    parts = name.split("/")
    if name.startswith("/") or not name or any(p in ("", ".", "..") for p in parts):
        raise ArtifactError(f"the artifact's rootfs archive names {name[:200]!r}", "checkpoint again")
    return "/" + name


def _extract(root_fd: int, tar: tarfile.TarFile, m: tarfile.TarInfo) -> None:
    rel = _safe(m.name)
    if m.isdir():
        _remove(root_fd, rel, keep_dir=True)  # a file or symlink the image has in its place goes
        linux.makedirs_in_root(root_fd, rel)
        fd = linux.open_in_root(root_fd, rel, os.O_RDONLY | os.O_DIRECTORY)
        _own(fd, m)
        os.close(fd)
        return
    if not (m.isfile() or m.issym() or m.islnk() or m.isfifo()):
        return
    for attempt in range(3):
        _remove(root_fd, rel)  # whatever the placeholder's image has there, a symlink included, goes
        parent, name = _parent(root_fd, rel)
        try:
            _create(root_fd, parent, name, tar, m)
            return
        except FileExistsError:
            # The placeholder's processes run meanwhile: one may have just created the same path (Python's
            # bytecode cache, written by rename); the archived entry replaces it, as it did in the source.
            if attempt == 2:
                raise
        finally:
            os.close(parent)


def _create(root_fd: int, parent: int, name: str, tar: tarfile.TarFile, m: tarfile.TarInfo) -> None:
    if m.issym():
        os.symlink(m.linkname, name, dir_fd=parent)
    elif m.islnk():
        src_parent, src_name = _parent(root_fd, _safe(m.linkname))
        try:
            os.link(src_name, name, src_dir_fd=src_parent, dst_dir_fd=parent, follow_symlinks=False)
        finally:
            os.close(src_parent)
    elif m.isfifo():
        os.mkfifo(name, m.mode & 0o7777, dir_fd=parent)
    else:
        _write(parent, name, tar, m)


def _write(parent: int, name: str, tar: tarfile.TarFile, m: tarfile.TarInfo) -> None:
    src = tar.extractfile(m)
    assert src is not None  # a regular file's member
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=parent)
    try:
        while chunk := src.read(_COPY):
            os.write(fd, chunk)
        _own(fd, m)
        os.utime(fd, (m.mtime, m.mtime))
    finally:
        os.close(fd)


def _own(fd: int, m: tarfile.TarInfo) -> None:
    os.fchown(fd, m.uid, m.gid)
    os.fchmod(fd, m.mode & 0o7777)
