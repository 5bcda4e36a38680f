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
import struct
import sys
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

from warmstart.gpumem import bf16kernel, bf16pack, hostcopy, vmm

PIECE = 8 << 20
READ_THREADS = 8
WRITE_THREADS = 8
_BUFFERS = 2  # per thread
_MAX_PIECE = 256 << 20  # what a packed file's header may ask of the staging buffers
# A packed file starts with a header (magic, region bytes, piece bytes, pieces) and one entry per piece (where
# its bytes start in the file, escapes, base, packed or not); the pieces follow, one after another.
_MAGIC = b"WSBF16P1"
_HEAD = struct.Struct("<8sQQQ")
_ENTRY = struct.Struct("<QIBBxx")


class Piece(NamedTuple):
    at: int  # in the region
    n: int
    file_at: int
    length: int  # bytes in the file
    plan: bf16pack.Plan | None  # None: the bytes as they are


def save(ctx: Any, device_ptr: int, nbytes: int, path: str, *, packed_on: int | None = None,
         threads: int = WRITE_THREADS, piece: int = PIECE) -> None:
    """Write nbytes of GPU memory at device_ptr into a new file at path (removed again if this fails).
    packed_on: the memory's device index, to pack it as bf16 (warmstart.gpumem.bf16pack; needs torch)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        if packed_on is None:
            pieces = _raw_pieces(nbytes, piece)
            os.ftruncate(fd, nbytes)  # each thread writes its own pieces in place
        else:
            pieces = packed_pieces(nbytes, piece, _plans(device_ptr, nbytes, packed_on, piece))
            head = header(nbytes, piece, pieces)
            os.ftruncate(fd, pieces[-1].file_at + pieces[-1].length)
            _all(lambda v, o: os.pwritev(fd, [v], o), memoryview(head), 0, "could not be written (disk full?)")
        _run(ctx, device_ptr, fd, False, threads, pieces, packed_on)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)


def load(ctx: Any, device_ptr: int, nbytes: int, path: str, *, packed_on: int | None = None,
         threads: int = READ_THREADS, piece: int = PIECE) -> None:
    """Fill nbytes of GPU memory at device_ptr from the file save() wrote at path (with the same packed_on)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if packed_on is None:
            if size != nbytes:
                raise OSError(f"{path} holds {size} bytes, the GPU region {nbytes} (a truncated or foreign file)")
            pieces = _raw_pieces(nbytes, piece)
        else:
            pieces = read_layout(fd, size, nbytes, path)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        _run(ctx, device_ptr, fd, True, threads, pieces, packed_on)
    finally:
        os.close(fd)


def _raw_pieces(nbytes: int, piece: int) -> list[Piece]:
    """The pieces of a file that holds the region's bytes as they are, at the same offsets."""
    return [Piece(at, min(piece, nbytes - at), at, min(piece, nbytes - at), None) for at in range(0, nbytes, piece)]


def _plans(device_ptr: int, nbytes: int, device: int, piece: int) -> list[bf16pack.Plan | None]:
    import torch

    region = vmm.uint8_tensor(torch, device_ptr, nbytes, device)
    return [bf16pack.plan(region[at: at + piece]) for at in range(0, nbytes, piece)]


def packed_pieces(nbytes: int, piece: int, plans: list[bf16pack.Plan | None]) -> list[Piece]:
    """Where each piece of a packed file goes: one after another, after the header."""
    pieces: list[Piece] = []
    file_at = _HEAD.size + _ENTRY.size * len(plans)
    for k, p in enumerate(plans):
        n = min(piece, nbytes - k * piece)
        length = bf16pack.packed_size(n, p.escapes) if p else n
        pieces.append(Piece(k * piece, n, file_at, length, p))
        file_at += length
    return pieces


def header(nbytes: int, piece: int, pieces: list[Piece]) -> bytes:
    return _HEAD.pack(_MAGIC, nbytes, piece, len(pieces)) + b"".join(
        _ENTRY.pack(p.file_at, p.plan.escapes if p.plan else 0, p.plan.base if p.plan else 0, bool(p.plan))
        for p in pieces)


def read_layout(fd: int, size: int, nbytes: int, path: str) -> list[Piece]:
    def bad(why: str) -> OSError:
        return OSError(f"{path} is not the packed GPU region it should be: {why} (a truncated or foreign file)")

    head = os.pread(fd, _HEAD.size, 0)
    if len(head) < _HEAD.size:
        raise bad("no header")
    magic, total, piece, count = _HEAD.unpack(head)
    if magic != _MAGIC or total != nbytes or not 0 < piece <= _MAX_PIECE or count != -(-nbytes // piece):
        raise bad(f"header says {total} bytes in pieces of {piece}, the region has {nbytes}")
    table = os.pread(fd, _ENTRY.size * count, _HEAD.size)
    if len(table) < _ENTRY.size * count:
        raise bad("its piece table ends early")
    entries = [_ENTRY.unpack_from(table, k * _ENTRY.size) for k in range(count)]
    plans = [bf16pack.Plan(base, escapes) if packed else None for _, escapes, base, packed in entries]
    pieces = packed_pieces(nbytes, piece, plans)
    for k, ((where, _, _, packed), p) in enumerate(zip(entries, pieces, strict=True)):
        if where != p.file_at or packed > 1 or (p.plan and (p.n % 16 or p.length >= p.n or p.plan.base > 120)):
            raise bad(f"piece {k} is not where or what its table says")
    end = pieces[-1].file_at + pieces[-1].length
    if end != size:
        raise bad(f"it holds {size} bytes, its table {end}")
    return pieces


def _run(ctx: Any, device_ptr: int, fd: int, to_device: bool, threads: int, pieces: list[Piece],
         packed_on: int | None) -> None:
    threads = max(1, min(threads, len(pieces)))
    piece = max((p.n for p in pieces), default=0)
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
            _worker(ctx, device_ptr, fd, to_device, pieces[i::threads], bufs, stop, packed_on, piece)
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
        if packed_on is not None and "torch" in sys.modules:
            # Packing's temporaries, else they would stay in torch's cache (and in the CUDA checkpoint).
            sys.modules["torch"].cuda.empty_cache()
    if failed:
        raise failed[0]


def _worker(ctx: Any, device_ptr: int, fd: int, to_device: bool, pieces: list[Piece], bufs: list[int],
            stop: threading.Event, packed_on: int | None, piece: int) -> None:
    """Reads go through both buffers in turn (one fills while the other's DMA runs); writes wait for each DMA.
    A packed piece goes through a GPU scratch buffer, (un)packed there on the same stream."""
    d = vmm.driver()
    vmm.ok(d.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    stream = vmm.ok(d.cuStreamCreate(d.CUstream_flags.CU_STREAM_NON_BLOCKING), "cuStreamCreate")
    events: list[Any] = []
    packing: _Packing | None = None
    try:
        packing = _Packing(packed_on, stream, device_ptr, piece) if packed_on is not None else None
        for _ in bufs:
            events.append(vmm.ok(d.cuEventCreate(d.CUevent_flags.CU_EVENT_DISABLE_TIMING), "cuEventCreate"))
        for k, p in enumerate(pieces):
            if stop.is_set():
                return
            b = k % len(bufs)
            vmm.ok(d.cuEventSynchronize(events[b]), "cuEventSynchronize")  # its last DMA is done
            view = memoryview((ctypes.c_char * p.length).from_address(bufs[b])).cast("B")
            try:
                if to_device:
                    _all(lambda v, o: os.preadv(fd, [v], o), view, p.file_at, "ended early (truncated?)")
                    target = packing.scratch if packing and p.plan else device_ptr + p.at
                    vmm.ok(d.cuMemcpyHtoDAsync(target, bufs[b], p.length, stream), "cuMemcpyHtoDAsync")
                    vmm.ok(d.cuEventRecord(events[b], stream), "cuEventRecord")
                    if packing and p.plan:
                        packing.unpack(p)
                else:
                    source = device_ptr + p.at
                    if packing and p.plan:
                        packing.pack(p)
                        source = packing.scratch
                    vmm.ok(d.cuMemcpyDtoHAsync(bufs[b], source, p.length, stream), "cuMemcpyDtoHAsync")
                    vmm.ok(d.cuStreamSynchronize(stream), "cuStreamSynchronize")
                    _all(lambda v, o: os.pwritev(fd, [v], o), view, p.file_at, "could not be written (disk full?)")
            finally:
                view.release()
        vmm.ok(d.cuStreamSynchronize(stream), "cuStreamSynchronize")
    finally:
        d.cuStreamSynchronize(stream)
        if packing is not None:
            packing.close()
        for e in events:
            d.cuEventDestroy(e)
        d.cuStreamDestroy(stream)


class _Packing:
    """One thread's GPU scratch buffer for packed pieces: packed there (torch) before a save's DMA, unpacked
    from there (bf16kernel, else torch) after a load's."""

    def __init__(self, device: int, stream: Any, device_ptr: int, size: int) -> None:
        d = vmm.driver()
        self.device, self.stream, self.device_ptr, self.size = device, stream, device_ptr, size
        self.kernel = bf16kernel.get(device)  # also built on save, so that a restored process has it
        self.scratch = int(vmm.ok(d.cuMemAlloc(size), "cuMemAlloc (is the GPU out of memory?)"))

    def close(self) -> None:
        vmm.driver().cuMemFree(self.scratch)

    def _torch(self) -> tuple[Any, Any]:
        import torch

        return torch, torch.cuda.ExternalStream(int(self.stream), device=torch.device("cuda", self.device))

    def pack(self, p: Piece) -> None:
        assert p.plan is not None
        torch, stream = self._torch()
        with torch.cuda.stream(stream):
            bf16pack.pack(vmm.uint8_tensor(torch, self.device_ptr + p.at, p.n, self.device), p.plan,
                          vmm.uint8_tensor(torch, self.scratch, self.size, self.device))

    def unpack(self, p: Piece) -> None:
        assert p.plan is not None
        if self.kernel is not None:
            self.kernel.unpack(self.scratch, self.device_ptr + p.at, p.n, p.plan, self.stream)
            return
        torch, stream = self._torch()
        with torch.cuda.stream(stream):
            bf16pack.unpack(vmm.uint8_tensor(torch, self.scratch, self.size, self.device), p.plan,
                            vmm.uint8_tensor(torch, self.device_ptr + p.at, p.n, self.device))


def _all(io: Callable[[memoryview, int], int], view: memoryview, off: int, problem: str) -> None:
    done = 0
    while done < len(view):
        n = io(view[done:], off + done)
        if n <= 0:
            raise OSError(f"a GPU region's file {problem} at byte {off + done}")
        done += n
