"""bf16 packing (warmstart.gpumem.bf16pack) and the packed file's layout (warmstart.gpumem.filecopy), on the CPU:
the same torch code a GPU region runs, with the file written and read the way filecopy does, less the DMA."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from warmstart.gpumem import bf16pack, filecopy  # noqa: E402

PIECE = 1 << 20


def weights(n_values: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n_values, generator=g) * 0.02).to(torch.bfloat16)
    # What a window of eight exponents cannot reach: zero, norms of 1, NaN, infinities, huge and tiny values.
    w[:4096] = 1.0
    w[5000:5010] = torch.tensor([0.0, -0.0, float("nan"), float("inf"), float("-inf"), 3e38, -1e-38, 1e-30,
                                 65504.0, -2.0])
    return w.view(torch.uint8)


def write(path: Path, region: torch.Tensor) -> None:
    n = region.numel()
    plans = [bf16pack.plan(region[at: at + PIECE]) for at in range(0, n, PIECE)]
    pieces = filecopy.packed_pieces(n, PIECE, plans)
    with open(path, "wb") as f:
        f.write(filecopy.header(n, PIECE, pieces))
        for p in pieces:
            out = torch.empty(p.length, dtype=torch.uint8)
            if p.plan:
                bf16pack.pack(region[p.at: p.at + p.n], p.plan, out)
            else:
                out.copy_(region[p.at: p.at + p.n])
            assert f.tell() == p.file_at
            f.write(out.numpy().tobytes())


def read(path: Path, n: int) -> torch.Tensor:
    fd = os.open(path, os.O_RDONLY)
    try:
        pieces = filecopy.read_layout(fd, os.fstat(fd).st_size, n, str(path))
        region = torch.empty(n, dtype=torch.uint8)
        for p in pieces:
            stored = torch.frombuffer(bytearray(os.pread(fd, p.length, p.file_at)), dtype=torch.uint8)
            if p.plan:
                bf16pack.unpack(stored, p.plan, region[p.at: p.at + p.n])
            else:
                region[p.at: p.at + p.n] = stored
        return region
    finally:
        os.close(fd)


def test_weights_pack_into_three_quarters_and_come_back_bit_for_bit(tmp_path: Path) -> None:
    # Three pieces of weights, one of random bytes (left raw), and a short last piece of weights.
    region = torch.cat([weights(3 * PIECE // 2), torch.randint(0, 256, (PIECE,), dtype=torch.uint8),
                        weights(PIECE // 4, seed=1)])
    path = tmp_path / "region.bf16p"
    write(path, region)
    plans = [p.plan for p in filecopy.read_layout(os.open(path, os.O_RDONLY), path.stat().st_size,
                                                  region.numel(), str(path))]
    assert [p is not None for p in plans] == [True, True, True, False, True]
    assert plans[0].escapes >= 10  # the odd values, beyond the window (which reaches the norms of 1)
    assert path.stat().st_size < 0.77 * 4 * PIECE + PIECE + PIECE // 4
    assert torch.equal(read(path, region.numel()), region)


def test_what_would_not_shrink_stays_raw() -> None:
    assert bf16pack.plan(torch.randint(0, 256, (PIECE,), dtype=torch.uint8)) is None  # not bf16
    assert bf16pack.plan(weights(PIECE // 2)[:PIECE - 8]) is None  # not whole 16-byte groups
    octaves = torch.rand(PIECE // 2, generator=torch.Generator().manual_seed(0)) * 120 - 60
    spread = torch.exp2(octaves).to(torch.bfloat16)  # exponents spread over 120 octaves
    assert bf16pack.plan(spread.view(torch.uint8)) is None
    p = bf16pack.plan(torch.full((PIECE // 2,), 0.5, dtype=torch.bfloat16).view(torch.uint8))
    assert p is not None and p.escapes == 0


def test_a_piece_that_changes_after_planning_is_refused() -> None:
    piece = weights(PIECE // 2)
    p = bf16pack.plan(piece)
    piece.view(torch.bfloat16)[100:200] = 1e30
    with pytest.raises(RuntimeError, match="changed while it was being saved"):
        bf16pack.pack(piece, p, torch.empty(PIECE, dtype=torch.uint8))


@pytest.mark.parametrize("damage", ["truncated", "magic", "other region", "table"])
def test_a_damaged_or_foreign_packed_file_is_refused(tmp_path: Path, damage: str) -> None:
    region = weights(PIECE)  # two pieces
    path = tmp_path / "region.bf16p"
    write(path, region)
    n = region.numel()
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        del data[-4096:]
    elif damage == "magic":
        data[:8] = b"NOTPACKD"
    elif damage == "other region":
        n += PIECE
    else:
        data[32 + 16 + 8: 32 + 16 + 12] = (12345).to_bytes(4, "little")  # the second piece's escapes
    path.write_bytes(bytes(data))
    with pytest.raises(OSError, match="truncated or foreign"):
        read(path, n)
