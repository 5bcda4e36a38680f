"""The live suite's plain worker (no SDK: a pod's worker is checkpointed as a plain process unless an engine
adapter quiesces it), mounted into pods from a ConfigMap with tests/workers/text_server.py, so any image with
Python runs it.

    python3 worker.py PORT MIB

It holds MIB MiB of incompressible private memory, so that its checkpoint and restore take long enough to
be interrupted. GET answers "<now> <boot> <pid> <digest>" on every address: its monotonic clock (it advances
while the process runs), when it started, its pid and a digest of the memory it filled. A restored replica
answers with the source's boot, pid and digest.
"""

import hashlib
import mmap
import os
import random
import sys
import time

from text_server import serve

mib = int(sys.argv[2])
mem = mmap.mmap(-1, max(mib, 1) << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
rng = random.Random(mib)
for i in range(mib):
    mem[i << 20:(i + 1) << 20] = rng.randbytes(1 << 20)
digest = hashlib.sha256(mem).hexdigest()[:16]
boot = time.time_ns()
serve(int(sys.argv[1]), lambda: f"{time.monotonic_ns()} {boot} {os.getpid()} {digest}", host="0.0.0.0")
