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

_regions: "weakref.WeakSet[GpuRegion]" = weakref.WeakSet()


def released_bytes() -> int:
    """GPU bytes this process's regions have released and will map again on resume."""
    return sum(r.nbytes for r in list(_regions) if not r.mapped)


def _driver() -> Any:
    from cuda.bindings import driver

    return driver


def _ok(result: Any, what: str) -> Any:
    d = _driver()
    err, *rest = result if isinstance(result, tuple) else (result,)
    if err != d.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"{what} failed: {getattr(err, 'name', err)}")
    return rest[0] if len(rest) == 1 else rest


class GpuRegion:
    def __init__(self, nbytes: int, device: int = 0) -> None:
        d = _driver()
        _ok(d.cuInit(0), "cuInit")
        self.device = device
        self._ctx = _ok(d.cuDevicePrimaryCtxRetain(_ok(d.cuDeviceGet(device), "cuDeviceGet")), "cuDevicePrimaryCtxRetain")
        self._current()
        prop = d.CUmemAllocationProp()
        prop.type = d.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = d.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = device
        self._prop = prop
        gran = int(_ok(d.cuMemGetAllocationGranularity(
            prop, d.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_RECOMMENDED), "granularity"))
        self.nbytes = -(-nbytes // gran) * gran
        self.ptr = int(_ok(d.cuMemAddressReserve(self.nbytes, gran, 0, 0), "cuMemAddressReserve"))
        self._handle: Any = None
        self.restore()
        _regions.add(self)

    def _current(self) -> None:
        # The SDK calls release/restore from its own thread, which has no current context yet.
        _ok(_driver().cuCtxSetCurrent(self._ctx), "cuCtxSetCurrent")

    @property
    def mapped(self) -> bool:
        return self._handle is not None

    def restore(self) -> None:
        """Back the reserved range with fresh device memory, zeroed (stale contents must not leak into use)."""
        if self.mapped:
            return
        d = _driver()
        self._current()
        handle = _ok(d.cuMemCreate(self.nbytes, self._prop, 0), "cuMemCreate (is the GPU out of memory?)")
        try:
            _ok(d.cuMemMap(self.ptr, self.nbytes, 0, handle, 0), "cuMemMap")
            access = d.CUmemAccessDesc()
            access.location = self._prop.location
            access.flags = d.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
            _ok(d.cuMemSetAccess(self.ptr, self.nbytes, [access], 1), "cuMemSetAccess")
            _ok(d.cuMemsetD8(self.ptr, 0, self.nbytes), "cuMemsetD8")
            _ok(d.cuCtxSynchronize(), "cuCtxSynchronize")
        except BaseException:
            d.cuMemUnmap(self.ptr, self.nbytes)
            d.cuMemRelease(handle)
            raise
        self._handle = handle

    def release(self) -> None:
        """Give the memory back to the driver; the address range stays reserved for restore()."""
        if not self.mapped:
            return
        d = _driver()
        self._current()
        _ok(d.cuCtxSynchronize(), "cuCtxSynchronize")
        _ok(d.cuMemUnmap(self.ptr, self.nbytes), "cuMemUnmap")
        _ok(d.cuMemRelease(self._handle), "cuMemRelease")
        self._handle = None

    def tensor(self, torch: Any) -> Any:
        """A torch uint8 tensor over the region (no copy); valid whenever the region is mapped."""
        region = self

        class _Cai:
            __cuda_array_interface__ = {"shape": (region.nbytes,), "typestr": "|u1", "data": (region.ptr, False),
                                        "version": 3, "strides": None, "stream": None}

        return torch.as_tensor(_Cai(), device=f"cuda:{self.device}")
