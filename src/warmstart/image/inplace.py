"""Sealing a large pages image where CRIU wrote it, instead of writing a sealed copy beside it.

A sealed copy (image/codec.py's NAME.sealed) is a second file as large as the image: on a host that writes
new pages slowly (the 2-core VM: 240-450 MB/s for memory it has not touched before) it cost the checkpoint as
much as CRIU's own dump. AES-GCM keeps a chunk's length, so each chunk's ciphertext can go back over its
plaintext, into pages the page cache already holds; only the tags and a trailer are new.

Format (SEALED_MAGIC2), for a raw image of R bytes in C-byte chunks: chunk i's ciphertext at i * C, in place;
then the chunks' 16-byte tags, in order; then the trailer: magic, R (u64), C (u32), the number of chunks
(u32), an 8-byte nonce prefix. Chunk i is sealed with nonce prefix + i and, as associated data, the trailer
and the raw image's name, so chunks cannot be moved, dropped or renamed unseen, as in the copied format.
Nothing is compressed: the planner (image/plan.py) chose not to, or the copy is written instead.

The manifest's checksum is taken as the chunks are sealed: pieces of TREE_CHUNK hold whole chunks, so each
worker thread hashes the ciphertext it wrote without reading it back.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from warmstart.artifact.encryption import ImageKey
from warmstart.artifact.store import TREE_CHUNK, chunk_size_for, digest_range
from warmstart.errors import ImageError

SEALED_MAGIC2 = b"WSSEAL02"
TRAILER = struct.Struct("<8sQII8s")
TAG = 16
_PIECE = 256 << 10  # sealed a piece at a time, in a buffer that stays in the core's cache
_SPARE = 15  # room `update_into` asks for beyond the piece


def trailer(raw: int, chunk: int, prefix: bytes) -> bytes:
    return TRAILER.pack(SEALED_MAGIC2, raw, chunk, -(-raw // chunk), prefix)


def read_trailer(fd: int, name: str) -> tuple[int, int, int, bytes, bytes] | None:
    """(raw size, chunk size, chunks, nonce prefix, the trailer's bytes) of a file sealed in place, None for
    any other file; raises where the trailer does not fit the file."""
    size = os.fstat(fd).st_size
    if size < TRAILER.size:
        return None
    tail = os.pread(fd, TRAILER.size, size - TRAILER.size)
    magic, raw, chunk, count, prefix = TRAILER.unpack(tail)
    if magic != SEALED_MAGIC2:
        return None
    if chunk < 4096 or count != -(-raw // chunk) or count > 1 << 26 or size != raw + TAG * count + TRAILER.size:
        raise ImageError(f"{name}: its trailer does not fit the file (truncated or tampered)")
    return raw, chunk, count, prefix, tail


def seal(path: Path, out: Path, key: ImageKey, chunk: int, threads: int, stop: Callable[[], None]) -> str:
    """Seal `path` in place and rename it to `out`; returns the sealed file's checksum (store.checksum's)."""
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    try:
        raw = os.fstat(fd).st_size
        prefix = os.urandom(8)
        tail = trailer(raw, chunk, prefix)
        aad = tail + path.name.encode()
        count = -(-raw // chunk)
        per_piece = TREE_CHUNK // chunk
        tags = bytearray(TAG * count)

        def piece(k: int) -> bytes:
            h = hashlib.sha256() if (k + 1) * TREE_CHUNK <= raw else None  # else _checksum reads it back
            # One small buffer per piece, reused: a chunk goes through it a piece at a time, which AES, the hash
            # and the write then find in the core's cache (docs/benchmarks.md: a fresh 4 MiB buffer per chunk
            # cost the 2-core VM 6.0 s, one reused 3.5 s).
            buf = memoryview(bytearray(_PIECE + _SPARE))
            for i in range(k * per_piece, min(count, (k + 1) * per_piece)):
                stop()
                ctx = key.sealer(prefix + struct.pack("<I", i), aad)
                at, end = i * chunk, min(raw, (i + 1) * chunk)
                while at < end:
                    n = os.preadv(fd, [buf[:min(_PIECE, end - at)]], at)
                    if n <= 0:
                        raise ImageError(f"{path.name} got shorter while it was being sealed")
                    ctx.update_into(buf[:n], buf[:n + _SPARE])  # in place
                    os.pwrite(fd, buf[:n], at)
                    if h:
                        h.update(buf[:n])
                    at += n
                ctx.finalize()
                tags[TAG * i:TAG * (i + 1)] = ctx.tag
            return h.digest() if h else b""

        with ThreadPoolExecutor(max(1, threads)) as pool:
            digests = list(pool.map(piece, range(-(-count // per_piece))))
        os.pwrite(fd, bytes(tags) + tail, raw)
        total = raw + len(tags) + len(tail)
    finally:
        os.close(fd)
    os.rename(path, out)
    return _checksum(out, total, raw, digests, stop)


def _checksum(out: Path, total: int, raw: int, digests: list[bytes], stop: Callable[[], None]) -> str:
    """The whole file's checksum from the pieces' digests: those that end inside the ciphertext are the threads';
    the last, which holds the tags and the trailer, is read back (at most TREE_CHUNK bytes)."""
    if not chunk_size_for(total):
        return digest_range(out, 0, None, stop).hex()
    whole = raw // TREE_CHUNK  # pieces made only of ciphertext
    tail = [digest_range(out, at, TREE_CHUNK, stop) for at in range(whole * TREE_CHUNK, total, TREE_CHUNK)]
    return hashlib.sha256(b"".join(digests[:whole] + tail)).hexdigest()
