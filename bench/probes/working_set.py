"""What a cold restore of the reference worker reads besides the weights, and what it needs of it.

    python3 bench/probes/working_set.py [--shape 1b] [--work /var/tmp/warmstart-probe] [--queue-depths] [--read-rates]

1. The libraries' working set recorded at checkpoint, by ELF section (are CUDA fatbins, which the driver reads
   only to load kernels, a large part of it?).
2. A cold restore with no readahead of the libraries: which of their pages the restored worker then had read
   (mincore after its first token): what it needs, plus the kernel's own read-around.
3. CRIU's pages images: their non-zero pages, and how well those compress (zlib level 1).
4. With --queue-depths: cold reads of the saved weights with readers of several counts and read sizes.
5. With --read-rates (instead of 2): cold reads of the working set, alone and interleaved with the saved weights
   as a restore reads them, with 16 or 64 readers and ranges merged across gaps.
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import shutil
import struct
import sys
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gpu  # noqa: E402  bench/gpu.py

from warmstart import demo, registry  # noqa: E402
from warmstart.artifact.manifest import IMAGES_DIR, SAVED_DIR  # noqa: E402
from warmstart.image import workingset  # noqa: E402
from warmstart.pipeline import checkpoint
from warmstart.image import readahead

_PAGE = 4096


def sections(path: Path) -> list[tuple[str, int, int]]:
    """(name, file offset, size) of an ELF64 file's sections that occupy file bytes; [] if not ELF."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:
            return []
        shoff, = struct.unpack_from("<Q", head, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", head, 0x3A)
        f.seek(shoff)
        table = f.read(shentsize * shnum)
        hdrs = [struct.unpack_from("<IIQQQQ", table, i * shentsize) for i in range(shnum)]
        _, _, _, _, stroff, strsize = hdrs[shstrndx]
        f.seek(stroff)
        names = f.read(strsize)
    out = []
    for name, typ, _, _, off, size in hdrs:
        if typ != 8 and size:  # SHT_NOBITS takes no file bytes
            out.append((names[name:names.index(b"\0", name)].decode(errors="replace"), off, size))
    return out


def by_section(ranges: dict[Path, list[tuple[int, int]]]) -> Counter:
    """Bytes of these file ranges in each section name ('(none)' outside every section)."""
    c: Counter = Counter()
    for path, rs in ranges.items():
        secs = sections(path)
        for off, n in rs:
            inside = 0
            for name, so, sn in secs:
                o = max(off, so)
                e = min(off + n, so + sn)
                if e > o:
                    c[name] += e - o
                    inside += e - o
            c["(none)"] += max(0, n - inside)
    return c


def resident(path: Path) -> list[tuple[int, int]]:
    """Ranges of this file in the page cache now (mincore on a mapping that is never touched)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    size = path.stat().st_size
    pages = -(-size // _PAGE)
    vec = ctypes.create_string_buffer(max(1, pages))
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0) if size else None
        if addr in (None, ctypes.c_void_p(-1).value):
            return []
        try:
            if libc.mincore(addr, size, vec) != 0:
                return []
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    out: list[tuple[int, int]] = []
    for i, b in enumerate(vec.raw[:pages]):
        if b & 1:
            if out and out[-1][0] + out[-1][1] == i * _PAGE:
                out[-1] = (out[-1][0], out[-1][1] + _PAGE)
            else:
                out.append((i * _PAGE, _PAGE))
    return out


def subtract(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The pages of ranges `a` outside ranges `b`."""
    inb = {o // _PAGE for off, n in b for o in range(off, off + n, _PAGE)}
    return [(o, _PAGE) for off, n in a for o in range(off, off + n, _PAGE) if o // _PAGE not in inb]


def total(ranges: dict[Path, list[tuple[int, int]]]) -> int:
    return sum(n for rs in ranges.values() for _, n in rs)


def show(title: str, c: Counter) -> None:
    print(f"{title}: {sum(c.values()) / 1e6:.1f} MB; by section: " +
          ", ".join(f"{k} {v / 1e6:.1f}" for k, v in c.most_common(8)), flush=True)


def pages_content(images: Path) -> None:
    zero = bytes(_PAGE)
    for p in readahead.pages_images(images):
        data = p.read_bytes()
        nz = b"".join(data[i:i + _PAGE] for i in range(0, len(data), _PAGE) if data[i:i + _PAGE] != zero)
        sample = nz[: 256 << 20]
        t = time.monotonic()
        packed = len(zlib.compress(sample, 1)) if sample else 0
        rate = len(sample) / max(1e-9, time.monotonic() - t)
        print(f"{p.name}: {len(data) / 1e6:.1f} MB, non-zero {len(nz) / 1e6:.1f} MB; zlib-1 on "
              f"{len(sample) / 1e6:.0f} MB: {packed / max(1, len(sample)):.2f} of it at {rate / 1e6:.0f} MB/s", flush=True)


def queue_depths(path: Path) -> None:
    """Cold reads of one file by readers of several counts and read sizes: how deep a queue the disk needs."""
    size = path.stat().st_size
    for threads, buf in ((16, 8 << 20), (8, 8 << 20), (4, 8 << 20), (4, 1 << 20), (16, 1 << 20), (2, 32 << 20)):
        gpu.drop_caches()
        pieces = [(off, min(64 << 20, size - off)) for off in range(0, size, 64 << 20)]
        fd = os.open(path, os.O_RDONLY)

        def read(piece: tuple[int, int]) -> None:
            b = bytearray(buf)
            off, n = piece
            end = off + n
            while off < end:
                got = os.preadv(fd, [memoryview(b)[: end - off]], off)
                if got <= 0:
                    return
                off += got

        t = time.monotonic()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(read, pieces))
        dt = time.monotonic() - t
        os.close(fd)
        print(f"cold read of {size / 1e9:.2f} GB, {threads} threads x {buf >> 20} MiB reads: "
              f"{size / dt / 1e9:.2f} GB/s", flush=True)


def merged(pieces: list[readahead.Piece], gap: int) -> list[readahead.Piece]:
    """Ranges of one file closer than `gap` bytes read as one: fewer, larger reads, some bytes read for nothing."""
    out: list[readahead.Piece] = []
    for path, off, n in sorted(pieces):
        if out and out[-1][0] == path and off - (out[-1][1] + out[-1][2]) <= gap:
            last = out[-1]
            out[-1] = (path, last[1], max(last[1] + last[2], off + n) - last[1])
        else:
            out.append((path, off, n))
    return out


def read_rates(ranges: list[readahead.Piece], saved: list[Path]) -> None:
    """Cold reads of the libraries' working set alone and interleaved with the saved weights (as a restore reads
    them), with readers of several counts and ranges merged across gaps of several sizes."""
    weights = readahead.whole(saved)
    for label, threads, gap, with_weights in (("as recorded", 16, 0, False), ("as recorded", 64, 0, False),
                                               ("gaps <= 1 MiB merged", 16, 1 << 20, False),
                                               ("gaps <= 4 MiB merged", 16, 4 << 20, False),
                                               ("gaps <= 1 MiB merged", 64, 1 << 20, False),
                                               ("as recorded", 16, 0, True), ("as recorded", 64, 0, True),
                                               ("gaps <= 1 MiB merged", 16, 1 << 20, True),
                                               ("gaps <= 1 MiB merged", 64, 1 << 20, True)):
        gpu.drop_caches()
        pieces = merged(ranges, gap) if gap else ranges
        useful = sum(n for _, _, n in ranges) + (sum(n for _, _, n in weights) if with_weights else 0)
        read0, t = gpu.disk_bytes_read(), time.monotonic()
        ahead = readahead.Readahead([], threads, readahead._interleave(readahead._split(pieces),
                                                                        readahead._split(weights if with_weights else [])))
        ahead.wait()
        dt, disk = time.monotonic() - t, gpu.disk_bytes_read() - read0
        ahead.stop()
        print(f"cold read of the working set{' and the weights' if with_weights else ''}, {label}, {threads} threads: "
              f"{len(pieces)} reads, {useful / 1e9:.2f} GB needed, {disk / 1e9:.2f} GB off the disk in {dt:.2f} s: "
              f"{useful / dt / 1e9:.2f} GB/s of what is needed", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="1b", choices=sorted(gpu.SHAPES))
    ap.add_argument("--work", type=Path, default=Path("/var/tmp/warmstart-probe"))
    ap.add_argument("--queue-depths", action="store_true", help="also time cold reads of the weights file")
    ap.add_argument("--read-rates", action="store_true",
                    help="time cold reads of the working set (threads, merged ranges) instead of the two restores")
    args = ap.parse_args()
    model_dir = gpu.ensure_model(args.shape)
    name = f"probe-{args.shape}"
    gpu.stop(name)
    _, port = gpu.cold_start(args.shape, model_dir, name, True)
    want = demo.complete(port, gpu.PROMPT, gpu.TOKENS, timeout_s=300)
    art = args.work / name
    shutil.rmtree(art, ignore_errors=True)
    try:
        m = checkpoint.checkpoint(registry.get(name).pid, art, record=registry.get(name), leave_running=False).manifest
        ws = {Path(f.path): list(f.ranges) for f in m.working_set}
        show("working set recorded at checkpoint", by_section(ws))
        pages_content(art / IMAGES_DIR)

        if args.queue_depths:
            queue_depths(max((p for p in (art / SAVED_DIR).iterdir()), key=lambda p: p.stat().st_size))
        if args.read_rates:
            read_rates(list(workingset.pieces(m.working_set)), sorted((art / SAVED_DIR).iterdir()))
            return
        real = workingset.pieces
        for label, ahead in (("no library readahead", False), ("with the working set read ahead", True)):
            workingset.pieces = real if ahead else (lambda *a, **k: ())
            r = gpu.restore_once(art, f"{name}-{'ra' if ahead else 'nora'}", cold=True, replicas=1, want=want)
            workingset.pieces = real
            rep = r["replicas"][0]
            print(f"cold restore, {label}: ready {rep['ready_s']} s (CRIU {rep['criu_s']}, CUDA {rep['cuda_s']}, "
                  f"rest {rep['after_cuda_s']}), first token {rep['first_token_s']} s, tokens match "
                  f"{rep['tokens_match']}, disk {r['disk_read_bytes'] / 1e9:.2f} GB, GB/s per 250 ms "
                  f"{r['disk_gbps_per_250ms']}", flush=True)
            if not ahead:
                # restore_once stopped the replica after its tokens: what it read is still cached.
                needed = {p: resident(p) for p in ws}
                show("  libraries' pages read by that restore (cached afterwards)", by_section(needed))
                overlap = sum(min(a + n, b + k) - max(a, b) for p in ws for a, n in ws[p] for b, k in needed[p]
                              if min(a + n, b + k) > max(a, b))
                print(f"  of which inside the recorded working set: {overlap / 1e6:.1f} MB of "
                      f"{total(ws) / 1e6:.1f} MB recorded", flush=True)
                outside = {p: subtract(needed[p], ws[p]) for p in ws}
                for p in sorted(outside, key=lambda q: -total({q: outside[q]}))[:8]:
                    c = by_section({p: outside[p]})
                    print(f"    {p.name}: read {total({p: needed[p]}) / 1e6:.1f} MB, recorded {total({p: ws[p]}) / 1e6:.1f}, "
                          f"read outside the record {total({p: outside[p]}) / 1e6:.1f} (" +
                          ", ".join(f"{k} {v / 1e6:.1f}" for k, v in c.most_common(3)) + ")", flush=True)
    finally:
        gpu.stop(name)
        for n in [r.name for r in registry.all_records()]:
            gpu.stop(n)
        shutil.rmtree(art, ignore_errors=True)


if __name__ == "__main__":
    main()
