"""A plain process holding MiB of private memory (argv[2]) filled from a seed; GET answers its SHA-256.

With a file path (argv[3]), it also maps that file privately and writes zeros over some of its pages: those
zeros are the process's own, and must come back as zeros, not as the file's bytes."""

import hashlib
import mmap
import os
import sys

from text_server import serve

mib = int(sys.argv[2])
mem = mmap.mmap(-1, mib << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
block = hashlib.sha256(b"seed").digest() * (1 << 15)  # 1 MiB
for i in range(mib):
    mem[i << 20:(i + 1) << 20] = bytes([i & 255]) + block[1:]
# Pages never written stay out of the image; a few holes make the pages image's layout less regular.
for i in range(0, mib, 7):
    mem[(i << 20) + 4096:(i << 20) + 8192] = bytes(4096)
# Runs of written zeros, long enough to be taken out of the image (image/zeropages.py).
for i in range(0, mib, 5):
    mem[(i << 20) + (256 << 10):(i << 20) + (768 << 10)] = bytes(512 << 10)
regions = [mem]
if len(sys.argv) > 3:
    with open(sys.argv[3], "wb") as f:
        f.write(b"\xab" * (4 << 20))
    fd = os.open(sys.argv[3], os.O_RDONLY)
    private = mmap.mmap(fd, 4 << 20, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    private[1 << 20:3 << 20] = bytes(2 << 20)
    regions.append(private)


def digest() -> str:
    h = hashlib.sha256()
    for r in regions:
        h.update(r)
    return h.hexdigest()


first = digest()
serve(int(sys.argv[1]), lambda: f"{first} {digest()}")
