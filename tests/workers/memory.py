"""A plain process holding MiB of private memory (argv[2]) filled from a seed; GET answers its SHA-256."""

import hashlib
import mmap
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
digest = hashlib.sha256(mem).hexdigest()
serve(int(sys.argv[1]), lambda: f"{digest} {hashlib.sha256(mem).hexdigest()}")
