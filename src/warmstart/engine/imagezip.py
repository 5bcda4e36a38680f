"""CRIU's large pages images, stored compressed and inflated into memory for each restore.

Once its zero pages are out (engine/zeropages.py), what is left of a CUDA worker's pages image still
compresses well: zlib at level 1 keeps 0.14 of the 1.1B reference worker's 0.78 GB (the driver's copy of GPU
memory and the Python heap hold much that repeats). A cold restore waits on the disk, and inflating on
several cores is faster than reading the bytes saved. CRIU reads its images itself, so a restore inflates them
first, into a directory in memory beside links to the other image files, and points CRIU there (`Inflated`).

Format of pages-N.img.z: MAGIC, the raw size (u64), the chunk size (u32), the number of chunks (u32), each
chunk's stored length (u32 each; a chunk stored at its raw length is stored raw), then the chunks. Chunks are
independent, so any number of threads compress and inflate them. The manifest checksums the stored file.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import shutil
import struct
import tempfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

MAGIC = b"WSZPAGE1"
SUFFIX = ".z"
CHUNK = 4 << 20
MIN_BYTES = 32 << 20  # smaller pages images stay as CRIU wrote them: too little to gain
_KEEP_BELOW = 0.9  # a compressed image must be at most this fraction of the raw one, or the raw one stays
_HEAD = struct.Struct("<8sQII")
_SPARE = 256 << 20  # room left in a memory file system after the inflated images


class ImageError(ValueError):
    """A compressed image that is damaged or not ours."""


def compress(images: Path, threads: int, warn: Callable[[str], None]) -> tuple[int, int]:
    """Compress each pages image of MIN_BYTES or more in place (pages-N.img -> pages-N.img.z) where that
    saves enough. Returns (raw bytes, stored bytes) of those compressed. One that cannot be written (a full
    disk) stays raw, with a warning."""
    raw = stored = 0
    for p in sorted(images.glob("pages-*.img")):
        size = p.stat().st_size
        if size < MIN_BYTES:
            continue
        try:
            got = _compress_one(p, size, threads)
        except OSError as e:
            warn(f"warning: {p.name} stays uncompressed ({e})")
            continue
        if got:
            raw, stored = raw + size, stored + got
    return raw, stored


def _compress_one(path: Path, size: int, threads: int) -> int:
    count = -(-size // CHUNK)
    out = path.with_name(path.name + SUFFIX)
    tmp = path.with_name(path.name + SUFFIX + ".tmp")
    src = os.open(path, os.O_RDONLY)
    dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        def one(i: int) -> bytes:
            data = os.pread(src, CHUNK, i * CHUNK)
            if not _worth_trying(data):
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
        if at > size * _KEEP_BELOW:
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
    path.unlink()
    return at


def _worth_trying(data: bytes) -> bool:
    """Whether samples of a chunk compress: zlib is slow on random bytes (tens of MB/s), such as a KV cache's."""
    step = max(1, len(data) // 4)
    sample = b"".join(data[i:i + 16384] for i in range(0, len(data), step))
    return len(zlib.compress(sample, 1)) < _KEEP_BELOW * len(sample)


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


def memory_dir(need: int) -> Path:
    """Where to inflate `need` bytes: /dev/shm (memory) if it has the room, else the temporary directory."""
    try:
        st = os.statvfs("/dev/shm")
        if st.f_bavail * st.f_frsize >= need + _SPARE:
            return Path("/dev/shm")
    except OSError:
        pass
    return Path(tempfile.gettempdir())


class Inflated:
    """A directory holding what CRIU reads of an image: links to its files and its compressed images inflated.
    Removed by `remove` (idempotent); until then it holds the raw images' bytes, in memory where it can."""

    def __init__(self, images: Path, threads: int) -> None:
        zipped = compressed(images)
        self.path = Path(tempfile.mkdtemp(prefix="warmstart-images-", dir=memory_dir(sum(map(raw_size, zipped)))))
        try:
            for p in images.iterdir():
                if p not in zipped:
                    (self.path / p.name).symlink_to(p)
            for z in zipped:
                inflate(z, self.path / z.name[: -len(SUFFIX)], threads)
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
