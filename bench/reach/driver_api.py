"""A CUDA program on the driver API alone (cuda-bindings; no PyTorch), for bench/nosdk.py.

    python bench/reach/driver_api.py PORT MIB

Fills MIB MiB of device memory, one value per MiB, then serves 127.0.0.1:PORT: each connection gets
"SHA256 COUNT\n", the digest of the whole buffer copied back and a counter kept in device memory that every
request increments. A restored copy must answer the same digest and the next count.
"""

from __future__ import annotations

import ctypes
import hashlib
import socket
import sys
from typing import Any

from cuda.bindings import driver as cu


def ok(ret: Any) -> Any:
    err, *rest = ret if isinstance(ret, tuple) else (ret,)
    if err != cu.CUresult.CUDA_SUCCESS:
        raise SystemExit(f"CUDA driver call failed: {err}")
    return rest[0] if len(rest) == 1 else rest


def main() -> None:
    port, mib = int(sys.argv[1]), int(sys.argv[2])
    ok(cu.cuInit(0))
    dev = ok(cu.cuDeviceGet(0))
    ctx = ok(cu.cuDevicePrimaryCtxRetain(dev))
    ok(cu.cuCtxSetCurrent(ctx))
    buf = ok(cu.cuMemAlloc(mib << 20))
    counter = ok(cu.cuMemAlloc(4))
    for i in range(mib):
        ok(cu.cuMemsetD32(int(buf) + (i << 20), 0x9E3779B9 * (i + 1) & 0xFFFFFFFF, 1 << 18))
    ok(cu.cuMemsetD32(counter, 0, 1))
    host, word = bytearray(mib << 20), bytearray(4)
    host_p = ctypes.addressof((ctypes.c_char * len(host)).from_buffer(host))
    word_p = ctypes.addressof((ctypes.c_char * 4).from_buffer(word))
    srv = socket.create_server(("127.0.0.1", port))
    print(f"serving on {port} ({mib} MiB)", flush=True)
    while True:
        conn, _ = srv.accept()
        with conn:
            ok(cu.cuMemcpyDtoH(host_p, buf, len(host)))
            ok(cu.cuMemcpyDtoH(word_p, counter, 4))
            count = int.from_bytes(word, "little") + 1
            word[:] = count.to_bytes(4, "little")
            ok(cu.cuMemcpyHtoD(counter, word_p, 4))
            conn.sendall(f"{hashlib.sha256(host).hexdigest()} {count}\n".encode())


if __name__ == "__main__":
    main()
