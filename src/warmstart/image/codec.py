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
compressed if its samples shrink to CHUNK_WORTH or less: on these disks (1-1.6 GB/s), with inflating bounded
at ~5 GB/s, a chunk that keeps more costs a cold restore about as much to inflate as it saves in reading. An
image is stored compressed only if the samples say it shrinks to _WORTH or less; otherwise it stays as CRIU
wrote it. Every restore that inflates pays for it and holds the raw bytes in memory, and an image of bf16
weights (a CUDA process checkpointed without its worker's help) keeps 0.80 of its bytes under zlib, at ~24 MB/s
a core: minutes of checkpoint for an 8B model, for a fifth less to read.

Sealed (encrypted) files. With encryption at rest (artifact/encryption.py, on by default) every file of the
images (and of the worker's /dev/shm segments) is stored sealed instead, as NAME.sealed, compressed chunks and
all: each chunk is sealed with AES-256-GCM on its own, so a restore opens them on every core while it reads.
A pages image of MIN_BYTES or more that is not compressed is sealed where CRIU wrote it instead, with no second
copy (image/inplace.py has that format); its raw image then does not go to the cache.

Format of pages-N.img.z: MAGIC, the raw size (u64), the chunk size (u32), the number of chunks (u32), each
chunk's stored length (u32 each; a chunk stored at its raw length is stored raw), then the chunks. Chunks are
independent, so any number of threads compress and inflate them. The manifest checksums the stored file.
NAME.sealed is the same with SEALED_MAGIC and an 8-byte nonce prefix after the count; chunk i is sealed with
nonce prefix + i and, as associated data, the header and NAME, so chunks cannot be moved, dropped or renamed
unseen; a chunk whose opened length is its raw length was stored uncompressed.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import mmap
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from warmstart.artifact.encryption import ImageKey
from warmstart.artifact.manifest import TransformChoice
from warmstart.artifact.store import TREE_CHUNK, HashWhileWriting
from warmstart.errors import ImageError
from warmstart.image import inplace
from warmstart.image import plan as planning

MAGIC = b"WSZPAGE1"
SEALED_MAGIC = b"WSSEAL01"
SUFFIX = ".z"
SEALED_SUFFIX = ".sealed"
CHUNK = 4 << 20
MIN_BYTES = 32 << 20  # smaller pages images stay as CRIU wrote them: too little to gain
_WORTH = 0.5  # an image is stored compressed only if it shrinks to this fraction of its size or less
CHUNK_WORTH = 0.7  # a chunk is compressed only if its samples shrink to this fraction or less
_SAMPLE = 16384  # bytes of each of a chunk's four samples
_RATE_PIECE = 64 << 10  # zlib's rates are timed on 16 pieces this big
_HEAD = struct.Struct("<8sQII")
_SEALED_HEAD = struct.Struct("<8sQII8s")
_TINY = 64 << 10  # a stored chunk this small may be all zeros
_TAG = 16  # AES-GCM's tag, after each sealed chunk


Stop = Callable[[], None]  # raises to stop a pass (an interrupted pipeline); called every chunk or window
Read = planning.Read


def _go_on() -> None:
    pass


@dataclass(frozen=True)
class _Seal:
    """How one file's chunks are sealed: the artifact's key, the file's nonce prefix and associated data."""

    key: ImageKey
    prefix: bytes
    aad: bytes
    last: int = -1  # the chunk sealed with `last_aad` instead (image/inplace.py's SEALED_MAGIC3)
    last_aad: bytes = b""

    def nonce(self, i: int) -> bytes:
        return self.prefix + struct.pack("<I", i)

    def aad_for(self, i: int) -> bytes:
        return self.last_aad if i == self.last else self.aad


@dataclass(frozen=True)
class Packed:
    raw: int = 0  # raw bytes of the images stored compressed ...
    stored: int = 0  # ... and what they take
    sealed: int = 0  # files sealed
    in_place: tuple[Path, ...] = ()  # those sealed where they lay (image/inplace.py): no raw copy kept
    digests: dict[Path, str] = field(default_factory=dict)  # the sealed files' checksums, taken as written


def _pages(p: Path) -> bool:
    return p.name.startswith("pages-") and p.name.endswith(".img")


def compress(images: Path, threads: int, warn: Callable[[str], None], keep: Path | None = None,
             mode: str = "1", choices: list[TransformChoice] | None = None, stop: Stop = _go_on) -> tuple[int, int]:
    """Compress each pages image of MIN_BYTES or more in place (pages-N.img -> pages-N.img.z) where that
    pays (`mode` "auto": image/plan.py; "1": where samples say it halves the image); the raw image is moved
    into `keep` (for `cache_raw`) or removed. Returns (raw bytes, stored bytes) of those compressed. One that
    cannot be written (a full disk) stays raw, with a warning. Each decision is appended to `choices`."""
    raw = stored = 0
    for p in sorted(images.glob("pages-*.img")):
        size = p.stat().st_size
        if size < MIN_BYTES:
            continue
        plan = _plan(p, size, threads, mode, sealing=False, choices=choices)
        if plan is None:
            continue
        try:
            got = _write(p, size, plan, None, threads, keep, stop, worth=size * _WORTH)
        except OSError as e:
            warn(f"warning: {p.name} stays uncompressed ({e})")
            continue
        if got:
            raw, stored = raw + size, stored + got
    return raw, stored


def seal(files: Iterable[Path], key: ImageKey, threads: int, mode: str, keep: Path | None = None,
         choices: list[TransformChoice] | None = None, stop: Stop = _go_on,
         begun: Mapping[str, inplace.InPlace] | None = None) -> Packed:
    """Seal each file (NAME -> NAME.sealed): its pages images of MIN_BYTES or more compressed where that pays (as
    `compress`, `mode` "0" never), their raw images then moved into `keep`, or else sealed where they lie
    (image/inplace.py); the chunks of smaller files compressed where they shrink (holes), the raw files removed.
    `begun`: images whose in-place seal began while CRIU wrote them (image/behind.py), by name: finished, or
    unsealed first where the planner compresses them. Unlike compressing, a file that cannot be sealed fails
    the checkpoint (OSError): none stays in the clear."""
    raw = stored = count = 0
    digests: dict[Path, str] = {}
    in_place: list[Path] = []
    with ThreadPoolExecutor(max(1, threads)) as hashing:
        for p in sorted(files):
            size = p.stat().st_size
            big = _pages(p) and size >= MIN_BYTES
            begun_p = (begun or {}).get(p.name) if big else None
            if big:
                plan = _plan(p, size, threads, mode, sealing=True, choices=choices,
                             read=begun_p.read if begun_p else None) or [False] * -(-size // CHUNK)
            else:
                plan = _chunk_plan(p, size, threads)
            out = p.with_name(p.name + SEALED_SUFFIX)
            if big and not any(plan):
                if begun_p and choices is not None:
                    choices.append(_behind(p.name, size, begun_p))
                digests[out] = (begun_p or inplace.InPlace(p, key, CHUNK)).finish(out, threads, stop)
                in_place.append(out)
                count += 1
                continue
            if begun_p:
                begun_p.unseal(threads)  # to be compressed: the copy reads what CRIU wrote
            hasher = HashWhileWriting(out.with_name(out.name + ".tmp"), hashing, stop)
            got = _write(p, size, plan, key, threads, keep if big else None, stop, hasher=hasher)
            digests[out] = hasher.digest
            count += 1
            if big and any(plan):
                raw, stored = raw + size, stored + got
    return Packed(raw, stored, count, tuple(in_place), digests)


def _behind(name: str, size: int, f: inplace.InPlace) -> TransformChoice:
    done = min(size, len(f.sealed) * TREE_CHUNK)
    return TransformChoice(transform="seal_behind", image=name, applied=True,
                           reason=f"{done / 1e6:.0f} of {size / 1e6:.0f} MB sealed while CRIU wrote it")


def _write(path: Path, size: int, plan: list[bool], key: ImageKey | None, threads: int, keep: Path | None,
           stop: Stop, worth: float | None = None, hasher: HashWhileWriting | None = None) -> int:
    """Write `path` as a compressed (no key) or sealed file beside it, compressing the chunks `plan` names; then
    the raw file goes (to `keep` or away). Returns the stored size, or 0 where it came out larger than `worth`.
    `hasher` (of the file written, NAME.tmp) takes its checksum as it is written."""
    count = len(plan)
    out = path.with_name(path.name + (SEALED_SUFFIX if key else SUFFIX))
    tmp = out.with_name(out.name + ".tmp")
    if key:
        prefix = os.urandom(8)
        head = _SEALED_HEAD.pack(SEALED_MAGIC, size, CHUNK, count, prefix)
        sealing: _Seal | None = _Seal(key, prefix, head + path.name.encode())
    else:
        head, sealing = _HEAD.pack(MAGIC, size, CHUNK, count), None
    src = os.open(path, os.O_RDONLY)
    dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        at, lengths = _write_chunks(src, dst, len(head) + 4 * count, plan, sealing, threads, stop, hasher)
        if worth is not None and at > worth:  # the samples were wrong about this one
            os.unlink(tmp)
            return 0
        os.pwrite(dst, head + struct.pack(f"<{count}I", *lengths), 0)
        if hasher:
            hasher.finish(at)
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


def _write_chunks(src: int, dst: int, at: int, plan: list[bool], sealing: _Seal | None,
                  threads: int, stop: Stop, hasher: HashWhileWriting | None) -> tuple[int, list[int]]:
    # Sealed and not compressed, every chunk's place is known beforehand: the threads write them too.
    placed = sealing is not None and not any(plan)
    base, size = at, os.fstat(src).st_size

    def one(i: int) -> bytes:
        n = min(CHUNK, size - i * CHUNK)
        if plan[i] and _in_hole(src, i * CHUNK, n):
            data = _zeros_stored(n)  # not even read: /dev/shm segments are mostly holes
        else:
            data = os.pread(src, CHUNK, i * CHUNK)
            if plan[i] and data == _zeros(len(data)):
                data = _zeros_stored(len(data))  # as zlib stores them, without zlib's 10 ms
            elif plan[i]:
                z = zlib.compress(data, 1)  # releases the GIL: the threads compress side by side
                data = z if len(z) < len(data) else data
        data = sealing.key.seal(sealing.nonce(i), data, sealing.aad) if sealing else data
        if placed:
            os.pwrite(dst, data, base + i * (CHUNK + _TAG))
        return data

    lengths: list[int] = []
    with ThreadPoolExecutor(max(1, threads)) as pool:
        run = pool.map if len(plan) > 1 else map  # one chunk (most small images): no thread to start
        for start in range(0, len(plan), 4 * threads):  # a window at a time: memory stays bounded
            stop()
            for chunk in run(one, range(start, min(len(plan), start + 4 * threads))):
                if not placed:
                    os.pwrite(dst, chunk, at)
                at += len(chunk)
                lengths.append(len(chunk))
            if hasher:
                hasher.written(at)
    return at, lengths


def _in_hole(fd: int, at: int, n: int) -> bool:
    """Whether the file holds no data in [at, at + n), found by lseek: reading a hole's zeros costs as much as
    faulting in fresh memory for them (~3 ms for 4 MiB on the 2-core VM)."""
    try:
        return os.lseek(fd, at, os.SEEK_DATA) >= at + n
    except OSError as e:
        return e.errno == errno.ENXIO  # no data after `at`


def _ratios(read: Read, size: int, threads: int) -> tuple[list[int], list[float]]:
    """Each chunk's length, and what zlib keeps of its samples."""
    lengths = [min(CHUNK, size - at) for at in range(0, size, CHUNK)]
    if len(lengths) <= 1:
        return lengths, [_sample_ratio(read, 0, n) for n in lengths]
    with ThreadPoolExecutor(max(1, threads)) as pool:
        return lengths, list(pool.map(lambda i: _sample_ratio(read, i * CHUNK, lengths[i]), range(len(lengths))))


def _rates(read: Read, size: int) -> tuple[float, float]:
    """zlib's compress and inflate rates on this image, MB/s on one core: timed on 16 pieces of 64 KiB spread
    over it, on this thread alone (timed beside the sampling threads, waits for the GIL would count)."""
    step = max(_RATE_PIECE, size // 16)
    data = b"".join(read(_RATE_PIECE, at) for at in range(0, size, step))[:16 * _RATE_PIECE]
    t0 = time.perf_counter()
    z = zlib.compress(data, 1)
    t1 = time.perf_counter()
    zlib.decompress(z)
    t2 = time.perf_counter()
    mb = len(data) / 1e6
    return mb / max(t1 - t0, 1e-9), mb / max(t2 - t1, 1e-9)


def _plan(path: Path, size: int, threads: int, mode: str, sealing: bool,
          choices: list[TransformChoice] | None, read: Read | None = None) -> list[bool] | None:
    """Which chunks to compress, from samples of each; None to store the image uncompressed (`mode` "0"; "1": it
    would not shrink to _WORTH of its size; "auto": image/plan.py says it does not pay on this host). `read`:
    the image's bytes, where not the file's own (one whose seal has begun)."""
    if mode == "0":
        return None
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        return _plan_from(read or (lambda n, at: os.pread(fd, n, at)), path.name, size, threads, mode, sealing,
                          choices)
    finally:
        os.close(fd)


def _plan_from(read: Read, name: str, size: int, threads: int, mode: str, sealing: bool,
               choices: list[TransformChoice] | None) -> list[bool] | None:
    # The rates first: where even an image that shrank to nothing would not pay, its ratios need no samples.
    rates = _rates(read, size) if mode == "auto" else None
    if rates and (choice := planning.cannot_pay(name, size, *rates, planning.host(), sealing)):
        if choices is not None:
            choices.append(choice)
        return None
    lengths, ratios = _ratios(read, size, threads)
    chunks = [r <= CHUNK_WORTH for r in ratios]
    estimate = int(sum(n * r if z else n for n, r, z in zip(lengths, ratios, chunks, strict=True)))
    if rates is None:
        return chunks if estimate <= _WORTH * size else None
    choice = planning.compression(name, planning.Samples(size, estimate, *rates), planning.host(), sealing)
    if choices is not None:
        choices.append(choice)
    return chunks if choice.applied else None


def _chunk_plan(path: Path, size: int, threads: int) -> list[bool]:
    """Which chunks of a small image or a /dev/shm segment (mostly holes) to compress: those that shrink."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return [_sample_ratio(lambda n, at: os.pread(fd, n, at), at, min(CHUNK, size - at)) <= CHUNK_WORTH
                for at in range(0, size, CHUNK)]
    finally:
        os.close(fd)


def _sample_ratio(read: Read, offset: int, length: int) -> float:
    """What zlib keeps of four samples spread over one chunk: zlib is slow on what does not compress (tens of
    MB/s), so the whole chunk is compressed only when this says it pays."""
    step = max(1, length // 4)
    sample = b"".join(read(min(_SAMPLE, length - i), offset + i) for i in range(0, length, step))
    return len(zlib.compress(sample, 1)) / max(1, len(sample))


def compressed(images: Path) -> list[Path]:
    return sorted(images.glob("pages-*.img" + SUFFIX))


def packed(directory: Path) -> list[Path]:
    """The files of a directory a restore must inflate or open before CRIU (or a replica) reads them."""
    return sorted(p for p in directory.iterdir() if p.name.endswith((SUFFIX, SEALED_SUFFIX)))


def raw_name(stored: Path) -> str:
    return stored.name.removesuffix(SEALED_SUFFIX) if stored.name.endswith(SEALED_SUFFIX) \
        else stored.name.removesuffix(SUFFIX)


@dataclass(frozen=True)
class _Layout:
    raw: int
    chunk: int
    pieces: list[tuple[int, int]]  # (offset, stored length) of each chunk
    seal: _Seal | None
    tags: int | None = None  # sealed in place (image/inplace.py): where the chunks' tags start


def _in_place(fd: int, path: Path, key: ImageKey | None) -> _Layout | None:
    got = inplace.read_trailer(fd, path.name)
    if got is None:
        return None
    magic, raw, chunk, count, prefix = got
    if key is None:
        raise ImageError(f"{path.name} is sealed, but the manifest names no key to open it")
    pieces = [(i * chunk, min(chunk, raw - i * chunk)) for i in range(count)]
    aad, last_aad = inplace.chunk_aad(magic, raw, chunk, prefix, raw_name(path))
    return _Layout(raw, chunk, pieces, _Seal(key, prefix, aad, count - 1, last_aad), tags=raw)


def _layout(fd: int, path: Path, key: ImageKey | None) -> _Layout:
    """The layout of a compressed or sealed file, checked against its size."""
    name = path.name
    head = os.pread(fd, _SEALED_HEAD.size, 0)
    sealed = head[:8] == SEALED_MAGIC
    fmt = _SEALED_HEAD if sealed else _HEAD
    if head[:8] not in (MAGIC, SEALED_MAGIC) and (lay := _in_place(fd, path, key)):
        return lay
    if len(head) < fmt.size:
        raise ImageError(f"{name}: too short for a compressed or sealed image")
    magic, raw, chunk, count = fmt.unpack(head[:fmt.size])[:4]
    if magic not in (MAGIC, SEALED_MAGIC) or chunk < 4096 or count != -(-raw // chunk) or count > 1 << 26:
        raise ImageError(f"{name}: not a warmstart compressed or sealed image")
    if sealed and key is None:
        raise ImageError(f"{name} is sealed, but the manifest names no key to open it")
    seal = _Seal(key, head[-8:], head + raw_name(path).encode()) if sealed and key else None
    table = os.pread(fd, 4 * count, fmt.size)
    if len(table) < 4 * count:
        raise ImageError(f"{name}: its chunk table is cut short")
    at, pieces = fmt.size + 4 * count, []
    for n in struct.unpack(f"<{count}I", table):
        pieces.append((at, n))
        at += n
    if at != os.fstat(fd).st_size:
        raise ImageError(f"{name}: {os.fstat(fd).st_size} bytes where its chunk table adds up to {at}")
    return _Layout(raw, chunk, pieces, seal)


@functools.lru_cache(maxsize=4)
def _zeros(n: int) -> bytes:
    return bytes(n)


@functools.lru_cache(maxsize=4)
def _zeros_stored(n: int) -> bytes:
    return zlib.compress(_zeros(n), 1)


def _chunk(fd: int, lay: _Layout, i: int, name: str) -> bytes | None:
    """Chunk i's raw bytes; None where it was stored as zlib stores a chunk of zeros, which is then not inflated
    (6 ms a chunk: a worker's /dev/shm segments are hundreds of MB of them)."""
    at, n = lay.pieces[i]
    want = min(lay.chunk, lay.raw - i * lay.chunk)
    data = os.pread(fd, n, at)
    if lay.tags is not None:
        data += os.pread(fd, _TAG, lay.tags + _TAG * i)
    if lay.seal:
        data = lay.seal.key.open(lay.seal.nonce(i), data, lay.seal.aad_for(i), f"{name}: chunk {i}")
    if len(data) != want and len(data) < _TINY and data == _zeros_stored(want):
        return None
    if len(data) != want:
        try:
            data = zlib.decompress(data, bufsize=want)
        except zlib.error as e:
            raise ImageError(f"{name}: chunk {i} is damaged ({e})") from None
    if len(data) != want:
        raise ImageError(f"{name}: chunk {i} holds {len(data)} bytes, not {want}")
    return data


def inflate(src: Path, dst: Path, threads: int, key: ImageKey | None = None, stop: Stop = _go_on,
            existing: bool = False) -> int:
    """Write the raw image of `src` (compressed or sealed) to the new file `dst` (`existing`: the empty file the
    caller made); the bytes written.

    The threads copy into a shared mapping of `dst`: writes to one tmpfs file would take turns on its lock."""
    fin = os.open(src, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        lay = _layout(fin, src, key)
        fout = os.open(dst, os.O_RDWR | os.O_NOFOLLOW | (0 if existing else os.O_CREAT | os.O_EXCL), 0o600)
        try:
            if lay.raw:
                _fill(fin, fout, lay, src.name, threads, stop)
        finally:
            os.close(fout)
    finally:
        os.close(fin)
    return lay.raw


def _fill(fin: int, fout: int, lay: _Layout, name: str, threads: int, stop: Stop) -> None:
    os.ftruncate(fout, lay.raw)
    out = mmap.mmap(fout, lay.raw)
    view = ctypes.c_char.from_buffer(out)
    try:
        base = ctypes.addressof(view)

        local = threading.local()

        def one(i: int) -> None:
            stop()
            if lay.seal and _open_in_place(fin, lay, i, base, local, name):
                return
            data = _chunk(fin, lay, i, name)
            if data is None:
                return
            if lay.pieces[i][1] < _TINY:  # stored in almost nothing: mostly zeros, as /dev/shm segments are
                _copy_nonzero(base + i * lay.chunk, data)
                return
            ctypes.memmove(base + i * lay.chunk, data, len(data))  # without the GIL, unlike a slice assignment

        if len(lay.pieces) == 1:
            one(0)
        else:
            with ThreadPoolExecutor(max(1, threads)) as pool:
                list(pool.map(one, range(len(lay.pieces))))
    finally:
        del view
        out.close()


_ZERO_PAGE = bytes(mmap.PAGESIZE)


def _copy_nonzero(dst: int, data: bytes) -> None:
    """The pages of `data` that are not all zeros, to `dst` (a file's shared mapping): the others stay holes,
    which the copies made from this file keep (a vLLM worker's 400 MB of /dev/shm held 90 KB that were not
    zeros, and each replica's copy of it was 80 MB of written zeros)."""
    view = memoryview(data)
    for at in range(0, len(data), mmap.PAGESIZE):
        page = view[at:at + mmap.PAGESIZE]
        if page != _ZERO_PAGE[:len(page)]:
            ctypes.memmove(dst + at, page.tobytes(), len(page))


def _open_in_place(fd: int, lay: _Layout, i: int, base: int, local: threading.local, name: str) -> bool:
    """Open sealed chunk i straight into its place at `base`, if it was stored uncompressed; False if it was
    compressed. Into a buffer this thread reuses: a fresh one per chunk is fresh memory to fault in."""
    assert lay.seal is not None
    at, n = lay.pieces[i]
    want = min(lay.chunk, lay.raw - i * lay.chunk)
    sealed_len = n + (_TAG if lay.tags is not None else 0)
    if sealed_len != want + _TAG:
        return False
    buf = getattr(local, "buf", None)
    if buf is None or len(buf) < sealed_len:
        buf = local.buf = bytearray(lay.chunk + _TAG)
    got = os.preadv(fd, [memoryview(buf)[:n]], at)
    if lay.tags is not None and got == n:
        got += os.preadv(fd, [memoryview(buf)[n:sealed_len]], lay.tags + _TAG * i)
    if got != sealed_len:
        raise ImageError(f"{name}: chunk {i} is cut short")
    dest = (ctypes.c_char * want).from_address(base + i * lay.chunk)
    lay.seal.key.open_into(lay.seal.nonce(i), memoryview(buf)[:sealed_len], lay.seal.aad_for(i),
                           memoryview(dest).cast("B"), f"{name}: chunk {i}")
    return True


def raw_size(src: Path) -> int:
    fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        head = os.pread(fd, _HEAD.size, 0)
        if head[:8] not in (MAGIC, SEALED_MAGIC) and (placed := inplace.read_trailer(fd, src.name)):
            return placed[1]
    finally:
        os.close(fd)
    if len(head) < _HEAD.size or head[:8] not in (MAGIC, SEALED_MAGIC):
        raise ImageError(f"{src.name}: not a warmstart compressed or sealed image")
    return int(_HEAD.unpack(head)[1])
