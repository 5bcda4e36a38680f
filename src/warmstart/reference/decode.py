"""Decoding of a Llama model (greedy, or sampled) with its KV cache in one caller-owned buffer, as engines do.

Plain tensors by their checkpoint names, no transformers modules (a smaller process to checkpoint). The
cache is a fixed-size tensor the worker can release on quiesce and map again on resume (on GPU: a CUDA
virtual-memory region, see warmstart.gpumem.region). Every decode step has static shapes (the attention
runs over the whole cache with a mask), so on GPU the one-token step is captured once as a CUDA graph and
replayed; the prompt runs in one pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any, Required, TypedDict

Pick = Callable[[Any], int]  # the next token from the last position's logits (a float32 (1, vocab) tensor)


class LlamaConfig(TypedDict, total=False):
    """What decoding reads of a model's config.json (Hugging Face's names; the file holds more)."""

    num_hidden_layers: Required[int]
    num_attention_heads: Required[int]
    num_key_value_heads: Required[int]
    hidden_size: Required[int]
    rms_norm_eps: Required[float]
    head_dim: int | None  # default: hidden_size // num_attention_heads
    rope_theta: float | None  # older configs; newer ones keep it in rope_parameters
    rope_parameters: dict[str, Any] | None


def cache_bytes(config: LlamaConfig, max_len: int, dtype_bytes: int) -> int:
    """Bytes of K and V for every layer at max_len positions (config: the model's config.json)."""
    return 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * max_len * _head_dim(config) * dtype_bytes


def _head_dim(config: LlamaConfig) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _rope_theta(config: LlamaConfig) -> float:
    theta = config.get("rope_theta")
    if theta is None:
        theta = (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    return float(theta)


class Decoder:
    def __init__(self, weights: dict[str, Any], config: LlamaConfig, cache: Any, max_len: int,
                 use_graph: bool) -> None:
        """`weights`: a Llama checkpoint's tensors by name; `cache`: a tensor of >= cache_bytes(...) bytes."""
        import torch

        self.torch = torch
        self.w = weights
        self.layers = config["num_hidden_layers"]
        self.lm_head = weights["lm_head.weight"]
        self.dtype = self.lm_head.dtype
        self.device = self.lm_head.device
        self.max_len = max_len
        self.hd = _head_dim(config)
        self.nh, self.kvh = config["num_attention_heads"], config["num_key_value_heads"]
        self.eps = config["rms_norm_eps"]
        n = cache_bytes(config, max_len, self.lm_head.element_size())
        flat = cache.view(torch.uint8).reshape(-1)[:n].view(self.dtype)
        self.cache = flat.view(2, self.layers, self.kvh, max_len, self.hd)
        even = torch.arange(0, self.hd, 2, dtype=torch.float32, device=self.device)
        inv = 1.0 / (_rope_theta(config) ** (even / self.hd))
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float32, device=self.device), inv)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos, self.sin = emb.cos(), emb.sin()
        self.positions = torch.arange(max_len, device=self.device)
        # The step's inputs and output live in fixed tensors, so a captured graph can be replayed.
        self.token = torch.zeros(1, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self.next = torch.zeros(1, dtype=torch.long, device=self.device)
        self.last = torch.zeros(1, self.lm_head.shape[0], dtype=torch.float32, device=self.device)  # its logits
        self.graph: Any = None  # torch.cuda.CUDAGraph, once captured
        if use_graph:
            self._capture()

    def _norm(self, x: Any, w: Any) -> Any:
        x32 = x.float()
        return w * (x32 * self.torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(self.dtype)

    def _rope(self, x: Any, cos: Any, sin: Any) -> Any:
        half = x.shape[-1] // 2
        rotated = self.torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return (x.float() * cos + rotated.float() * sin).to(self.dtype)

    def _logits(self, tokens: Any, pos: Any) -> Any:
        """Tokens at positions `pos` (n of each): write their K/V into the cache, return the last one's logits."""
        torch, w, linear = self.torch, self.w, self.torch.nn.functional.linear
        n = tokens.shape[0]
        x = torch.nn.functional.embedding(tokens, w["model.embed_tokens.weight"])  # (n, H)
        cos, sin = self.cos[pos].unsqueeze(1), self.sin[pos].unsqueeze(1)  # (n, 1, hd)
        masked = (self.positions.view(1, -1) > pos.view(-1, 1)).view(1, 1, n, -1)  # causal, over the whole cache
        group = self.nh // self.kvh
        for i in range(self.layers):
            p = f"model.layers.{i}."
            h = self._norm(x, w[p + "input_layernorm.weight"])
            q = self._rope(linear(h, w[p + "self_attn.q_proj.weight"]).view(n, self.nh, self.hd), cos, sin)
            k = self._rope(linear(h, w[p + "self_attn.k_proj.weight"]).view(n, self.kvh, self.hd), cos, sin)
            v = linear(h, w[p + "self_attn.v_proj.weight"]).view(n, self.kvh, self.hd)
            self.cache[0, i].index_copy_(1, pos, k.transpose(0, 1))
            self.cache[1, i].index_copy_(1, pos, v.transpose(0, 1))
            keys, values = self.cache[0, i].unsqueeze(1), self.cache[1, i].unsqueeze(1)  # (kvh, 1, T, hd)
            q = q.view(n, self.kvh, group, self.hd).permute(1, 2, 0, 3)  # (kvh, group, n, hd)
            scores = torch.matmul(q, keys.transpose(2, 3)).float() / math.sqrt(self.hd)
            probs = torch.softmax(scores.masked_fill(masked, float("-inf")), dim=-1).to(self.dtype)
            attn = torch.matmul(probs, values).permute(2, 0, 1, 3).reshape(n, self.nh * self.hd)
            x = x + linear(attn, w[p + "self_attn.o_proj.weight"])
            h = self._norm(x, w[p + "post_attention_layernorm.weight"])
            gate = torch.nn.functional.silu(linear(h, w[p + "mlp.gate_proj.weight"]))
            x = x + linear(gate * linear(h, w[p + "mlp.up_proj.weight"]), w[p + "mlp.down_proj.weight"])
        return linear(self._norm(x[-1:], w["model.norm.weight"]), self.lm_head).float()

    def _step(self) -> None:
        logits = self._logits(self.token, self.pos)
        self.last.copy_(logits)
        self.next.copy_(logits.argmax(dim=-1))

    def _capture(self) -> None:
        torch = self.torch
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):  # warm-up outside capture: lazy kernel loads and cuBLAS handles
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(self.graph):
            self._step()
        torch.cuda.synchronize()

    def run_step(self, token: int, pos: int) -> int:
        self.token.fill_(token)
        self.pos.fill_(pos)
        if self.graph is not None:
            self.graph.replay()
        else:
            with self.torch.inference_mode():
                self._step()
        return int(self.next.item())

    def fit(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        """The prompt's last tokens that leave room for max_new_tokens in the cache (ValueError if none do)."""
        if not prompt_ids:
            raise ValueError("empty prompt")
        keep = self.max_len - max_new_tokens
        if keep < 1:
            raise ValueError(f"max_tokens {max_new_tokens} does not fit the {self.max_len}-token cache")
        return prompt_ids[-keep:]

    def tokens(self, prompt_ids: list[int], max_new_tokens: int, pick: Pick | None = None) -> Iterator[int]:
        """The continuation, one token at a time: the prompt in one pass, then one (graphed) step per token.
        pick: chooses each token from the logits (a sampler); None: greedy (the argmax)."""
        ids = self.fit(prompt_ids, max_new_tokens)
        torch = self.torch
        with torch.inference_mode():
            logits = self._logits(torch.tensor(ids, device=self.device), self.positions[: len(ids)])
            token = int(logits.argmax(dim=-1).item()) if pick is None else pick(logits)
        yield token
        for pos in range(len(ids), len(ids) + max_new_tokens - 1):
            greedy = self.run_step(token, pos)
            if pick is None:
                token = greedy
            else:
                with torch.inference_mode():
                    token = pick(self.last)
            yield token

    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation of max_new_tokens (the prompt cut from the left to fit the cache)."""
        return list(self.tokens(prompt_ids, max_new_tokens))


def sampler(temperature: float, top_p: float, generator: Any) -> Pick:
    """Sampling at `temperature` from the smallest set of tokens whose probability reaches top_p (nucleus),
    drawn with `generator` (a torch.Generator on the logits' device: seeded, the draws repeat)."""
    import torch

    def pick(logits: Any) -> int:
        probs = torch.softmax(logits / temperature, dim=-1)
        if top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p  # the most likely token always stays
            probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
        return int(torch.multinomial(probs, 1, generator=generator).item())

    return pick
