"""Copies between GPU memory and a process's own host memory at PCIe speed, without keeping memory pinned.

The CUDA checkpoint restores GPU memory from pageable host memory through the driver's staging buffers
(~5-8 GB/s). Here the host buffer is pinned piece by piece (cuMemHostRegister) while the pieces already
pinned go by DMA, and unpinned afterwards, so nothing stays pinned across a checkpoint (the checkpoint and
CRIU see plain anonymous memory) and the copy runs at the speed of pinning (~35 GB/s on the H100 VMs).
"""

from __future__ import annotations

import ctypes
import mmap
import time
from typing import Any, Callable

from warmstart.gpumem import vmm

PIECE = 256 << 20
_STREAMS = 4
_MADV_HUGEPAGE = 14
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def alloc(nbytes: int) -> int:
    """Anonymous host memory (huge pages where the kernel allows), unpopulated until written."""
    addr = _libc.mmap(None, nbytes, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        raise MemoryError(f"cannot map {nbytes >> 20} MiB of host memory for a GPU region's contents")
    _libc.madvise(addr, nbytes, _MADV_HUGEPAGE)  # a hint: fewer pages to pin and to restore
    return int(addr)


def free(addr: int, nbytes: int) -> None:
    _libc.munmap(addr, nbytes)


def copy(ctx: Any, device_ptr: int, host: int, nbytes: int, to_device: bool, piece: int = PIECE,
         gentle: bool = False) -> Callable[[], None]:
    """Copy nbytes between device_ptr and host; returns the call that unpins the host buffer again (piece by
    piece with pauses if gentle, for a worker that is serving meanwhile).

    Pinning is serialised in the kernel and the driver, so one thread pins piece after piece while the DMA of
    the pieces before runs on a few streams; the copy is done when this returns. Unpinning costs about as
    much as pinning: a caller on a critical path may run it later (from any thread), and must before the next
    checkpoint."""
    d = vmm.driver()
    vmm.ok(d.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    streams = [vmm.ok(d.cuStreamCreate(d.CUstream_flags.CU_STREAM_NON_BLOCKING), "cuStreamCreate")
               for _ in range(_STREAMS)]
    pinned: list[int] = []

    def unpin() -> None:
        vmm.ok(d.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")  # registrations belong to the context
        while pinned:
            vmm.ok(d.cuMemHostUnregister(pinned[-1]), "cuMemHostUnregister")
            pinned.pop()
            if gentle:
                time.sleep(0.002)  # let the worker's own threads at the driver and the GIL in between

    try:
        for i, off in enumerate(range(0, nbytes, piece)):
            n = min(piece, nbytes - off)
            vmm.ok(d.cuMemHostRegister(host + off, n, 0), "cuMemHostRegister")
            pinned.append(host + off)
            if to_device:
                vmm.ok(d.cuMemcpyHtoDAsync(device_ptr + off, host + off, n, streams[i % _STREAMS]), "cuMemcpyHtoDAsync")
            else:
                vmm.ok(d.cuMemcpyDtoHAsync(host + off, device_ptr + off, n, streams[i % _STREAMS]), "cuMemcpyDtoHAsync")
        for s in streams:
            vmm.ok(d.cuStreamSynchronize(s), "cuStreamSynchronize")
    except BaseException:
        for s in streams:
            d.cuStreamSynchronize(s)
        try:
            unpin()
        except RuntimeError:
            pass  # the copy's own error is the one to report
        raise
    finally:
        for s in streams:
            d.cuStreamDestroy(s)
    return unpin
