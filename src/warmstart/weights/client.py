"""Model weights mapped from warmstart's weight service instead of loaded by the worker.

    w = SharedWeights("/run/warmstart/weights.sock", files, device="cuda:0")  # or "cpu"
    model.load_state_dict(w.tensors(torch), assign=True)   # parameters alias the service's memory
    # quiesce: w.release()  -> unmapped; the address range stays reserved, so the checkpoint carries no weights
    # resume:  w.restore()  -> mapped again at the same address (tensors and CUDA graphs stay valid)

The weights are read-only to the worker. A worker checkpointed with SharedWeights is restored by asking the
service for the same content hash; a restore on a host whose files differ fails with a hash mismatch
instead of serving other weights. Needs cuda-bindings on GPU; stdlib only on CPU.
"""

from __future__ import annotations

import array
import ctypes
import json
import mmap
import os
import socket
import weakref
from typing import Any, Required, TypedDict

from warmstart import linux
from warmstart.gpumem import vmm
from warmstart.weights.layout import Layout

_all: weakref.WeakSet[SharedWeights] = weakref.WeakSet()


class HeldWeights(TypedDict):
    """One weight set a worker maps, as the SDK reports it on quiesce (the manifest's WeightsRef)."""

    socket: str
    files: list[str]
    hash: str
    bytes: int
    device: str


class Request(TypedDict, total=False):
    """A request to the weight service (warmstart.weights.service)."""

    op: Required[str]  # "get", "prefetch", "copy" or "status"
    files: list[str]
    hash: str  # the content hash the worker was checkpointed with: anything else is refused
    size: int  # "copy": bytes of the memory the worker sent


def held() -> list[HeldWeights]:
    """What this process maps from weight services (the SDK reports it on quiesce; the manifest keeps it)."""
    return [w.ref() for w in list(_all)]


def request(socket_path: str, req: Request, timeout_s: float = 600,
            send_fd: int | None = None) -> tuple[dict[str, Any], int | None]:
    """One request to the service: (its answer, the descriptor it sent or None). Raises on an error answer."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout_s)
    try:
        try:
            s.connect(socket_path)
        except OSError as e:
            raise ConnectionError(f"cannot reach the weight service at {socket_path} ({e.strerror}): "
                                  "start it with `warmstart weights serve`") from None
        data = (json.dumps(req) + "\n").encode()
        if send_fd is None:
            s.sendall(data)
        else:
            s.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [send_fd]))])
        buf = b""
        fds: list[int] = []
        while not buf.endswith(b"\n"):
            data, anc, _, _ = s.recvmsg(1 << 20, socket.CMSG_SPACE(4 * 4))
            if not data:
                raise ConnectionError(f"the weight service at {socket_path} closed the connection")
            buf += data
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
    finally:
        s.close()
    answer: dict[str, Any] = json.loads(buf)
    if not answer.get("ok"):
        for fd in fds:
            os.close(fd)
        raise RuntimeError(answer.get("error", "the weight service refused"))
    return answer, (fds[0] if fds else None)


class SharedWeights:
    def __init__(self, socket_path: str, files: list[str], device: str = "cpu") -> None:
        if device == "cuda":
            device = "cuda:0"
        self.socket_path, self.files, self.device = socket_path, [os.path.abspath(f) for f in files], device
        answer, fd = request(socket_path, {"op": "get", "files": self.files})
        self.hash: str = answer["hash"]
        self.layout = Layout.from_json(answer["layout"])
        if answer["device"] != device:
            raise RuntimeError(f"the weight service holds weights on {answer['device']}, this worker runs on {device}")
        self.size = self.layout.size
        self._mapped = False
        self._shared = True
        self.private_copy = False
        if device == "cpu":
            addr = linux.libc.mmap(None, self.size, linux.PROT_NONE,
                              mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | linux.MAP_NORESERVE, -1, 0)
            if addr in (None, linux.MAP_FAILED):
                raise OSError(ctypes.get_errno(), "reserving the weights' address range failed")
            self.ptr = int(addr)
        else:
            self._gpu_reserve()
        self._map(fd)
        _all.add(self)

    def ref(self) -> HeldWeights:
        return {"socket": self.socket_path, "files": self.files, "hash": self.hash, "bytes": self.size,
                "device": self.device}

    @property
    def mapped(self) -> bool:
        return self._mapped

    def tensors(self, torch: Any) -> dict[str, Any]:
        """Every tensor of the set, aliasing the mapped memory (no copy)."""
        return self.layout.views(self._blob(torch), torch)

    def release(self) -> None:
        """Unmap the weights (on quiesce); the address range stays reserved for restore()."""
        if not self._mapped:
            return
        if self.device == "cpu":
            addr = linux.libc.mmap(self.ptr, self.size, linux.PROT_NONE,
                              mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | linux.MAP_FIXED | linux.MAP_NORESERVE, -1, 0)
            if addr != self.ptr:
                raise OSError(ctypes.get_errno(), "unmapping the weights failed")
        else:
            self._gpu_unmap()
        self._mapped = False

    def restore(self) -> None:
        """Map the same weights (by content hash) again at the same address (on resume)."""
        if self._mapped:
            return
        _, fd = request(self.socket_path, {"op": "get", "files": self.files, "hash": self.hash})
        try:
            self._map(fd)
        except RuntimeError as e:
            if self.device == "cpu" or "cuMemImportFromShareableHandle" not in str(e):
                raise
            # A process restored by CRIU cannot import another process's GPU memory (driver 580), but it can
            # export its own: take a private copy, made by the service on the GPU.
            self._gpu_own_copy()
            self._mapped = True
        self.private_copy = not self._shared

    # ---- mapping ----

    def _map(self, fd: int | None) -> None:
        if fd is None:
            raise RuntimeError("the weight service sent no memory descriptor")
        try:
            if self.device == "cpu":
                addr = linux.libc.mmap(self.ptr, self.size, mmap.PROT_READ, mmap.MAP_SHARED | linux.MAP_FIXED, fd, 0)
                if addr != self.ptr:
                    raise OSError(ctypes.get_errno(), "mapping the weights failed")
            else:
                self._gpu_map(fd)
        finally:
            os.close(fd)
        self._mapped = True

    def _blob(self, torch: Any) -> Any:
        if self.device == "cpu":
            import warnings

            with warnings.catch_warnings():  # the mapping is read-only on purpose
                warnings.simplefilter("ignore")
                return torch.frombuffer((ctypes.c_char * self.size).from_address(self.ptr), dtype=torch.uint8)
        return vmm.uint8_tensor(torch, self.ptr, self.size, self._index)

    def _gpu_reserve(self) -> None:
        d = vmm.driver()
        self._index = int(self.device.split(":")[1])
        self._ctx = vmm.primary_context(self._index)
        _, gran = vmm.device_memory(self._index)
        self._location = vmm.device_location(self._index)
        self.size = -(-self.size // gran) * gran
        self.ptr = int(vmm.ok(d.cuMemAddressReserve(self.size, gran, 0, 0), "cuMemAddressReserve"))

    def _gpu_map(self, fd: int) -> None:
        d = vmm.driver()
        vmm.ok(d.cuCtxSetCurrent(self._ctx), "cuCtxSetCurrent")
        handle = vmm.ok(d.cuMemImportFromShareableHandle(
            fd, d.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR), "cuMemImportFromShareableHandle")
        try:
            vmm.map_rw(self.ptr, self.size, handle, self._location)
        except BaseException:
            d.cuMemRelease(handle)
            raise
        self._handle = handle
        self._shared = True

    def _gpu_own_copy(self) -> None:
        d = vmm.driver()
        vmm.ok(d.cuCtxSetCurrent(self._ctx), "cuCtxSetCurrent")
        prop, _ = vmm.device_memory(self._index, exportable=True)
        handle = vmm.ok(d.cuMemCreate(self.size, prop, 0), "cuMemCreate (is the GPU out of memory?)")
        try:
            vmm.map_rw(self.ptr, self.size, handle, self._location)
            fd = vmm.ok(d.cuMemExportToShareableHandle(
                handle, d.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0), "export")
            try:
                request(self.socket_path, {"op": "copy", "files": self.files, "hash": self.hash, "size": self.size},
                        send_fd=int(fd))
            finally:
                os.close(int(fd))
        except BaseException:
            d.cuMemUnmap(self.ptr, self.size)
            d.cuMemRelease(handle)
            raise
        self._handle = handle
        self._shared = False

    def _gpu_unmap(self) -> None:
        # Imported memory must be unmapped before a CUDA checkpoint: restoring a process that still maps
        # another process's memory fails (CUDA_ERROR_NOT_SUPPORTED) and leaves it stuck (FINDINGS.md).
        d = vmm.driver()
        vmm.ok(d.cuCtxSetCurrent(self._ctx), "cuCtxSetCurrent")
        vmm.ok(d.cuCtxSynchronize(), "cuCtxSynchronize")
        vmm.ok(d.cuMemUnmap(self.ptr, self.size), "cuMemUnmap")
        vmm.ok(d.cuMemRelease(self._handle), "cuMemRelease")
        self._handle = None
