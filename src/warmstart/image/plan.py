"""Which transforms a checkpoint applies to its image, decided per image from what they cost and save on this
host, not by size alone: its cores, the disk's rate (WARMSTART_DISK_MBPS) and zlib's rates measured on the
image's own samples (image/codec.py). Each decision and its figures go into the manifest (`transforms`) and
`warmstart inspect` shows them.

Compression is chosen only if neither the checkpoint nor a cold restore gets slower (by the estimate; within 5%
of the pass's time counts as not slower):
- a cold restore reads `raw` bytes at the disk's rate, or reads `stored` bytes while inflating `raw` on every
  core side by side, whichever is slower; compression must make that shorter;
- the checkpoint: with encryption on, the sealing pass writes the image anyway (at the disk's rate: AES-GCM on
  every core is faster), so compressing costs only what zlib on every core takes beyond writing fewer bytes;
  with encryption off it would be a pass of its own, which always costs the checkpoint: then the image stays
  as CRIU wrote it.
A 2-core machine gets no compression (zlib there is slower than its disk); 16 cores do.

Zero pages (image/zeropages.py) are cut out when a sample of the pages says zeros are at least half of them:
the pass rewrites the image once, and then the later pass and every cold restore each handle that much less.
Below half, the pass costs the checkpoint more than it saves it and a restore together; their zeros are still
stored as almost nothing by the compressing pass, and a chunk of nothing but zeros is not even that.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from warmstart import config
from warmstart.artifact.manifest import TransformChoice

_ZERO_WORTH = 0.5
_NOISE = 0.05  # an estimated cost within this fraction of the pass's own time is no cost: the rates are estimates
_PAGE = 4096
_ZERO = bytes(_PAGE)

Read = Callable[[int, int], bytes]  # (n, at): an image's bytes, as os.pread on it


@dataclass(frozen=True)
class Host:
    threads: int
    disk_mbps: float  # what a cold restore reads and a checkpoint writes at


def host() -> Host:
    return Host(threads=os.cpu_count() or 1, disk_mbps=float(config.current().disk_mbps))


@dataclass(frozen=True)
class Samples:
    """What the samples of one image said: its size, the estimated stored size, zlib's rates per core."""

    raw: int
    stored: int
    zlib_mbps: float
    inflate_mbps: float


def compression(name: str, s: Samples, h: Host, sealing: bool) -> TransformChoice:
    disk, cores = h.disk_mbps * 1e6, max(1, h.threads)
    read_raw = s.raw / disk
    restore = max(s.stored / disk, s.raw / (s.inflate_mbps * 1e6 * cores))
    zlib_pass = max(s.stored / disk, s.raw / (s.zlib_mbps * 1e6 * cores))
    cost = zlib_pass - read_raw if sealing else zlib_pass
    applied = restore < read_raw and cost <= _NOISE * read_raw
    reason = (f"{s.raw / 1e6:.0f} MB to ~{s.stored / 1e6:.0f} MB: a cold restore {restore:.2f} s instead of "
              f"{read_raw:.2f} s, the checkpoint {cost:+.2f} s (zlib {s.zlib_mbps:.0f} and inflate "
              f"{s.inflate_mbps:.0f} MB/s a core, {cores} cores, disk {h.disk_mbps:.0f} MB/s)")
    return TransformChoice(transform="compress", image=name, applied=applied, reason=reason)


def cannot_pay(name: str, raw: int, zlib_mbps: float, inflate_mbps: float, h: Host,
               sealing: bool) -> TransformChoice | None:
    """The choice not to compress an image that would not pay even if it shrank to nothing (then its ratio
    needs no samples: both costs only grow with the stored size); None where its ratio decides."""
    if compression(name, Samples(raw, 0, zlib_mbps, inflate_mbps), h, sealing).applied:
        return None
    reason = (f"{raw / 1e6:.0f} MB, not sampled: zlib {zlib_mbps:.0f} and inflate {inflate_mbps:.0f} MB/s a core "
              f"on {max(1, h.threads)} cores against a disk of {h.disk_mbps:.0f} MB/s would not pay at any ratio")
    return TransformChoice(transform="compress", image=name, applied=False, reason=reason)


def zero_pages(images: Path, later_pass: bool, readers: Mapping[str, Read] | None = None) -> TransformChoice:
    """Cut zero pages out of this directory's pages images only where a sample says they are half or more.
    readers: the bytes of images whose seal has begun (image/inplace.py's `InPlace.read`), by name."""
    pages = [p for p in sorted(images.glob("pages-*.img")) if p.stat().st_size > 0]
    raw = sum(p.stat().st_size for p in pages)
    zero, seen = _sample_zeros(pages, readers or {})
    fraction = zero / seen if seen else 0.0
    worth = _ZERO_WORTH if later_pass else 1.0  # with no later pass to shorten, only an image of zeros pays
    applied = seen > 0 and fraction >= worth
    reason = (f"a sample of {seen} pages of {raw / 1e6:.0f} MB is {fraction:.0%} zeros; the pass pays from "
              f"{worth:.0%}" + ("" if later_pass else " (encryption off: no later pass to shorten)"))
    return TransformChoice(transform="zero_pages", image=None, applied=applied, reason=reason)


def _sample_zeros(pages: list[Path], readers: Mapping[str, Read], most: int = 4096) -> tuple[int, int]:
    """(zero pages, pages seen) in up to `most` pages spread evenly over these files."""
    total = sum(p.stat().st_size // _PAGE for p in pages)
    step = max(1, total // most)
    zero = seen = 0
    for p in pages:
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            read = readers.get(p.name) or (lambda n, at: os.pread(fd, n, at))  # noqa: B023 - used in this pass
            for i in range(0, p.stat().st_size // _PAGE, step):
                zero += read(_PAGE, i * _PAGE) == _ZERO
                seen += 1
        finally:
            os.close(fd)
    return zero, seen
