"""The reference model: created locally and deterministically (fixed seed, safetensors), never downloaded.

A Hugging Face model directory (config.json, model.safetensors, tokenizer.json): any engine that loads
Llama checkpoints (transformers, vLLM) can serve it. The tokenizer is byte-level BPE over the 256 byte
symbols with no merges, so it needs no training data and is identical on every machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from warmstart.reference import modelcache


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 4  # head_dim 64: vLLM's CPU attention rejects smaller heads
    num_key_value_heads: int = 2
    vocab_size: int = 512
    max_position_embeddings: int = 2048
    seed: int = 0
    # Wider than transformers' 0.02 so that greedy decoding of random weights does not settle into one
    # repeated token: a restore that changed any state then shows in the completion.
    init_std: float = 0.2

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


TINY = ModelShape()
# The GPU benchmark's shapes (random bf16 weights): TinyLlama-1.1B and Llama-3-8B.
LLAMA_1B = ModelShape(2048, 5632, 22, 32, 4, 32000, 2048, init_std=0.02)
LLAMA_8B = ModelShape(4096, 14336, 32, 32, 8, 128256, 8192, init_std=0.02)


def _tokenizer(vocab_size: int) -> Any:  # PreTrainedTokenizerFast (imported lazily: transformers is heavy)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for s in ["<s>", "</s>", "<unk>"]:
        vocab[s] = len(vocab)
    # Every id the model can emit decodes to visible text, so completions of random weights compare.
    for i in range(len(vocab), vocab_size):
        vocab[f"<t{i}>"] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def build(out: Path, shape: ModelShape = TINY, dtype: str = "float32", device: str = "cpu") -> Path:
    """Write the model directory (atomically) and return it. device="cuda" initialises 8B in seconds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    config = LlamaConfig(
        hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers, num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads, vocab_size=shape.vocab_size,
        max_position_embeddings=shape.max_position_embeddings, bos_token_id=256, eos_token_id=257,
        tie_word_embeddings=False, torch_dtype=dtype, initializer_range=shape.init_std,
    )
    torch.manual_seed(shape.seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))  # initialise in the target dtype: no float32 copy
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(tmp, safe_serialization=True)
    _tokenizer(shape.vocab_size).save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, out)
    except OSError:  # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def ensure(shape: ModelShape = TINY, dtype: str = "float32", device: str = "cpu") -> Path:
    """The model's directory in the model cache, built if missing; making it removes the least recently used
    others if the cache is then over WARMSTART_MODEL_CACHE_MB (warmstart.reference.modelcache)."""
    out = modelcache.root() / f"reference-{shape.key()}-{dtype}"
    if (out / "config.json").is_file():
        modelcache.touch(out)
        return out
    limit = modelcache.limit_mb(os.environ)  # a bad value fails now, not after the build
    build(out, shape, dtype, device)
    modelcache.prune(keep=out, limit=limit)
    return out
