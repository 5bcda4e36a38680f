"""The memory a weight set lives in, in the service: one shareable allocation, filled by parallel loads.

CPU: a memfd (anonymous shared memory), passed to workers as a file descriptor; they map it shared. GPU: CUDA
virtual memory created with a POSIX-file-descriptor handle type, exported per request; workers import it
and map it into their own address range. The service keeps the memory for as long as it runs, so a worker
that is checkpointed, killed or restored never carries or reloads the weights.
"""

from __future__ import annotations

import ctypes
import mmap
import os

CHUNK = 64 << 20

Staging = tuple[int, memoryview]  # a pinned host buffer of CHUNK bytes: (pointer, view of it)


class CpuBacking:
    device = "cpu"

    def __init__(self, size: int, name: str) -> None:
        self.size = size
        self._fd = os.memfd_create(f"warmstart-weights-{name}", os.MFD_CLOEXEC)
        os.ftruncate(self._fd, size)
        self._map = mmap.mmap(self._fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            self._map.madvise(mmap.MADV_HUGEPAGE)
        except (AttributeError, OSError):
            pass  # huge pages are a speed-up, not a need

    def load(self, src: int, file_offset: int, blob_offset: int, n: int) -> memoryview:
        """Read n bytes of the open file src at file_offset into the blob; return them (for hashing)."""
        view = memoryview(self._map)[blob_offset : blob_offset + n]
        got = os.preadv(src, [view], file_offset)
        if got != n:
            raise OSError(f"short read: {got} of {n} bytes")
        return view

    def export_fd(self) -> int:
        """A new descriptor for one worker (the receiver owns it)."""
        return os.dup(self._fd)

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)


class CudaBacking:
    """GPU memory with an exportable handle, filled through pinned staging buffers on one copy stream."""

    def __init__(self, size: int, name: str, device: int) -> None:
        from warmstart.gpumem import vmm

        d = self._d = vmm.driver()
        self._ok = vmm.ok
        self.device = f"cuda:{device}"
        self._ctx = vmm.primary_context(device)
        prop, gran = vmm.device_memory(device, exportable=True)
        self.size = -(-size // gran) * gran
        self._handle = vmm.ok(d.cuMemCreate(self.size, prop, 0), "cuMemCreate (is the GPU out of memory?)")
        self.ptr = int(vmm.ok(d.cuMemAddressReserve(self.size, gran, 0, 0), "cuMemAddressReserve"))
        vmm.map_rw(self.ptr, self.size, self._handle, prop.location)  # the service fills it through its own map
        self._stream = vmm.ok(d.cuStreamCreate(1), "cuStreamCreate")  # non-blocking

    def _current(self) -> None:
        self._ok(self._d.cuCtxSetCurrent(self._ctx), "cuCtxSetCurrent")

    def staging(self) -> Staging:
        """A pinned host buffer of CHUNK bytes (one per loading thread), as (pointer, memoryview)."""
        self._current()
        ptr = int(self._ok(self._d.cuMemHostAlloc(CHUNK, 0), "cuMemHostAlloc"))
        return ptr, memoryview((ctypes.c_char * CHUNK).from_address(ptr)).cast("B")

    def load_pinned(self, src: int, file_offset: int, blob_offset: int, n: int, buf: Staging) -> memoryview:
        ptr, view = buf
        got = os.preadv(src, [view[:n]], file_offset)
        if got != n:
            raise OSError(f"short read: {got} of {n} bytes")
        d = self._d
        self._current()
        # Each thread has its own staging buffer: its copy must finish before it reads into it again.
        self._ok(d.cuMemcpyHtoDAsync(self.ptr + blob_offset, ptr, n, self._stream), "cuMemcpyHtoDAsync")
        self._ok(d.cuStreamSynchronize(self._stream), "cuStreamSynchronize")
        return view[:n]

    def copy_into(self, fd: int, size: int) -> None:
        """Copy the weights into another process's exported GPU memory (a worker that cannot import ours)."""
        d = self._d
        self._current()
        handle = self._ok(d.cuMemImportFromShareableHandle(
            fd, d.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR), "import the worker's memory")
        try:
            if size != self.size:
                raise ValueError(f"the worker's memory is {size} bytes, the weights take {self.size}")
            from warmstart.gpumem import vmm

            _, gran = vmm.device_memory(int(self.device.split(":")[1]))
            dst = int(self._ok(d.cuMemAddressReserve(size, gran, 0, 0), "cuMemAddressReserve"))
            try:
                vmm.map_rw(dst, size, handle, vmm.device_location(int(self.device.split(":")[1])))
                self._ok(d.cuMemcpyDtoDAsync(dst, self.ptr, size, self._stream), "cuMemcpyDtoDAsync")
                self._ok(d.cuStreamSynchronize(self._stream), "cuStreamSynchronize")
                d.cuMemUnmap(dst, size)
            finally:
                d.cuMemAddressFree(dst, size)
        finally:
            d.cuMemRelease(handle)

    def export_fd(self) -> int:
        d = self._d
        self._current()
        return int(self._ok(d.cuMemExportToShareableHandle(
            self._handle, d.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0), "export"))

    def close(self) -> None:
        d = self._d
        self._current()
        d.cuMemUnmap(self.ptr, self.size)
        d.cuMemAddressFree(self.ptr, self.size)
        d.cuMemRelease(self._handle)


Memory = CpuBacking | CudaBacking
