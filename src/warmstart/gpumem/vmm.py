"""CUDA virtual memory management, the few calls warmstart's regions and weights share (cuda-bindings)."""

from __future__ import annotations

from typing import Any


def driver() -> Any:
    from cuda.bindings import driver as d

    return d


def ok(result: Any, what: str) -> Any:
    """The call's value; a RuntimeError naming the call and the CUresult when it failed."""
    d = driver()
    err, *rest = result if isinstance(result, tuple) else (result,)
    if err != d.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"{what} failed: {getattr(err, 'name', err)}")
    return rest[0] if len(rest) == 1 else rest


def primary_context(device: int) -> Any:
    d = driver()
    ok(d.cuInit(0), "cuInit")
    ctx = ok(d.cuDevicePrimaryCtxRetain(ok(d.cuDeviceGet(device), "cuDeviceGet")), "cuDevicePrimaryCtxRetain")
    ok(d.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    return ctx


def device_memory(device: int, exportable: bool = False) -> tuple[Any, int]:
    """(allocation properties for device memory, its recommended granularity)."""
    d = driver()
    prop = d.CUmemAllocationProp()
    prop.type = d.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    prop.location.type = d.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    prop.location.id = device
    if exportable:
        prop.requestedHandleTypes = d.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
    recommended = d.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_RECOMMENDED
    gran = int(ok(d.cuMemGetAllocationGranularity(prop, recommended), "cuMemGetAllocationGranularity"))
    return prop, gran


def device_location(device: int) -> Any:
    """A CUmemLocation of its own (one read off an allocation-properties struct dies with that struct)."""
    d = driver()
    loc = d.CUmemLocation()
    loc.type = d.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    loc.id = device
    return loc


def map_rw(ptr: int, size: int, handle: Any, location: Any) -> None:
    """Map handle at ptr and make it readable and writable from the device; undo the map on failure."""
    d = driver()
    ok(d.cuMemMap(ptr, size, 0, handle, 0), "cuMemMap")
    try:
        access = d.CUmemAccessDesc()
        access.location = location
        access.flags = d.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        ok(d.cuMemSetAccess(ptr, size, [access], 1), "cuMemSetAccess")
    except BaseException:
        d.cuMemUnmap(ptr, size)
        raise


def uint8_tensor(torch: Any, ptr: int, size: int, device: int) -> Any:
    """A torch uint8 tensor over device memory at ptr (no copy, no ownership)."""

    class _Cai:
        __cuda_array_interface__ = {"shape": (size,), "typestr": "|u1", "data": (ptr, False),
                                    "version": 3, "strides": None, "stream": None}

    return torch.as_tensor(_Cai(), device=f"cuda:{device}")
