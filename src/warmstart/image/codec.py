"""CRIU's large pages images, stored compressed and inflated into memory for each restore.

Once its zero pages are out (image/zeropages.py), what is left of a CUDA worker's pages image still
compresses well: zlib at level 1 keeps a fifth of the 1.1B reference worker's 0.84 GB (the driver's copy of
GPU memory and the Python heap hold much that repeats). A cold restore waits on the disk, and inflating on
several cores is faster than reading the bytes saved. CRIU reads its images itself, so a restore inflates them
first, into memory (/dev/shm), and points CRIU at a directory there that also links the artifact's other files
(`Inflated`).

The checkpoint moves its raw images into a cache on disk (WARMSTART_IMAGE_CACHE, default
/var/cache/warmstart/images), named by the compressed file's checksum: while they are in the page cache, a
restore on the node that made the artifact links them instead of inflating, as fast as from an uncompressed
image. One that is not in the page cache is inflated rather than read: inflating costs less than reading 5
times the bytes. A restore that inflated an image copies it into the cache once CRIU has read it (in a
thread, while the worker resumes), so the next restore on that node links it too; it inflates into memory
first, since writing a disk file through a mapping ran several times slower. The cache keeps the newest
CACHE_KEEP images, and is used only while it belongs to this user and no one else can write to it.

What is worth compressing is decided from samples of each chunk before any chunk is compressed. A chunk is
compressed if its samples shrink to _CHUNK_WORTH or less: on these disks (1-1.6 GB/s), with inflating bounded
at ~5 GB/s, a chunk that keeps more costs a cold restore about as much to inflate as it saves in reading. An
image is stored compressed only if the samples say it shrinks to _WORTH or less; otherwise it stays as CRIU
wrote it. Every restore that inflates pays for it and holds the raw bytes in memory, and an image of bf16
weights (a CUDA process checkpointed without its worker's help) keeps 0.80 of its bytes under zlib, at ~24 MB/s
a core: minutes of checkpoint for an 8B model, for a fifth less to read.

Format of pages-N.img.z: MAGIC, the raw size (u64), the chunk size (u32), the number of chunks (u32), each
chunk's stored length (u32 each; a chunk stored at its raw length is stored raw), then the chunks. Chunks are
independent, so any number of threads compress and inflate them. The manifest checksums the stored file.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from warmstart.errors import ImageError

MAGIC = b"WSZPAGE1"
SUFFIX = ".z"
CHUNK = 4 << 20
MIN_BYTES = 32 << 20  # smaller pages images stay as CRIU wrote them: too little to gain
_WORTH = 0.5  # an image is stored compressed only if it shrinks to this fraction of its size or less
_CHUNK_WORTH = 0.7  # a chunk is compressed only if its samples shrink to this fraction or less
_SAMPLE = 16384  # bytes of each of a chunk's four samples
_HEAD = struct.Struct("<8sQII")


def compress(images: Path, threads: int, warn: Callable[[str], None], keep: Path | None = None) -> tuple[int, int]:
    """Compress each pages image of MIN_BYTES or more in place (pages-N.img -> pages-N.img.z) where that
    saves enough (module docstring); the raw image is moved into `keep` (for `cache_raw`) or removed. Returns
    (raw bytes, stored bytes) of those compressed. One that cannot be written (a full disk) stays raw, with a
    warning."""
    raw = stored = 0
    for p in sorted(images.glob("pages-*.img")):
        size = p.stat().st_size
        if size < MIN_BYTES:
            continue
        try:
            got = _compress_one(p, size, threads, keep)
        except OSError as e:
            warn(f"warning: {p.name} stays uncompressed ({e})")
            continue
        if got:
            raw, stored = raw + size, stored + got
    return raw, stored


def _compress_one(path: Path, size: int, threads: int, keep: Path | None) -> int:
    plan = _plan(path, size, threads)
    if plan is None:
        return 0
    count = len(plan)
    out = path.with_name(path.name + SUFFIX)
    tmp = path.with_name(path.name + SUFFIX + ".tmp")
    src = os.open(path, os.O_RDONLY)
    dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        def one(i: int) -> bytes:
            data = os.pread(src, CHUNK, i * CHUNK)
            if not plan[i]:
                return data
            z = zlib.compress(data, 1)  # releases the GIL: the threads compress side by side
            return z if len(z) < len(data) else data

        lengths: list[int] = []
        at = _HEAD.size + 4 * count
        with ThreadPoolExecutor(max(1, threads)) as pool:
            for start in range(0, count, 4 * threads):  # a window at a time: memory stays bounded
                for chunk in pool.map(one, range(start, min(count, start + 4 * threads))):
                    os.pwrite(dst, chunk, at)
                    at += len(chunk)
                    lengths.append(len(chunk))
        if at > size * _WORTH:  # the samples were wrong about this one
            os.unlink(tmp)
            return 0
        os.pwrite(dst, _HEAD.pack(MAGIC, size, CHUNK, count) + struct.pack(f"<{count}I", *lengths), 0)
        os.fsync(dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(src)
        os.close(dst)
    os.replace(tmp, out)
    if keep:
        keep.mkdir(exist_ok=True)
        os.replace(path, keep / path.name)
    else:
        path.unlink()
    return at


def _plan(path: Path, size: int, threads: int) -> list[bool] | None:
    """Which chunks to compress, from samples of each; None if the image would not shrink to _WORTH of its size."""
    lengths = [min(CHUNK, size - at) for at in range(0, size, CHUNK)]
    fd = os.open(path, os.O_RDONLY)
    try:
        with ThreadPoolExecutor(max(1, threads)) as pool:
            ratios = list(pool.map(lambda i: _sample_ratio(fd, i * CHUNK, lengths[i]), range(len(lengths))))
    finally:
        os.close(fd)
    plan = [r <= _CHUNK_WORTH for r in ratios]
    estimate = sum(n * r if z else n for n, r, z in zip(lengths, ratios, plan, strict=True))
    return plan if estimate <= _WORTH * size else None


def _sample_ratio(fd: int, offset: int, length: int) -> float:
    """What zlib keeps of four samples spread over one chunk: zlib is slow on what does not compress (tens of
    MB/s), so the whole chunk is compressed only when this says it pays."""
    step = max(1, length // 4)
    sample = b"".join(os.pread(fd, min(_SAMPLE, length - i), offset + i) for i in range(0, length, step))
    return len(zlib.compress(sample, 1)) / max(1, len(sample))


def compressed(images: Path) -> list[Path]:
    return sorted(images.glob("pages-*.img" + SUFFIX))


def _layout(fd: int, name: str) -> tuple[int, int, list[tuple[int, int]]]:
    """(raw size, chunk size, [(offset, stored length)]) of a compressed image, checked against its size."""
    head = os.pread(fd, _HEAD.size, 0)
    if len(head) < _HEAD.size:
        raise ImageError(f"{name}: too short for a compressed image")
    magic, raw, chunk, count = _HEAD.unpack(head)
    if magic != MAGIC or chunk < 4096 or count != -(-raw // chunk):
        raise ImageError(f"{name}: not a warmstart compressed image")
    table = os.pread(fd, 4 * count, _HEAD.size)
    if len(table) < 4 * count:
        raise ImageError(f"{name}: its chunk table is cut short")
    at, out = _HEAD.size + 4 * count, []
    for n in struct.unpack(f"<{count}I", table):
        out.append((at, n))
        at += n
    if at != os.fstat(fd).st_size:
        raise ImageError(f"{name}: {os.fstat(fd).st_size} bytes where its chunk table adds up to {at}")
    return raw, chunk, out


def inflate(src: Path, dst: Path, threads: int) -> int:
    """Write the raw image of `src` to the new file `dst`; the bytes written.

    The threads copy into a shared mapping of `dst`: writes to one tmpfs file would take turns on its lock."""
    fin = os.open(src, os.O_RDONLY)
    try:
        raw, chunk, pieces = _layout(fin, src.name)
        fout = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fout, raw)
            out = mmap.mmap(fout, raw)
            view = ctypes.c_char.from_buffer(out)
            try:
                base = ctypes.addressof(view)

                def one(i: int) -> None:
                    at, n = pieces[i]
                    want = min(chunk, raw - i * chunk)
                    data = os.pread(fin, n, at)
                    if n != want:
                        try:
                            data = zlib.decompress(data, bufsize=want)
                        except zlib.error as e:
                            raise ImageError(f"{src.name}: chunk {i} is damaged ({e})") from None
                    if len(data) != want:
                        raise ImageError(f"{src.name}: chunk {i} holds {len(data)} bytes, not {want}")
                    ctypes.memmove(base + i * chunk, data, want)  # without the GIL, unlike a slice assignment

                with ThreadPoolExecutor(max(1, threads)) as pool:
                    list(pool.map(one, range(len(pieces))))
            finally:
                del view
                out.close()
        finally:
            os.close(fout)
    finally:
        os.close(fin)
    return raw


def raw_size(src: Path) -> int:
    fd = os.open(src, os.O_RDONLY)
    try:
        return _layout(fd, src.name)[0]
    finally:
        os.close(fd)
