"""Shrink the CUDA context's local-memory reservation while a worker is quiesced.

The driver reserves local memory (thread stacks, register spills) for every thread the GPU can run at once:
on an H100 the default 1 KiB stack takes ~270 MB of GPU memory per context, all of it copied by the CUDA
checkpoint although none of it holds state between kernels. On quiesce the SDK lowers the stack limit (the
driver frees the reservation); on resume it sets the old limit back (the driver reserves it again, and it
grows by itself for any kernel that needs more).
"""

from __future__ import annotations

import sys
from typing import Any, NamedTuple

QUIESCED_STACK_BYTES = 16


class ShrunkStack(NamedTuple):
    """A context whose stack limit shrink() lowered, and the limit regrow() sets back."""

    dev: Any  # CUdevice
    ctx: Any  # CUcontext, retained until regrow() releases it
    old: int


def _cuda_in_use() -> bool:
    """True when this process already talks to the GPU: never initialise CUDA in a CPU worker."""
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_initialized():
                return True
        except Exception:
            pass
    return "cuda.bindings.driver" in sys.modules


def _active_contexts(d: Any) -> list[tuple[Any, Any]]:
    """(device, primary context) for every GPU whose primary context is active in this process."""
    if d.cuInit(0)[0] != d.CUresult.CUDA_SUCCESS:
        return []
    err, count = d.cuDeviceGetCount()
    out: list[tuple[Any, Any]] = []
    for i in range(count if err == d.CUresult.CUDA_SUCCESS else 0):
        err, dev = d.cuDeviceGet(i)
        err, _flags, active = d.cuDevicePrimaryCtxGetState(dev)
        if err == d.CUresult.CUDA_SUCCESS and active:
            err, ctx = d.cuDevicePrimaryCtxRetain(dev)
            if err == d.CUresult.CUDA_SUCCESS:
                out.append((dev, ctx))
    return out


def _set_stack(d: Any, ctx: Any, nbytes: int) -> None:
    err = d.cuCtxSetCurrent(ctx)[0]
    if err == d.CUresult.CUDA_SUCCESS:
        err = d.cuCtxSetLimit(d.CUlimit.CU_LIMIT_STACK_SIZE, nbytes)[0]
    if err != d.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"cuCtxSetLimit(CU_LIMIT_STACK_SIZE, {nbytes}) failed: {getattr(err, 'name', err)}")


def _stack_limit(d: Any, ctx: Any) -> int | None:
    """The context's stack limit in bytes; None where the driver does not say."""
    if d.cuCtxSetCurrent(ctx)[0] != d.CUresult.CUDA_SUCCESS:
        return None
    err, old = d.cuCtxGetLimit(d.CUlimit.CU_LIMIT_STACK_SIZE)
    return int(old) if err == d.CUresult.CUDA_SUCCESS else None


def shrink() -> list[ShrunkStack]:
    """Lower every active context's stack limit; returns what regrow() needs to undo it."""
    if not _cuda_in_use():
        return []
    try:
        from cuda.bindings import driver as d
    except ImportError:  # a CUDA worker without cuda-bindings: its checkpoint keeps the reservation
        return []
    saved: list[ShrunkStack] = []
    for dev, ctx in _active_contexts(d):
        old = _stack_limit(d, ctx)
        if old is None or old <= QUIESCED_STACK_BYTES:
            d.cuDevicePrimaryCtxRelease(dev)
            continue
        d.cuCtxSynchronize()
        _set_stack(d, ctx, QUIESCED_STACK_BYTES)
        saved.append(ShrunkStack(dev, ctx, old))
    return saved


def regrow(saved: list[ShrunkStack]) -> None:
    """Set the stack limits shrink() lowered back to what they were."""
    if not saved:
        return
    from cuda.bindings import driver as d

    for dev, ctx, old in saved:
        _set_stack(d, ctx, old)
        d.cuDevicePrimaryCtxRelease(dev)
