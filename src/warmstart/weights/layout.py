"""Where every tensor of a set of safetensors files lives in one contiguous weight blob.

Each file's data section is placed whole, at a 2 MiB-aligned offset (huge pages; the GPU's mapping
granularity divides it), in the order of the sorted file names; a tensor's place is its file's base plus its
offset inside the data section. Stdlib only: the layout travels to workers as JSON.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ALIGN = 2 << 20
DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64",
          "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str  # safetensors dtype: F32, BF16, F16, I64, ...
    shape: list[int]
    offset: int  # in the blob
    nbytes: int


@dataclass(frozen=True)
class FilePart:
    path: str
    data_start: int  # where the data section starts in the file (8 + header length)
    size: int  # bytes of the data section
    offset: int  # where it goes in the blob


@dataclass(frozen=True)
class Layout:
    files: list[FilePart]
    tensors: list[Tensor]
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"files": [asdict(f) for f in self.files], "tensors": [asdict(t) for t in self.tensors],
                "size": self.size}

    def views(self, blob: Any, torch: Any) -> dict[str, Any]:
        """Every tensor of the set as a view into blob, a torch uint8 tensor over the whole layout (no copy)."""
        return {t.name: blob[t.offset : t.offset + t.nbytes].view(getattr(torch, DTYPES[t.dtype])).view(t.shape)
                for t in self.tensors}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Layout:
        return cls([FilePart(**f) for f in d["files"]], [Tensor(**t) for t in d["tensors"]], int(d["size"]))


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(data section start, header dict) of a safetensors file; ValueError if it is not one."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 << 20:
            raise ValueError(f"{path} is not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not a safetensors file ({e})") from None
    return 8 + n, header


def plan(paths: list[Path]) -> Layout:
    files: list[FilePart] = []
    tensors: list[Tensor] = []
    offset = 0
    for path in sorted(paths, key=lambda p: p.name):
        start, header = read_header(path)
        size = path.stat().st_size - start
        files.append(FilePart(str(path), start, size, offset))
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            a, b = meta["data_offsets"]
            tensors.append(Tensor(name, meta["dtype"], list(meta["shape"]), offset + a, b - a))
        offset = _align(offset + size)
    return Layout(files, tensors, max(offset, ALIGN))
