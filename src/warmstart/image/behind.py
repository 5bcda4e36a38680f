"""Sealing CRIU's large pages images while CRIU still writes them, on the cores its dump leaves idle.

CRIU's dump writes each process's pages image front to back, and the worker is frozen meanwhile: its cores
are free. While the dump runs, these threads (one per core) seal each piece of a pages image of MIN_BYTES or
more in place (image/inplace.py) as soon as a byte past the piece is written, so that after the dump only the
last pieces are left (`InPlace.finish`). The planner's samples are then read through the seal
(`InPlace.read`); where it chooses to compress an image or drop its zero pages, the seal is undone first
(`InPlace.unseal`).

The checkpoint uses it unless a transform is forced on (WARMSTART_COMPRESS=1, WARMSTART_ZERO_PAGES=1), or
WARMSTART_SEAL_BEHIND=0.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

from warmstart.artifact.encryption import ImageKey
from warmstart.image.codec import CHUNK, MIN_BYTES
from warmstart.image.inplace import InPlace

_POLL_S = 0.02


class Behind:
    """Threads sealing the pages images of `images` while CRIU writes them, from `start` to `stop`."""

    def __init__(self, images: Path, key: ImageKey, threads: int, stop: Callable[[], None]) -> None:
        self.images, self.key, self.stop_check = images, key, stop
        self.files: dict[str, InPlace] = {}
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
                work[0].seal_piece(work[1], self.stop_check)
        except BaseException as e:  # noqa: BLE001 - handed to the dump step by `stop`
            self.error = e
            self.done.set()

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
