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
from collections.abc import Callable
from typing import Any

from warmstart import linux
from warmstart.gpumem import vmm

PIECE = 256 << 20
_STREAMS = 4
_MADV_HUGEPAGE = 14


def alloc(nbytes: int) -> int:
    """Anonymous host memory (huge pages where the kernel allows), unpopulated until written."""
    addr = linux.libc.mmap(None, nbytes, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        raise MemoryError(f"cannot map {nbytes >> 20} MiB of host memory for a GPU region's contents")
    # A hint: fewer pages to pin and to restore.
    linux.libc.madvise(ctypes.c_void_p(addr), ctypes.c_size_t(nbytes), _MADV_HUGEPAGE)
    return int(addr)


def free(addr: int, nbytes: int) -> None:
    linux.libc.munmap(addr, nbytes)


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
    unpin = _unpinner(d, ctx, pinned, gentle)
    try:
        _pin_and_copy(d, streams, pinned, device_ptr, host, nbytes, to_device, piece)
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


def _unpinner(d: Any, ctx: Any, pinned: list[int], gentle: bool) -> Callable[[], None]:
    """The call that unregisters every host piece in pinned, the last pinned first."""

    def unpin() -> None:
        vmm.ok(d.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")  # registrations belong to the context
        while pinned:
            vmm.ok(d.cuMemHostUnregister(pinned[-1]), "cuMemHostUnregister")
            pinned.pop()
            if gentle:
                time.sleep(0.002)  # let the worker's own threads at the driver and the GIL in between

    return unpin


def _pin_and_copy(d: Any, streams: list[Any], pinned: list[int], device_ptr: int, host: int, nbytes: int,
                  to_device: bool, piece: int) -> None:
    """Pin host piece by piece (recording each in pinned), each piece's DMA queued on the streams in turn as
    soon as it is pinned; returns when every DMA is done."""
    for i, off in enumerate(range(0, nbytes, piece)):
        n = min(piece, nbytes - off)
        vmm.ok(d.cuMemHostRegister(host + off, n, 0), "cuMemHostRegister")
        pinned.append(host + off)
        stream = streams[i % len(streams)]
        if to_device:
            vmm.ok(d.cuMemcpyHtoDAsync(device_ptr + off, host + off, n, stream), "cuMemcpyHtoDAsync")
        else:
            vmm.ok(d.cuMemcpyDtoHAsync(host + off, device_ptr + off, n, stream), "cuMemcpyDtoHAsync")
    for s in streams:
        vmm.ok(d.cuStreamSynchronize(s), "cuStreamSynchronize")
