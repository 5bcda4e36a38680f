"""Two processes sharing named POSIX shared memory and a multiprocessing lock, as engines' processes do.

The parent serves HTTP; each GET asks the child (through the lock-guarded segment) to add 1 to a counter
that lives only in /dev/shm, and answers the counter and the segment's name.
"""

import multiprocessing as mp
import sys
import time
from multiprocessing import shared_memory

from text_server import serve


def child(name: str, lock) -> None:
    seg = shared_memory.SharedMemory(name=name)
    while True:
        with lock:
            if seg.buf[0] == 1:  # a request: add one to the counter in bytes 8..16
                n = int.from_bytes(seg.buf[8:16], "little") + 1
                seg.buf[8:16] = n.to_bytes(8, "little")
                seg.buf[0] = 2
        time.sleep(0.001)


def main() -> None:
    ctx = mp.get_context("fork")
    seg = shared_memory.SharedMemory(create=True, size=64 << 20)  # mostly holes: the artifact stores it sparse
    seg.buf[8:16] = (1000).to_bytes(8, "little")
    # A "spawn" lock keeps its /dev/shm name linked (the resource tracker removes it at exit), as in vLLM:
    # the process maps it under the temporary name glibc removed, so CRIU needs a link_remap for it.
    lock = mp.get_context("spawn").Lock()
    ctx.Process(target=child, args=(seg.name, lock), daemon=True).start()

    def count() -> str:
        with lock:
            seg.buf[0] = 1
        while True:
            with lock:
                if seg.buf[0] == 2:
                    n = int.from_bytes(seg.buf[8:16], "little")
                    seg.buf[0] = 0
                    return f"{n} {seg.name}"
            time.sleep(0.001)

    serve(int(sys.argv[1]), count)


if __name__ == "__main__":
    main()
