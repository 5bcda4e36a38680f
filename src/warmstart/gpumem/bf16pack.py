"""Lossless packing of bf16 data, a piece at a time, on whatever device the piece is on (torch).

A bf16 value is one byte of mantissa (with the exponent's lowest bit) and one byte of sign and exponent. In
model weights that high byte takes few values: the exponents of nearly all weights of a tensor fall within
a few octaves. A packed piece keeps every low byte as it is and codes each high byte in four bits (its sign
and its exponent's offset from a base chosen for the piece); the rare value outside the 8 offsets is an
escape, stored with its index. That is 12 bits per value instead of 16, three quarters of the bytes to write,
read from disk and copy over PCIe. unpack() here is the reference, a dozen torch operations; a restore
unpacks with one kernel launch per piece (warmstart.gpumem.bf16kernel).

Any bytes round-trip: a piece that would not get smaller (not bf16, or too many escapes) is left raw.
Layout of a packed piece of n bytes (n/2 values), little-endian:
    low bytes (n/2) | codes, two per byte, the even value's in the low nibble (n/4) |
    escape indices, int32 (4e) | escape high bytes (e)
"""

from __future__ import annotations

from typing import Any, NamedTuple

_ALIGN = 16  # packed pieces keep the escape indices 4-byte aligned
_WINDOW = 8  # high-byte values a code reaches, per sign


class Plan(NamedTuple):
    base: int  # the lowest exponent (its top 7 bits) a code reaches
    escapes: int  # values outside the window, stored with their index


def packed_size(nbytes: int, escapes: int) -> int:
    return nbytes // 2 + nbytes // 4 + 5 * escapes


def plan(piece: Any) -> Plan | None:
    """How to pack a uint8 tensor of bf16 values; None when packing would not make it smaller."""
    import torch

    n = piece.numel()
    if n == 0 or n % _ALIGN:
        return None
    high = piece.view(-1, 2)[:, 1] & 0x7F
    counts = torch.bincount(high, minlength=128).cpu()
    reached = counts.unfold(0, _WINDOW, 1).sum(1)  # values each base's window reaches
    base = int(reached.argmax())
    escapes = n // 2 - int(reached[base])
    if packed_size(n, escapes) >= n:
        return None
    return Plan(base, escapes)


def pack(piece: Any, p: Plan, out: Any) -> None:
    """Write the packed form of piece (uint8, as plan() saw it) into the first packed_size() bytes of out."""
    import torch

    half = piece.numel() // 2
    pairs = piece.view(-1, 2)
    high = pairs[:, 1]
    out[:half].copy_(pairs[:, 0])
    offset = (high & 0x7F) - p.base  # uint8: below the base wraps round to above the window too
    codes = ((high >> 7) << 3) | (offset & 7)
    codes = codes.view(-1, 2)
    out[half: half + half // 2] = codes[:, 0] | (codes[:, 1] << 4)
    if p.escapes:
        at = torch.nonzero(offset >= _WINDOW).flatten()
        if at.numel() != p.escapes:
            raise RuntimeError(f"a GPU region changed while it was being saved ({at.numel()} escapes, planned "
                               f"{p.escapes}); quiesce the worker before its regions are released")
        start = half + half // 2
        out[start: start + 4 * p.escapes].view(torch.int32).copy_(at.to(torch.int32))
        out[start + 4 * p.escapes: packed_size(2 * half, p.escapes)].copy_(high[at])


def unpack(packed: Any, p: Plan, piece: Any) -> None:
    """Fill piece (uint8, n bytes) from its packed form (the first packed_size(n, p.escapes) bytes of packed)."""
    import torch

    half = piece.numel() // 2
    pairs = piece.view(-1, 2)
    pairs[:, 0].copy_(packed[:half])
    two = packed[half: half + half // 2]
    codes = torch.stack((two & 15, two >> 4), 1).view(-1)
    # code = 8 * sign + offset  ->  high = 128 * sign + base + offset = code + 15 * (code & 8) + base
    high = codes + (codes & 8) * 15 + p.base
    pairs[:, 1].copy_(high)
    if p.escapes:
        start = half + half // 2
        at = packed[start: start + 4 * p.escapes].view(torch.int32).long()
        pairs[:, 1].index_put_((at,), packed[start + 4 * p.escapes: packed_size(2 * half, p.escapes)])
