"""A seccomp filter that makes io_uring unavailable to one process tree.

CRIU cannot dump a process holding an io_uring instance. Event loops (libuv, some runtimes) use io_uring
when the kernel offers it and fall back to epoll when io_uring_setup fails with ENOSYS, so refusing the
three io_uring system calls to the worker alone keeps it checkpointable without a host-wide sysctl.
The filter is inherited across fork and exec, and CRIU saves and restores it with the process.
"""

from __future__ import annotations

import ctypes
import errno
import os

from warmstart import linux

# io_uring's system call numbers are the same on every architecture (the unified table since 5.1).
IO_URING_SYSCALLS = (425, 426, 427)  # io_uring_setup, io_uring_enter, io_uring_register

_SECCOMP_MODE_FILTER = 2
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000
_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_RET_K = 0x06  # BPF_RET | BPF_K


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def program(syscalls: tuple[int, ...] = IO_URING_SYSCALLS) -> list[tuple[int, int, int, int]]:
    """The BPF program: load the syscall number; for each refused one jump to ERRNO(ENOSYS); else allow."""
    n = len(syscalls)
    prog = [(_LD_W_ABS, 0, 0, 0)]  # offsetof(struct seccomp_data, nr) == 0
    for i, nr in enumerate(syscalls):
        prog.append((_JEQ_K, n - i, 0, nr))  # jump over the remaining checks and the ALLOW
    prog.append((_RET_K, 0, 0, _RET_ALLOW))
    prog.append((_RET_K, 0, 0, _RET_ERRNO | errno.ENOSYS))
    return prog


def refuse_io_uring() -> None:
    """Install the filter on the calling thread (use in a child before exec)."""
    insns = program()
    arr = (_SockFilter * len(insns))(*[_SockFilter(*i) for i in insns])
    fprog = _SockFprog(len(insns), arr)
    if os.geteuid() != 0:
        linux.prctl("PR_SET_NO_NEW_PRIVS", linux.PR_SET_NO_NEW_PRIVS, 1)
    linux.prctl("PR_SET_SECCOMP", linux.PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog))
