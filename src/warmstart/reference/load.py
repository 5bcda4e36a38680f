"""The reference worker's weights and tokenizer, loaded without transformers (a smaller process to dump).

On GPU every tensor lives in one kept GpuRegion laid out as warmstart.weights.layout places the files, so on
quiesce the weights leave the CUDA checkpoint for a file of the artifact (bf16 packed into 3/4 of the bytes)
and come back at PCIe speed on resume (warmstart.gpumem.region). On CPU they are ordinary tensors.
"""

from __future__ import annotations

import ctypes
import glob
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from warmstart.reference.decode import LlamaConfig
from warmstart.weights.layout import DTYPES, Layout, plan

if TYPE_CHECKING:
    from warmstart.gpumem.region import GpuRegion

_PIECE = 64 << 20


def config(model_dir: str) -> LlamaConfig:
    cfg: LlamaConfig = json.loads((Path(model_dir) / "config.json").read_text())
    return cfg


def tokenizer(model_dir: str) -> Any:  # -> tokenizers.Tokenizer
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))


def weights(model_dir: str, device: str, dtype: str, pack: bool = True) -> tuple[dict[str, Any], GpuRegion | None]:
    """(name -> tensor, the GpuRegion holding them or None). pack: bf16 weights are saved packed
    (warmstart.gpumem.bf16pack)."""
    import torch

    files = sorted(glob.glob(f"{model_dir}/*.safetensors"))
    if not files:
        raise SystemExit(f"no *.safetensors in {model_dir}: pass --model a Hugging Face model directory")
    layout = plan([Path(f) for f in files])
    stored = {DTYPES.get(t.dtype) for t in layout.tensors}
    if device.startswith("cuda") and stored == {dtype}:
        return _into_region(layout, torch.device(device).index or 0, torch, pack and dtype == "bfloat16")
    if device.startswith("cuda"):
        print(f"reference worker: converting {sorted(map(str, stored))} weights to {dtype}: they stay in the "
              "CUDA checkpoint (build the model in that dtype to keep them out of it)", file=sys.stderr)
    from safetensors.torch import load_file

    out: dict[str, Any] = {}
    for f in files:
        out.update({k: v.to(device=device, dtype=getattr(torch, dtype)) for k, v in load_file(f).items()})
    return out, None


def _into_region(layout: Layout, index: int, torch: Any, pack: bool) -> tuple[dict[str, Any], GpuRegion]:
    from warmstart.gpumem import hostcopy, vmm
    from warmstart.gpumem.region import GpuRegion

    region = GpuRegion(layout.size, index, keep=True, pack_bf16=pack)
    d = vmm.driver()
    buf = hostcopy.alloc(_PIECE)
    view = memoryview((ctypes.c_char * _PIECE).from_address(buf)).cast("B")
    try:
        for part in layout.files:
            fd = os.open(part.path, os.O_RDONLY)
            try:
                done = 0
                while done < part.size:
                    n = os.preadv(fd, [view[: min(_PIECE, part.size - done)]], part.data_start + done)
                    if n <= 0:
                        raise OSError(f"{part.path} ended early (truncated?)")
                    vmm.ok(d.cuMemcpyHtoD(region.ptr + part.offset + done, buf, n), "cuMemcpyHtoD")
                    done += n
            finally:
                os.close(fd)
    finally:
        view.release()
        hostcopy.free(buf, _PIECE)
    return layout.views(region.tensor(torch), torch), region
