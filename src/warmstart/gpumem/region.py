"""A releasable GPU memory region for a worker's KV cache (CUDA virtual memory management).

    kv = GpuRegion(8 << 30, device=0)   # reserve the address range once, back it, zero it
    cache = kv.tensor(torch)            # a torch uint8 tensor over the whole region
    kv.release()                        # on quiesce: unmap + free the memory; the address range stays
    kv.restore()                        # on resume: new memory mapped at the same address, zeroed

    w = GpuRegion(16 << 30, device=0, keep=True)   # contents survive: weights
    w.release()                         # saved first: into a file of the artifact, else into host memory
    w.restore()                         # read back at PCIe speed
    GpuRegion(n, keep=True, pack_bf16=True)   # saved as 3/4 of the bytes, if it holds bf16 (needs torch)

Released memory is not in the CUDA checkpoint, and because the address never changes, tensors, views and
captured CUDA graphs that point into the region stay valid across a checkpoint and restore. A kept region's
contents go, when the checkpoint offers a directory for them (warmstart.worker.savedir), into a file of the
artifact that every restored replica reads straight into GPU memory (warmstart.gpumem.filecopy).
Otherwise they go into the process's own memory, so into CRIU's image, and are copied back from there
(warmstart.gpumem.hostcopy). Either way they come back faster than through the driver's restore. A region of
bf16 values (model weights) may be packed into its file losslessly at 12 bits a value (warmstart.gpumem.bf16pack):
fewer bytes to write, to read from a cold disk and to copy over PCIe.
Needs cuda-bindings; on a CPU worker use an ordinary buffer instead.
"""

from __future__ import annotations

import sys
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from warmstart.gpumem import filecopy, hostcopy, vmm
from warmstart.worker import savedir

_regions: weakref.WeakSet[GpuRegion] = weakref.WeakSet()
_serial = 0


def released_bytes() -> int:
    """GPU bytes this process's regions have released and will map again on resume."""
    return sum(r.nbytes for r in list(_regions) if not r.mapped)


def _drop(region: GpuRegion, unpin: Callable[[], None], host: int, nbytes: int) -> None:
    try:
        unpin()
    except RuntimeError as e:  # a background thread: say it where the worker's log will show it
        region.unpin_error = str(e)
        print(f"warmstart: the host copy of a restored GPU region could not be unpinned ({e}); "
              f"{nbytes >> 20} MiB of host memory stay pinned until the process exits", file=sys.stderr, flush=True)
    for off in range(0, nbytes, hostcopy.PIECE):  # a piece at a time: munmap holds the address space's lock
        hostcopy.free(host + off, min(hostcopy.PIECE, nbytes - off))
        time.sleep(0.001)


class GpuRegion:
    def __init__(self, nbytes: int, device: int = 0, keep: bool = False, pack_bf16: bool = False) -> None:
        d = vmm.driver()
        self.device = device
        self.keep = keep
        self._packed_on = device if pack_bf16 else None
        self._host = 0  # a kept region's contents while it is released (in host memory)
        self._saved = False  # ... or in the file `file_name` of the directory savedir names
        self._cleanup: threading.Thread | None = None
        self.unpin_error: str | None = None  # set if the background unpin after a restore failed
        self._ctx = vmm.primary_context(device)
        self._prop, gran = vmm.device_memory(device)
        self.nbytes = -(-nbytes // gran) * gran
        self.ptr = int(vmm.ok(d.cuMemAddressReserve(self.nbytes, gran, 0, 0), "cuMemAddressReserve"))
        self._handle: Any = None
        global _serial
        self.file_name = f"region-{_serial}.{'bf16p' if pack_bf16 else 'bin'}"
        _serial += 1
        self.restore()
        _regions.add(self)

    def _current(self) -> None:
        # The SDK calls release/restore from its own thread, which has no current context yet.
        vmm.ok(vmm.driver().cuCtxSetCurrent(self._ctx), "cuCtxSetCurrent")

    @property
    def mapped(self) -> bool:
        return self._handle is not None

    def restore(self) -> None:
        """Back the reserved range with device memory: a kept region's contents, else zeros (stale contents
        must not leak into use)."""
        if self.mapped:
            return
        d = vmm.driver()
        self._current()
        handle = vmm.ok(d.cuMemCreate(self.nbytes, self._prop, 0), "cuMemCreate (is the GPU out of memory?)")
        try:
            vmm.map_rw(self.ptr, self.nbytes, handle, self._prop.location)
        except BaseException:
            d.cuMemRelease(handle)
            raise
        unpin = None
        try:
            if self._saved:
                filecopy.load(self._ctx, self.ptr, self.nbytes, self._saved_path(), packed_on=self._packed_on)
            elif self._host:
                unpin = hostcopy.copy(self._ctx, self.ptr, self._host, self.nbytes, to_device=True, gentle=True)
            else:
                vmm.ok(d.cuMemsetD8(self.ptr, 0, self.nbytes), "cuMemsetD8")
                vmm.ok(d.cuCtxSynchronize(), "cuCtxSynchronize")
        except BaseException:
            d.cuMemUnmap(self.ptr, self.nbytes)
            d.cuMemRelease(handle)
            raise
        self._handle = handle
        self._saved = False
        if self._host:
            host, self._host = self._host, 0
            # Unpinning takes about as long as the copy: after the resume, in the background, piece by piece
            # so that the worker's first requests do not wait for it (release() waits for it).
            self._cleanup = threading.Thread(target=_drop, args=(self, unpin, host, self.nbytes),
                                             name="warmstart-region-unpin", daemon=True)
            self._cleanup.start()

    def release(self) -> None:
        """Give the memory back to the driver; the address range stays reserved for restore()."""
        if not self.mapped:
            return
        d = vmm.driver()
        self._current()
        vmm.ok(d.cuCtxSynchronize(), "cuCtxSynchronize")
        self.join()
        where = savedir.get()
        if self.keep and where:
            filecopy.save(self._ctx, self.ptr, self.nbytes, str(Path(where) / self.file_name),
                          packed_on=self._packed_on)
            self._saved = True
        elif self.keep:
            host = hostcopy.alloc(self.nbytes)
            try:
                hostcopy.copy(self._ctx, self.ptr, host, self.nbytes, to_device=False)()
            except BaseException:
                hostcopy.free(host, self.nbytes)
                raise
            self._host = host
        vmm.ok(d.cuMemUnmap(self.ptr, self.nbytes), "cuMemUnmap")
        vmm.ok(d.cuMemRelease(self._handle), "cuMemRelease")
        self._handle = None

    def _saved_path(self) -> str:
        where = savedir.get()
        if not where:
            raise RuntimeError(f"this GPU region's contents were saved into {self.file_name} of a checkpoint, but the "
                               "resume did not say where that checkpoint is")
        return str(Path(where) / self.file_name)

    def join(self) -> None:
        """Wait until the host copy of the last restore is unpinned and freed."""
        if self._cleanup is not None:
            self._cleanup.join()
            self._cleanup = None

    def tensor(self, torch: Any) -> Any:
        """A torch uint8 tensor over the region (no copy); valid whenever the region is mapped."""
        return vmm.uint8_tensor(torch, self.ptr, self.nbytes, self.device)
