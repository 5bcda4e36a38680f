"""Sealing a large pages image where CRIU wrote it, instead of writing a sealed copy beside it, and while CRIU
is still writing it (image/behind.py).

A sealed copy (image/codec.py's NAME.sealed) is a second file as large as the image: on a host that writes
new pages slowly (the 2-core VM: 240-450 MB/s for memory it has not touched before) it cost the checkpoint as
much as CRIU's own dump. AES-GCM keeps a chunk's length, so each chunk's ciphertext can go back over its
plaintext, into pages the page cache already holds; only the tags and a trailer are new.

Format (SEALED_MAGIC3), for a raw image of R bytes in C-byte chunks: chunk i's ciphertext at i * C, in place;
then the chunks' 16-byte tags, in order; then the trailer: magic, R (u64), C (u32), the number of chunks
(u32), an 8-byte nonce prefix. Chunk i is sealed with nonce prefix + i; its associated data is the magic, C,
the prefix, the raw image's name and a flag, 1 for the last chunk only, which also takes R and the count. So a
chunk is sealed without knowing how large the image will grow, and still none can be moved, dropped, renamed
or cut off unseen: a shorter file's last chunk was not sealed as the last. SEALED_MAGIC2 files, from before,
bound the whole trailer into every chunk; they are still read. Nothing is compressed: the planner
(image/plan.py) chose not to, or the copy is written instead.

The manifest's checksum is taken as the chunks are sealed: pieces of TREE_CHUNK hold whole chunks, so the
thread that seals a piece hashes the ciphertext it wrote without reading it back.
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from warmstart.artifact.encryption import ImageKey
from warmstart.artifact.store import TREE_CHUNK, chunk_size_for, digest_range
from warmstart.errors import ImageError

SEALED_MAGIC2 = b"WSSEAL02"
SEALED_MAGIC3 = b"WSSEAL03"
TRAILER = struct.Struct("<8sQII8s")
TAG = 16
_PIECE = 256 << 10  # sealed a piece at a time, in a buffer that stays in the core's cache
_SPARE = 15  # room `update_into` asks for beyond the piece


def trailer(raw: int, chunk: int, prefix: bytes) -> bytes:
    return TRAILER.pack(SEALED_MAGIC3, raw, chunk, -(-raw // chunk), prefix)


def chunk_aad(magic: bytes, raw: int, chunk: int, prefix: bytes, name: str) -> tuple[bytes, bytes]:
    """(every chunk's associated data but the last's, the last's) for a file sealed in place."""
    if magic == SEALED_MAGIC2:
        whole = TRAILER.pack(magic, raw, chunk, -(-raw // chunk), prefix) + name.encode()
        return whole, whole
    base = magic + struct.pack("<I", chunk) + prefix + name.encode()
    return base + b"\0", base + b"\1" + struct.pack("<QI", raw, -(-raw // chunk))


def read_trailer(fd: int, name: str) -> tuple[bytes, int, int, int, bytes] | None:
    """(magic, raw size, chunk size, chunks, nonce prefix) of a file sealed in place, None for any other file;
    raises where the trailer does not fit the file."""
    size = os.fstat(fd).st_size
    if size < TRAILER.size:
        return None
    magic, raw, chunk, count, prefix = TRAILER.unpack(os.pread(fd, TRAILER.size, size - TRAILER.size))
    if magic not in (SEALED_MAGIC2, SEALED_MAGIC3):
        return None
    if chunk < 4096 or count != -(-raw // chunk) or count > 1 << 26 or size != raw + TAG * count + TRAILER.size:
        raise ImageError(f"{name}: its trailer does not fit the file (truncated or tampered)")
    return magic, raw, chunk, count, prefix


class InPlace:
    """One pages image sealed where it lies, a TREE_CHUNK piece at a time: while CRIU writes it, each piece
    that a later byte shows complete (`next_piece`, `seal_piece`), then the rest (`finish`). Until `finish`,
    `read` gives its plaintext back (for the planner's samples) and `unseal` undoes it."""

    def __init__(self, path: Path, key: ImageKey, chunk: int) -> None:
        self.path, self.key, self.chunk = path, key, chunk
        self.fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        self.prefix = os.urandom(8)
        self.per_piece = TREE_CHUNK // chunk
        self.raw: int | None = None  # the final size, known once CRIU is done
        self.handed = 0  # pieces 0 .. handed-1 are sealed or being sealed
        self.sealed: set[int] = set()
        self.tags: dict[int, bytes] = {}
        self.digests: dict[int, bytes] = {}
        self.last_hash: hashlib._Hash | None = None
        self.lock = threading.Lock()

    def next_piece(self) -> int | None:
        """A piece to seal while CRIU still writes: one that a byte past its end shows complete (so none of its
        chunks is the last), or None."""
        with self.lock:
            if (self.handed + 1) * TREE_CHUNK >= os.fstat(self.fd).st_size:
                return None
            self.handed += 1
            return self.handed - 1

    def seal_piece(self, k: int, stop: Callable[[], None]) -> None:
        raw = self.raw
        size = raw if raw is not None else (k + 1) * TREE_CHUNK + 1
        count = -(-size // self.chunk)
        aad, last_aad = chunk_aad(SEALED_MAGIC3, size, self.chunk, self.prefix, self.path.name)
        h = hashlib.sha256()
        # One small buffer per piece, reused: a chunk goes through it a piece at a time, which AES, the hash and
        # the write then find in the core's cache (docs/benchmarks.md: a fresh 4 MiB buffer per chunk cost the
        # 2-core VM 6.0 s, one reused 3.5 s).
        buf = memoryview(bytearray(_PIECE + _SPARE))
        for i in range(k * self.per_piece, min(count, (k + 1) * self.per_piece)):
            stop()
            last = raw is not None and i == count - 1
            ctx = self.key.sealer(self._nonce(i), last_aad if last else aad)
            at, end = i * self.chunk, min(size, (i + 1) * self.chunk)
            while at < end:
                n = os.preadv(self.fd, [buf[:min(_PIECE, end - at)]], at)
                if n <= 0:
                    raise ImageError(f"{self.path.name} got shorter while it was being sealed")
                ctx.update_into(buf[:n], buf[:n + _SPARE])  # in place
                os.pwrite(self.fd, buf[:n], at)
                h.update(buf[:n])
                at += n
            ctx.finalize()
            self.tags[i] = ctx.tag
        with self.lock:
            self.sealed.add(k)
            if (k + 1) * TREE_CHUNK <= size:
                self.digests[k] = h.digest()
            else:
                self.last_hash = h  # the tags and the trailer follow it in the file's last piece

    def read(self, n: int, at: int) -> bytes:
        """`n` bytes of the raw image from `at`, as CRIU wrote them (while no piece is being sealed)."""
        parts = []
        while n > 0:
            i, off = divmod(at, self.chunk)
            data = os.pread(self.fd, min(n, self.chunk - off), at)
            if not data:
                break
            if i // self.per_piece in self.sealed:
                skip = off % 16
                data = self.key.unmasker(self._nonce(i), off - skip).update(bytes(skip) + data)[skip:]
            parts.append(data)
            n, at = n - len(data), at + len(data)
        return b"".join(parts)

    def unseal(self, threads: int) -> None:
        """Put back the plaintext of every piece sealed so far, and close: the image is CRIU's again."""
        def one(k: int) -> None:
            buf = memoryview(bytearray(_PIECE))
            end = min(os.fstat(self.fd).st_size, (k + 1) * TREE_CHUNK)
            for i in range(k * self.per_piece, -(-end // self.chunk)):
                u = self.key.unmasker(self._nonce(i), 0)
                at, stop_at = i * self.chunk, min(end, (i + 1) * self.chunk)
                while at < stop_at:
                    n = os.preadv(self.fd, [buf[:min(_PIECE, stop_at - at)]], at)
                    u.update_into(buf[:n], buf[:n])
                    os.pwrite(self.fd, buf[:n], at)
                    at += n

        try:
            with ThreadPoolExecutor(max(1, threads)) as pool:
                list(pool.map(one, sorted(self.sealed)))
        finally:
            self.close()

    def finish(self, out: Path, threads: int, stop: Callable[[], None]) -> str:
        """Seal what is left, write the tags and the trailer, rename the file to `out`; its checksum
        (store.checksum's)."""
        try:
            raw = self.raw = os.fstat(self.fd).st_size
            count, pieces = -(-raw // self.chunk), -(-raw // TREE_CHUNK)
            with ThreadPoolExecutor(max(1, threads)) as pool:
                list(pool.map(lambda k: self.seal_piece(k, stop), [k for k in range(pieces) if k not in self.sealed]))
            tail = b"".join(self.tags[i] for i in range(count)) + trailer(raw, self.chunk, self.prefix)
            os.pwrite(self.fd, tail, raw)
        finally:
            self.close()
        os.rename(self.path, out)
        if not chunk_size_for(raw + len(tail)):
            return digest_range(out, 0, None, stop).hex()
        return self._tree_digest(raw, tail)

    def _tree_digest(self, raw: int, tail: bytes) -> str:
        """store.checksum's tree of TREE_CHUNK pieces, from the digests taken while sealing and the tags and
        trailer still in memory: nothing is read back."""
        pieces = [self.digests[k] for k in range(raw // TREE_CHUNK)]
        at = 0
        if raw % TREE_CHUNK:
            assert self.last_hash is not None
            at = min(len(tail), TREE_CHUNK - raw % TREE_CHUNK)
            self.last_hash.update(tail[:at])
            pieces.append(self.last_hash.digest())
        pieces += [hashlib.sha256(tail[i:i + TREE_CHUNK]).digest() for i in range(at, len(tail), TREE_CHUNK)]
        return hashlib.sha256(b"".join(pieces)).hexdigest()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _nonce(self, i: int) -> bytes:
        return self.prefix + struct.pack("<I", i)


def seal(path: Path, out: Path, key: ImageKey, chunk: int, threads: int, stop: Callable[[], None]) -> str:
    """Seal `path` in place and rename it to `out`; returns the sealed file's checksum (store.checksum's)."""
    return InPlace(path, key, chunk).finish(out, threads, stop)

