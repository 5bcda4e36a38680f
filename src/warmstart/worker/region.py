"""A releasable GPU memory region for a worker's KV cache (CUDA virtual memory management).

    kv = GpuRegion(8 << 30, device=0)   # reserve the address range once, back it, zero it
    cache = kv.tensor(torch)            # a torch uint8 tensor over the whole region
    kv.release()                        # on quiesce: unmap + free the memory; the address range stays
    kv.restore()                        # on resume: new memory mapped at the same address, zeroed

Released memory is not in the CUDA checkpoint (so not in the image), and because the address never
changes, tensors, views and captured CUDA graphs that point into the region stay valid across a
checkpoint and restore. Needs cuda-bindings; on a CPU worker use an ordinary buffer instead.
"""

from __future__ import annotations

import weakref
from typing import Any

from warmstart.worker import vmm

_regions: "weakref.WeakSet[GpuRegion]" = weakref.WeakSet()


def released_bytes() -> int:
    """GPU bytes this process's regions have released and will map again on resume."""
    return sum(r.nbytes for r in list(_regions) if not r.mapped)


class GpuRegion:
    def __init__(self, nbytes: int, device: int = 0) -> None:
        d = vmm.driver()
        self.device = device
        self._ctx = vmm.primary_context(device)
        self._prop, gran = vmm.device_memory(device)
        self.nbytes = -(-nbytes // gran) * gran
        self.ptr = int(vmm.ok(d.cuMemAddressReserve(self.nbytes, gran, 0, 0), "cuMemAddressReserve"))
        self._handle: Any = None
        self.restore()
        _regions.add(self)

    def _current(self) -> None:
        # The SDK calls release/restore from its own thread, which has no current context yet.
        vmm.ok(vmm.driver().cuCtxSetCurrent(self._ctx), "cuCtxSetCurrent")

    @property
    def mapped(self) -> bool:
        return self._handle is not None

    def restore(self) -> None:
        """Back the reserved range with fresh device memory, zeroed (stale contents must not leak into use)."""
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
        try:
            vmm.ok(d.cuMemsetD8(self.ptr, 0, self.nbytes), "cuMemsetD8")
            vmm.ok(d.cuCtxSynchronize(), "cuCtxSynchronize")
        except BaseException:
            d.cuMemUnmap(self.ptr, self.nbytes)
            d.cuMemRelease(handle)
            raise
        self._handle = handle

    def release(self) -> None:
        """Give the memory back to the driver; the address range stays reserved for restore()."""
        if not self.mapped:
            return
        d = vmm.driver()
        self._current()
        vmm.ok(d.cuCtxSynchronize(), "cuCtxSynchronize")
        vmm.ok(d.cuMemUnmap(self.ptr, self.nbytes), "cuMemUnmap")
        vmm.ok(d.cuMemRelease(self._handle), "cuMemRelease")
        self._handle = None

    def tensor(self, torch: Any) -> Any:
        """A torch uint8 tensor over the region (no copy); valid whenever the region is mapped."""
        return vmm.uint8_tensor(torch, self.ptr, self.nbytes, self.device)
