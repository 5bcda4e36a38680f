"""Sealing CRIU's large pages images while CRIU still writes them, on the cores its dump leaves idle.

CRIU's dump writes each process's pages image front to back, and the worker is frozen meanwhile: its cores
are free. While the dump runs, these threads (one per core) seal each piece of a pages image of MIN_BYTES or
more in place (image/inplace.py) as soon as a byte past the piece is written, so that after the dump only the
last pieces are left (`InPlace.finish`). The planner's samples are then read through the seal
(`InPlace.read`); where it chooses to compress an image or drop its zero pages, the seal is undone first
(`InPlace.unseal`).

Sealing an image the planner then compresses costs a pass to undo, and competes with CRIU for nothing (on the
H200, an SDK worker's 1.4 GB image: 0.4 s more checkpoint). So each piece is sampled first, as the planner
samples (zlib's ratio and rates), and while the pieces so far say the image would be compressed, they are left
for after the dump. A CUDA process's image, whose first pieces are its compressible heap and the rest its
weights, is sealed again from the pieces where the weights take over the estimate.

The checkpoint uses it unless a transform is forced on (WARMSTART_COMPRESS=1, WARMSTART_ZERO_PAGES=1), or
WARMSTART_SEAL_BEHIND=0.
"""

from __future__ import annotations

import os
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from warmstart.artifact.encryption import ImageKey
from warmstart.artifact.store import TREE_CHUNK
from warmstart.image import plan as planning
from warmstart.image.codec import CHUNK, CHUNK_WORTH, MIN_BYTES
from warmstart.image.inplace import InPlace

_POLL_S = 0.02
_SAMPLE = 16384  # bytes of each of a piece's four samples


@dataclass
class Guess:
    """What the planner will likely decide about compressing one image, from four samples of each piece so far."""

    raw: int = 0
    stored: float = 0.0
    sampled: int = 0
    zlib_s: float = 0.0
    inflate_s: float = 0.0

    def add(self, sample: bytes, piece: int) -> None:
        t0 = time.perf_counter()
        z = zlib.compress(sample, 1)
        t1 = time.perf_counter()
        zlib.decompress(z)
        t2 = time.perf_counter()
        ratio = len(z) / max(1, len(sample))
        self.raw += piece
        self.stored += piece * (ratio if ratio <= CHUNK_WORTH else 1.0)
        self.sampled, self.zlib_s, self.inflate_s = self.sampled + len(sample), self.zlib_s + t1 - t0, \
            self.inflate_s + t2 - t1

    def compresses(self, host: planning.Host) -> bool:
        mb = self.sampled / 1e6
        s = planning.Samples(self.raw, int(self.stored), mb / max(self.zlib_s, 1e-9), mb / max(self.inflate_s, 1e-9))
        return planning.compression("", s, host, sealing=True).applied


class Behind:
    """Threads sealing the pages images of `images` while CRIU writes them, from `start` to `stop`."""

    def __init__(self, images: Path, key: ImageKey, threads: int, stop: Callable[[], None]) -> None:
        self.images, self.key, self.stop_check = images, key, stop
        self.files: dict[str, InPlace] = {}
        self.guesses: dict[str, Guess] = {}
        self.host = planning.host()
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.threads = [threading.Thread(target=self._run, name=f"seal-behind-{i}", daemon=True)
                        for i in range(max(1, threads))]

    def start(self) -> Behind:
        for t in self.threads:
            t.start()
        return self

    def stop(self) -> dict[str, InPlace]:
        """Once CRIU is done: the images begun, by name, with no piece being sealed any more. Raises what
        stopped a thread (the images are then closed)."""
        self.done.set()
        for t in self.threads:
            t.join()
        if self.error:
            self.close()
            raise self.error
        return dict(self.files)

    def abandon(self) -> None:
        """Stop the threads and close the images, whatever stopped them."""
        self.done.set()
        for t in self.threads:
            t.join()
        self.close()

    def close(self) -> None:
        for f in self.files.values():
            f.close()

    def _run(self) -> None:
        try:
            while not self.done.is_set():
                work = self._next()
                if work is None:
                    self.done.wait(_POLL_S)
                    continue
                if not self._would_compress(*work):
                    work[0].seal_piece(work[1], self.stop_check)
        except BaseException as e:  # noqa: BLE001 - handed to the dump step by `stop`
            self.error = e
            self.done.set()

    def _would_compress(self, f: InPlace, k: int) -> bool:
        """Sample piece k (still as CRIU wrote it) into its image's guess: whether to leave it unsealed."""
        step = TREE_CHUNK // 4
        sample = b"".join(os.pread(f.fd, _SAMPLE, k * TREE_CHUNK + i * step) for i in range(4))
        with self.lock:
            guess = self.guesses.setdefault(f.path.name, Guess())
            guess.add(sample, TREE_CHUNK)
            return guess.compresses(self.host)

    def _next(self) -> tuple[InPlace, int] | None:
        with self.lock:
            for entry in os.scandir(self.images):
                name = entry.name
                if not (name.startswith("pages-") and name.endswith(".img")) or entry.is_symlink():
                    continue
                f = self.files.get(name)
                if f is None:
                    if entry.stat(follow_symlinks=False).st_size < MIN_BYTES:
                        continue
                    f = self.files[name] = InPlace(Path(entry.path), self.key, CHUNK)
                k = f.next_piece()
                if k is not None:
                    return f, k
        return None
