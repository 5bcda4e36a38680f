"""The GPU kernel that unpacks a bf16pack piece in one launch, compiled once per process with NVRTC.

bf16pack.unpack does the same with a dozen torch operations per piece; with eight reader threads the Python
overhead of issuing them held a restore's reads to ~10 GB/s, half of what the page cache delivers
(docs/benchmarks.md). The kernel is compiled and loaded when a region is first saved, so it is part of the
CUDA state the checkpoint keeps, and a restored replica launches it without compiling anything.
Where NVRTC or the driver cannot build it, get() says so once and returns None: callers unpack with torch.
"""

from __future__ import annotations

import ctypes
import sys
import threading
from typing import Any

from warmstart.gpumem import bf16pack, vmm

_SOURCE = rb"""
// One thread per output word: two bf16 values from two low bytes and one byte of two 4-bit codes.
extern "C" __global__ void unpack_words(const unsigned short* low, const unsigned char* codes,
                                        unsigned int* out, unsigned long long words, unsigned int base) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < words;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        unsigned int lo = low[i], c = codes[i];
        unsigned int c0 = c & 15u, c1 = c >> 4;
        unsigned int h0 = c0 + 15u * (c0 & 8u) + base, h1 = c1 + 15u * (c1 & 8u) + base;
        out[i] = (lo & 0xFFu) | (h0 << 8) | ((lo >> 8) << 16) | (h1 << 24);
    }
}

extern "C" __global__ void put_escapes(const int* at, const unsigned char* high, unsigned char* out,
                                       unsigned int count) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < count) out[2ull * at[i] + 1] = high[i];
}
"""
_THREADS = 256
_lock = threading.Lock()
_kernels: dict[int, Kernel | None] = {}


class Kernel:
    def __init__(self, module: Any, words: Any, escapes: Any) -> None:
        self.module, self.words, self.escapes = module, words, escapes

    def unpack(self, packed_ptr: int, piece_ptr: int, nbytes: int, plan: bf16pack.Plan, stream: Any) -> None:
        """Enqueue on stream: fill nbytes at piece_ptr from the packed piece at packed_ptr."""
        d = vmm.driver()
        words = nbytes // 4
        blocks = min(-(-words // _THREADS), 4096)
        args = ((packed_ptr, packed_ptr + nbytes // 2, piece_ptr, words, plan.base),
                (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_ulonglong, ctypes.c_uint))
        vmm.ok(d.cuLaunchKernel(self.words, blocks, 1, 1, _THREADS, 1, 1, 0, stream, args, 0), "cuLaunchKernel")
        if plan.escapes:
            at = packed_ptr + 3 * nbytes // 4
            escape_args = ((at, at + 4 * plan.escapes, piece_ptr, plan.escapes),
                           (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint))
            vmm.ok(d.cuLaunchKernel(self.escapes, -(-plan.escapes // _THREADS), 1, 1, _THREADS, 1, 1, 0, stream,
                                    escape_args, 0), "cuLaunchKernel")


def get(device: int) -> Kernel | None:
    """The kernel, loaded into the device's primary context (current on the calling thread); None if it
    cannot be built here."""
    with _lock:
        if device not in _kernels:
            try:
                _kernels[device] = _build(device)
            except Exception as e:  # noqa: BLE001 - an optional speed-up: any failure means torch does the work
                print(f"warmstart: the bf16 unpack kernel could not be built ({type(e).__name__}: {e}); packed GPU "
                      "regions are unpacked with torch instead, about half as fast", file=sys.stderr, flush=True)
                _kernels[device] = None
        return _kernels[device]


def _build(device: int) -> Kernel:
    from cuda.bindings import nvrtc

    d = vmm.driver()
    dev = vmm.ok(d.cuDeviceGet(device), "cuDeviceGet")
    major = vmm.ok(d.cuDeviceGetAttribute(d.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev),
                   "cuDeviceGetAttribute")
    minor = vmm.ok(d.cuDeviceGetAttribute(d.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev),
                   "cuDeviceGetAttribute")

    def check(result: Any, what: str) -> Any:
        err, *rest = result
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise RuntimeError(f"{what} failed: {getattr(err, 'name', err)}")
        return rest[0] if rest else None

    prog = check(nvrtc.nvrtcCreateProgram(_SOURCE, b"bf16pack.cu", 0, [], []), "nvrtcCreateProgram")
    try:
        opts = [f"--gpu-architecture=sm_{major}{minor}".encode()]
        err, = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            log = b" " * check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
            check(nvrtc.nvrtcGetProgramLog(prog, log), "nvrtcGetProgramLog")
            raise RuntimeError(f"nvrtcCompileProgram failed: {log.decode(errors='replace').strip()}")
        size = check(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
        cubin = b" " * size
        check(nvrtc.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    module = vmm.ok(d.cuModuleLoadData(cubin), "cuModuleLoadData")
    return Kernel(module, vmm.ok(d.cuModuleGetFunction(module, b"unpack_words"), "cuModuleGetFunction"),
                  vmm.ok(d.cuModuleGetFunction(module, b"put_escapes"), "cuModuleGetFunction"))
