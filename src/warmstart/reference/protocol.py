"""The OpenAI API as the reference worker speaks it: requests checked into a Request, responses and stream chunks
in OpenAI's shapes, errors as OpenAI's error body.

Chat messages become one prompt by the reference chat template (the reference tokenizer has none of its own):
each message as "<|ROLE|>\\nCONTENT\\n", then "<|assistant|>\\n" for the reply, e.g.

    <|system|>
    Be brief.
    <|user|>
    Hello
    <|assistant|>

Differences from OpenAI's API: greedy decoding unless `temperature` > 0 (OpenAI's default is 1), and a prompt plus
max_tokens must fit the worker's --max-len. Fields this module does not name are ignored.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

MAX_N = 8  # choices per prompt
MAX_CHOICES = 16  # choices per request (prompts x n): each is decoded in turn, holding the worker
MAX_STOPS = 4
DEFAULT_MAX_TOKENS = 16


class ApiError(Exception):
    """A request the API refuses: its HTTP status and OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def not_found(what: str) -> ApiError:
    return ApiError(404, what, code="not_found")


@dataclass(frozen=True)
class Request:
    chat: bool
    prompts: list[str]  # completions: one or more prompts; chat: the templated conversation
    max_tokens: int
    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage


def chat_prompt(messages: list[dict[str, str]]) -> str:
    """The reference chat template (see the module's docstring)."""
    return "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"


def parse(body: bytes, chat: bool, model_name: str, max_len: int) -> Request:
    """The request in `body` (a POST to /v1/chat/completions if chat, else /v1/completions), or ApiError."""
    req = _json_object(body)
    model = req.get("model")
    if model is not None and model != model_name:
        raise ApiError(404, f"The model `{model}` does not exist: this worker serves `{model_name}`",
                       "model", "model_not_found")
    prompts = [chat_prompt(_messages(req))] if chat else _prompts(req)
    n: int = _int(req, "n", 1, 1, MAX_N)
    if n * len(prompts) > MAX_CHOICES:
        raise ApiError(400, f"{len(prompts)} prompts x n={n} is more than {MAX_CHOICES} choices", "n")
    stream_options = _typed(req, "stream_options", dict, {}) or {}
    return Request(
        chat=chat, prompts=prompts, max_tokens=_max_tokens(req, chat, max_len), n=n,
        temperature=_number(req, "temperature", 0.0, 0.0, 2.0), top_p=_number(req, "top_p", 1.0, 1e-9, 1.0),
        seed=_int(req, "seed", None, -(2**63), 2**64 - 1), stop=_stops(req),
        stream=bool(_typed(req, "stream", bool, False)),
        include_usage=bool(_typed(stream_options, "include_usage", bool, False)),
    )


def check_fits(prompt_tokens: int, max_tokens: int, max_len: int) -> None:
    """ApiError unless the prompt and the completion fit the KV cache together."""
    if prompt_tokens + max_tokens > max_len:
        raise ApiError(400, f"This worker's maximum context length is {max_len} tokens; the prompt has "
                       f"{prompt_tokens} and max_tokens asks for {max_tokens} more: shorten either",
                       "max_tokens", "context_length_exceeded")


def _json_object(body: bytes) -> dict[str, Any]:
    import json

    try:
        req = json.loads(body or b"{}")
    except ValueError as e:  # also bytes that are not UTF-8
        raise ApiError(400, f"The body is not valid JSON: {e}") from None
    if not isinstance(req, dict):
        raise ApiError(400, f"The body must be a JSON object, not {type(req).__name__}")
    return req


def _typed(req: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    value = req.get(key)
    if value is None:
        return default
    # bool is an int in Python, not in JSON
    if not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)):
        raise ApiError(400, f"`{key}` must be {_NAMES.get(kind, kind.__name__)}, not {_json_type(value)}", key)
    return value


_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "an array",
          dict: "an object"}


def _json_type(value: Any) -> str:
    return _NAMES.get(type(value), type(value).__name__)


def _int(req: dict[str, Any], key: str, default: int | None, lo: int, hi: int) -> Any:  # int, or the default
    value = _typed(req, key, int, default)
    if value is not None and not lo <= value <= hi:
        raise ApiError(400, f"`{key}` must be between {lo} and {hi}, not {value}", key)
    return value


def _number(req: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    value = req.get(key)
    if isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    value = _typed({key: value}, key, float, default)
    if not lo <= value <= hi:
        raise ApiError(400, f"`{key}` must be between {lo:g} and {hi:g}, not {value:g}", key)
    return float(value)


def _max_tokens(req: dict[str, Any], chat: bool, max_len: int) -> int:
    key = "max_completion_tokens" if chat and req.get("max_completion_tokens") is not None else "max_tokens"
    value: int = _typed(req, key, int, DEFAULT_MAX_TOKENS)
    if not 1 <= value < max_len:
        raise ApiError(400, f"`{key}` must be between 1 and {max_len - 1} (this worker's --max-len {max_len} "
                       f"holds the prompt and the completion), not {value}", key)
    return value


def _prompts(req: dict[str, Any]) -> list[str]:
    prompt = req.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return prompt
    if prompt is None:
        raise ApiError(400, "`prompt` is required", "prompt")
    raise ApiError(400, "`prompt` must be a string or a non-empty array of strings (token arrays are not "
                   "supported)", "prompt")


def _messages(req: dict[str, Any]) -> list[dict[str, str]]:
    messages = _typed(req, "messages", list, None)
    if not messages:
        raise ApiError(400, "`messages` must be a non-empty array", "messages")
    return [_message(m, i) for i, m in enumerate(messages)]


def _message(m: Any, i: int) -> dict[str, str]:
    param = f"messages[{i}]"
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise ApiError(400, f"`{param}` must be an object with a string `role`", param)
    content = m.get("content")
    if isinstance(content, list):  # content parts: only text ones
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise ApiError(400, f"`{param}.content` may hold only text parts", f"{param}.content")
        content = "".join(p["text"] for p in content)
    if content is not None and not isinstance(content, str):
        raise ApiError(400, f"`{param}.content` must be a string, not {_json_type(content)}", f"{param}.content")
    return {"role": m["role"], "content": content or ""}


def _stops(req: dict[str, Any]) -> list[str]:
    stop = req.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "`stop` must be a non-empty string or an array of them", "stop")
    if len(stops) > MAX_STOPS:
        raise ApiError(400, f"`stop` may hold at most {MAX_STOPS} strings, not {len(stops)}", "stop")
    return stops


@dataclass
class Shaper:
    """Responses and stream chunks of one request, in OpenAI's shapes."""

    chat: bool
    model: str
    id: str = ""
    created: int = 0

    def __post_init__(self) -> None:
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{time.time_ns():x}"
        self.created = int(time.time())

    def _head(self, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def response(self, choices: list[tuple[str, str]], usage: dict[str, int]) -> dict[str, Any]:
        """The whole answer: choices as (text, finish_reason)."""
        return {**self._head(False), "choices": [self._choice(i, text, why, False) for i, (text, why) in
                                                 enumerate(choices)], "usage": usage}

    def chunk(self, index: int, text: str | None, finish_reason: str | None) -> dict[str, Any]:
        """A stream chunk of one choice: text None opens a chat choice (its role), finish_reason ends it."""
        return {**self._head(True), "choices": [self._choice(index, text, finish_reason, True)]}

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        return {**self._head(True), "choices": [], "usage": usage}

    def _choice(self, index: int, text: str | None, why: str | None, chunk: bool) -> dict[str, Any]:
        if not self.chat:
            return {"index": index, "text": text or "", "finish_reason": why, "logprobs": None}
        if not chunk:
            message = {"role": "assistant", "content": text}
            return {"index": index, "message": message, "finish_reason": why, "logprobs": None}
        delta = {"role": "assistant", "content": ""} if text is None else {"content": text} if text else {}
        return {"index": index, "delta": delta, "finish_reason": why, "logprobs": None}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
