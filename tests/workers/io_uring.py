"""Try io_uring_setup; print the outcome; with 'hold', keep the ring open and wait (to be checkpointed)."""

import ctypes
import sys
import time

libc = ctypes.CDLL(None, use_errno=True)
params = ctypes.create_string_buffer(120)  # struct io_uring_params
fd = libc.syscall(425, 4, params)  # io_uring_setup(entries=4, params)
print("io_uring_setup", fd if fd >= 0 else f"errno={ctypes.get_errno()}", flush=True)
if len(sys.argv) > 1 and sys.argv[1] == "hold":
    time.sleep(3600)
