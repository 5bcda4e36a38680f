"""Copies between GPU memory and a file, through a few pinned staging buffers, on several threads.

A kept GPU region saves its contents into the artifact with this on quiesce and reads them back on resume,
so they are neither in the CUDA checkpoint (restored from pageable memory at ~5-8 GB/s) nor in CRIU's image
(restored into anonymous memory, then copied again). Each thread reads a piece of the file into one of its two
pinned buffers while the other one goes by DMA; the reads overlap, which is what the page cache and the disk
need to deliver their bandwidth. Only the staging buffers are ever pinned, and only during the copy.
Defaults from bench/probes/filecopy.py on the H100 VMs (docs/benchmarks.md).
"""

from __future__ import annotations

import ctypes
import os
import threading
from typing import Any, Callable

from warmstart.worker import hostcopy, vmm

PIECE = 8 << 20
READ_THREADS = 8
WRITE_THREADS = 8
_BUFFERS = 2  # per thread


def save(ctx: Any, device_ptr: int, nbytes: int, path: str, threads: int = WRITE_THREADS,
         piece: int = PIECE) -> None:
    """Write nbytes of GPU memory at device_ptr into a new file at path (removed again if this fails)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, nbytes)  # each thread writes its own pieces in place
        _run(ctx, device_ptr, nbytes, fd, False, threads, piece)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)


def load(ctx: Any, device_ptr: int, nbytes: int, path: str, threads: int = READ_THREADS,
         piece: int = PIECE) -> None:
    """Fill nbytes of GPU memory at device_ptr from the file at path, which must hold exactly that many bytes."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size != nbytes:
            raise OSError(f"{path} holds {size} bytes, the GPU region {nbytes} (a truncated or foreign file)")
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        _run(ctx, device_ptr, nbytes, fd, True, threads, piece)
    finally:
        os.close(fd)


def _run(ctx: Any, device_ptr: int, nbytes: int, fd: int, to_device: bool, threads: int, piece: int) -> None:
    offsets = list(range(0, nbytes, piece))
    threads = max(1, min(threads, len(offsets)))
    failed: list[BaseException] = []
    stop = threading.Event()
    # All staging buffers in one block pinned with one call: cuMemHostAlloc of many buffers cost more than the
    # copy itself on the H100 VMs (~0.5 s per GiB), pinning huge pages of our own ~35 GB/s.
    d = vmm.driver()
    vmm.ok(d.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    block_bytes = threads * _BUFFERS * piece
    block = hostcopy.alloc(block_bytes)
    try:
        vmm.ok(d.cuMemHostRegister(block, block_bytes, 0), "cuMemHostRegister (pinned staging buffers)")
    except BaseException:
        hostcopy.free(block, block_bytes)
        raise

    def work(i: int) -> None:
        bufs = [block + (i * _BUFFERS + b) * piece for b in range(_BUFFERS)]
        try:
            _worker(ctx, device_ptr, nbytes, fd, to_device, piece, offsets[i::threads], bufs, stop)
        except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
            failed.append(e)
            stop.set()

    try:
        pool = [threading.Thread(target=work, args=(i,), name=f"warmstart-filecopy-{i}") for i in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    finally:
        d.cuMemHostUnregister(block)
        hostcopy.free(block, block_bytes)
    if failed:
        raise failed[0]


def _worker(ctx: Any, device_ptr: int, nbytes: int, fd: int, to_device: bool, piece: int, offsets: list[int],
            bufs: list[int], stop: threading.Event) -> None:
    """Reads go through both buffers in turn (one fills while the other's DMA runs); writes wait for each DMA."""
    d = vmm.driver()
    vmm.ok(d.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    stream = vmm.ok(d.cuStreamCreate(d.CUstream_flags.CU_STREAM_NON_BLOCKING), "cuStreamCreate")
    events: list[Any] = []
    try:
        for _ in bufs:
            events.append(vmm.ok(d.cuEventCreate(d.CUevent_flags.CU_EVENT_DISABLE_TIMING), "cuEventCreate"))
        for k, off in enumerate(offsets):
            if stop.is_set():
                return
            n = min(piece, nbytes - off)
            b = k % len(bufs)
            vmm.ok(d.cuEventSynchronize(events[b]), "cuEventSynchronize")  # its last DMA is done
            view = memoryview((ctypes.c_char * n).from_address(bufs[b])).cast("B")
            try:
                if to_device:
                    _all(lambda v, o: os.preadv(fd, [v], o), view, off, "ended early (truncated?)")
                    vmm.ok(d.cuMemcpyHtoDAsync(device_ptr + off, bufs[b], n, stream), "cuMemcpyHtoDAsync")
                    vmm.ok(d.cuEventRecord(events[b], stream), "cuEventRecord")
                else:
                    vmm.ok(d.cuMemcpyDtoHAsync(bufs[b], device_ptr + off, n, stream), "cuMemcpyDtoHAsync")
                    vmm.ok(d.cuStreamSynchronize(stream), "cuStreamSynchronize")
                    _all(lambda v, o: os.pwritev(fd, [v], o), view, off, "could not be written (disk full?)")
            finally:
                view.release()
        vmm.ok(d.cuStreamSynchronize(stream), "cuStreamSynchronize")
    finally:
        d.cuStreamSynchronize(stream)
        for e in events:
            d.cuEventDestroy(e)
        d.cuStreamDestroy(stream)


def _all(io: Callable[[memoryview, int], int], view: memoryview, off: int, problem: str) -> None:
    done = 0
    while done < len(view):
        n = io(view[done:], off + done)
        if n <= 0:
            raise OSError(f"a GPU region's file {problem} at byte {off + done}")
        done += n
