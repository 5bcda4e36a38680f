"""The one syscall module: libc through ctypes, the namespace and mount calls, and their constants.

Standard library only, so that code running inside a worker (worker/, gpumem/, weights/client.py) may use it too.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MAP_FIXED, MAP_NORESERVE, PROT_NONE = 0x10, 0x4000, 0
PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
_SYS_OPENAT2 = 437  # the same number on x86_64 and aarch64
_SYS_OPEN_TREE, _SYS_MOVE_MOUNT = 428, 429  # likewise (the unified table)
_OPEN_TREE_CLONE, _MOVE_MOUNT_F_EMPTY_PATH, _AT_FDCWD = 1, 4, -100
RESOLVE_NO_MAGICLINKS, RESOLVE_IN_ROOT = 0x02, 0x10

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
MAP_FAILED = ctypes.c_void_p(-1).value


def check(ret: int, what: str) -> None:
    """Raise OSError with errno's text when a libc call returned non-zero."""
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(src: str, dst: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    check(libc.mount(src.encode(), dst.encode(), fstype.encode() if fstype else None, flags,
                     data.encode() if data else None), f"mount {dst}")


def umount(path: str) -> None:
    check(libc.umount2(path.encode(), 0), f"umount {path}")


def unshare(flags: int) -> None:
    check(libc.unshare(flags), "unshare")


def setns(path: str, nstype: int) -> None:
    """Join the namespace at `path` (/proc/PID/ns/KIND) with the calling thread."""
    fd = os.open(path, os.O_RDONLY)
    try:
        check(libc.setns(fd, nstype), f"setns {path}")
    finally:
        os.close(fd)


def bind_from(mnt_ns: str, src: str, dst: str) -> None:
    """Bind `src` of the mount namespace at `mnt_ns` onto `dst` here, which mount(2) refuses across namespaces:
    a detached copy is taken from inside that namespace (open_tree) and attached here (move_mount). For a
    single-threaded process (setns of a mount namespace wants one)."""
    here = os.open("/proc/self/ns/mnt", os.O_RDONLY)
    try:
        setns(mnt_ns, CLONE_NEWNS)
        try:
            tree = libc.syscall(_SYS_OPEN_TREE, _AT_FDCWD, src.encode(), _OPEN_TREE_CLONE | os.O_CLOEXEC)
            err = ctypes.get_errno()
        finally:
            check(libc.setns(here, CLONE_NEWNS), "setns back")
    finally:
        os.close(here)
    if tree < 0:
        raise OSError(err, f"open_tree {src}: {os.strerror(err)}")
    try:
        check(libc.syscall(_SYS_MOVE_MOUNT, tree, b"", _AT_FDCWD, dst.encode(), _MOVE_MOUNT_F_EMPTY_PATH),
              f"move_mount {dst}")
    finally:
        os.close(tree)


def prctl(what: str, option: int, *args: object) -> None:
    padded = (*args, 0, 0, 0, 0)[:4]
    if libc.prctl(option, *padded) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({what})")


def madvise(addr: int, length: int, advice: int, what: str) -> None:
    if libc.madvise(ctypes.c_void_p(addr), ctypes.c_size_t(length), advice) != 0:
        raise OSError(ctypes.get_errno(), f"madvise on {what} failed")


def resident_pages(fd: int, size: int, windows: int = 0) -> tuple[int, int] | None:
    """(resident, total) pages of an open file in the page cache (mincore on a mapping never touched); of
    `windows` evenly spaced 256 KiB windows only, where that is less than the file (the kernel's walk of a large
    file's pages takes ~17 ms a GB)."""
    addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr in (None, MAP_FAILED):
        return None
    try:
        span = 256 << 10
        step = (size // windows) // mmap.PAGESIZE * mmap.PAGESIZE if windows else 0
        ranges = [(at, span) for at in range(0, size - span, step)] if step > span else [(0, size)]
        resident = total = 0
        for at, n in ranges:
            pages = -(-n // mmap.PAGESIZE)
            vec = ctypes.create_string_buffer(pages)
            if libc.mincore(ctypes.c_void_p(addr + at), n, vec) != 0:
                return None
            resident, total = resident + pages - vec.raw.count(b"\x00"), total + pages
        return resident, total
    finally:
        libc.munmap(addr, size)


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def open_in_root(root_fd: int, path: str, flags: int, mode: int = 0) -> int:
    """openat2 with RESOLVE_IN_ROOT: `path` opened as if `root_fd` were `/`, so a symlink (absolute or through
    '..') in another mount namespace's tree (a container's /proc/PID/root) resolves inside it, never on the host."""
    how = _OpenHow(flags | os.O_CLOEXEC, mode, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
    fd = int(libc.syscall(_SYS_OPENAT2, root_fd, path.encode(), ctypes.byref(how), ctypes.sizeof(how)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return fd


def makedirs_in_root(root_fd: int, path: str) -> None:
    """`mkdir -p path` under root_fd, every component resolved as `open_in_root` does."""
    at = "/"
    for part in [p for p in path.split("/") if p]:
        parent = open_in_root(root_fd, at, os.O_PATH | os.O_DIRECTORY)
        try:
            os.mkdir(part, 0o755, dir_fd=parent)
        except FileExistsError:
            pass  # a directory, or a symlink the next open resolves inside the root
        finally:
            os.close(parent)
        at = f"{at.rstrip('/')}/{part}"
    os.close(open_in_root(root_fd, at, os.O_PATH | os.O_DIRECTORY))


def write_new(path: str | os.PathLike[str], data: bytes, mode: int = 0o600) -> None:
    """Create the file (never following a symlink or reusing one that exists), write it and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def in_network_of(pid: int, fn: Callable[[], T]) -> T:
    """fn() in process pid's network namespace: a thread joins it (setns applies to the calling thread only)."""
    if os.readlink(f"/proc/{pid}/ns/net") == os.readlink("/proc/self/ns/net"):
        return fn()
    box: dict[str, object] = {}

    def body() -> None:
        try:
            setns(f"/proc/{pid}/ns/net", CLONE_NEWNET)
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e

    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def sparse_copy(src: Path, dst: Path) -> int:
    """Copy src to dst keeping holes; return the bytes of data copied."""
    copied = 0
    fin = os.open(src, os.O_RDONLY)
    try:
        size = os.fstat(fin).st_size
        fout = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.ftruncate(fout, size)
            pos = 0
            while pos < size:
                try:
                    start = os.lseek(fin, pos, os.SEEK_DATA)
                except OSError as e:
                    if e.errno == errno.ENXIO:  # only a hole left
                        break
                    raise
                end = os.lseek(fin, start, os.SEEK_HOLE)
                os.lseek(fout, start, os.SEEK_SET)
                while start < end:
                    # sendfile, not copy_file_range: the copy crosses file systems (tmpfs <-> disk).
                    n = os.sendfile(fout, fin, start, end - start)
                    if n == 0:
                        break
                    start += n
                    copied += n
                pos = end
        finally:
            os.close(fout)
    finally:
        os.close(fin)
    os.chmod(dst, os.stat(src).st_mode & 0o7777)
    return copied
