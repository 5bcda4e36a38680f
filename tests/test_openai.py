"""The reference worker through the official `openai` client: completions and chat, streamed and not, stop, n,
seed, errors, finish_reason and usage, on a cold worker and on a replica restored from its checkpoint."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import openai
import pytest

from conftest import cli, free_port, http_get
from warmstart.reference.textstream import TextStream

pytestmark = [pytest.mark.criu, pytest.mark.slow]

MODEL = "warmstart-reference"
PROMPT = "The fastest way to start an inference worker is"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Start fast."}]


def _client(port: int) -> Any:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)


def _streamed_completion(c: Any, **kw: Any) -> tuple[dict[int, str], dict[int, str]]:
    """(text, finish_reason) by choice index, assembled from the chunks."""
    texts: dict[int, str] = {}
    why: dict[int, str] = {}
    for chunk in c.completions.create(model=MODEL, stream=True, **kw):
        for ch in chunk.choices:
            texts[ch.index] = texts.get(ch.index, "") + ch.text
            if ch.finish_reason:
                why[ch.index] = ch.finish_reason
    return texts, why


def _streamed_chat(c: Any, **kw: Any) -> tuple[str, str | None, Any]:
    """(text, finish_reason, usage) of a streamed chat completion of one choice."""
    text, why, usage = "", None, None
    for chunk in c.chat.completions.create(model=MODEL, messages=CHAT, stream=True,
                                           stream_options={"include_usage": True}, **kw):
        usage = chunk.usage or usage
        for ch in chunk.choices:
            text += ch.delta.content or ""
            why = ch.finish_reason or why
    return text, why, usage


def _answers(port: int) -> dict[str, Any]:
    """What the worker answers to a fixed set of requests, streamed and not (compared across a restore)."""
    c = _client(port)
    greedy = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24)
    chat = c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=20, temperature=0)
    sampled = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0.9, seed=7, n=2)
    return {
        "greedy": greedy.choices[0].text,
        "greedy_streamed": _streamed_completion(c, prompt=PROMPT, max_tokens=24)[0][0],
        "chat": chat.choices[0].message.content,
        "chat_streamed": _streamed_chat(c, max_tokens=20)[0],
        "sampled": [ch.text for ch in sampled.choices],
        "sampled_streamed": _streamed_completion(c, prompt=PROMPT, max_tokens=16, temperature=0.9, seed=7, n=2)[0],
    }


def _check_completions(c: Any) -> str:
    r = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24)
    (choice,) = r.choices
    assert choice.finish_reason == "length" and r.object == "text_completion" and r.model == MODEL
    assert r.usage.completion_tokens == 24 and r.usage.prompt_tokens == len(PROMPT.encode())  # byte-level BPE
    assert r.usage.total_tokens == r.usage.prompt_tokens + 24
    texts, why = _streamed_completion(c, prompt=PROMPT, max_tokens=24)
    assert texts == {0: choice.text} and why == {0: "length"}
    return str(choice.text)


def _check_stop(c: Any, greedy: str) -> None:
    stop = greedy[6:9]
    cut = greedy.index(stop)
    r = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, stop=[stop, "never appears"])
    assert r.choices[0].text == greedy[:cut] and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 24
    texts, why = _streamed_completion(c, prompt=PROMPT, max_tokens=24, stop=stop)
    assert texts == {0: greedy[:cut]} and why == {0: "stop"}


def _check_chat(c: Any) -> None:
    r = c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=20)
    (choice,) = r.choices
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert r.object == "chat.completion" and r.usage.completion_tokens == 20
    template = "<|system|>\nBe brief.\n<|user|>\nStart fast.\n<|assistant|>\n"
    assert r.usage.prompt_tokens == len(template.encode())
    text, why, usage = _streamed_chat(c, max_tokens=20)
    assert (text, why) == (choice.message.content, "length")
    assert usage.completion_tokens == 20 and usage.prompt_tokens == r.usage.prompt_tokens


def _check_sampling(c: Any, greedy: str) -> None:
    def sample(**kw: Any) -> list[str]:
        r = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0.9, **kw)
        return [ch.text for ch in sorted(r.choices, key=lambda ch: ch.index)]

    a = sample(seed=7, n=3)
    assert len(a) == 3 and len(set(a)) > 1  # n choices, drawn one after another from one generator
    assert sample(seed=7, n=3) == a  # the same seed, the same draws
    assert sample(seed=8, n=3) != a
    assert _streamed_completion(c, prompt=PROMPT, max_tokens=16, temperature=0.9, seed=7, n=3)[0] == dict(enumerate(a))
    greedy_n = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, n=2)
    assert [ch.text for ch in greedy_n.choices] == [greedy, greedy]


def _check_errors(c: Any) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="gpt-4o", prompt=PROMPT)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="gpt-4o", messages=CHAT)
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("gpt-4o")
    for bad in [{"max_tokens": 0}, {"max_tokens": -3}, {"max_tokens": 10_000}, {"n": 0}, {"n": 99},
                {"temperature": "hot"}, {"stop": ""}, {"prompt": 3}]:
        with pytest.raises(openai.BadRequestError) as err:
            c.completions.create(**{"model": MODEL, "prompt": PROMPT, **bad})
        assert err.value.body["type"] == "invalid_request_error" and err.value.body["message"], bad
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model=MODEL, messages=[], max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model=MODEL, prompt="x" * 250, max_tokens=10)  # 260 tokens: over --max-len 256


def test_openai_client_against_a_cold_worker_and_its_restored_replica(need_criu, home: Path,
                                                                      tmp_path: Path) -> None:
    port = free_port()
    r = cli("run", "--name", "oai", "--wait", "--json", "--", sys.executable, "-m", "warmstart.reference.server",
            "--port", str(port))
    assert r.returncode == 0, r.stderr
    cold = {"status": "ok", "model": MODEL, "name": "oai", "restored": False, "replica": None, "port": port,
            "pid": json.loads(r.stdout)["pid"], "device": "cpu", "max_len": 256}
    assert json.loads(http_get(port, "/health")) == cold
    c = _client(port)
    assert [m.id for m in c.models.list()] == [MODEL] and c.models.retrieve(MODEL).id == MODEL
    greedy = _check_completions(c)
    _check_stop(c, greedy)
    _check_chat(c)
    _check_sampling(c, greedy)
    _check_errors(c)
    before = _answers(port)
    assert before["greedy_streamed"] == before["greedy"] and before["chat_streamed"] == before["chat"]
    assert before["sampled_streamed"] == dict(enumerate(before["sampled"]))

    r = cli("checkpoint", "oai", "-o", str(tmp_path / "art"), "--leave-running")
    assert r.returncode == 0, r.stderr
    assert json.loads(http_get(port, "/health")) == cold  # resumed where it was: still the same worker
    r = cli("restore", str(tmp_path / "art"), "--name", "oai-rep", "--json")
    assert r.returncode == 0, r.stderr
    (rep,) = json.loads(r.stdout)["replicas"]
    assert _answers(rep["port"]) == before
    # What a user of the replica can act on: its own name and index, and the host port that reaches it.
    assert json.loads(http_get(rep["port"], "/health")) == {**cold, "name": "oai-rep", "restored": True,
                                                             "replica": 0, "port": rep["port"]}


def test_streamed_text_waits_for_whole_characters_and_stop_strings() -> None:
    """Tokens that split a UTF-8 character or a stop string: nothing is released that a later token changes."""
    def detokenize(ids: list[int]) -> str:  # one byte a token
        return bytes(ids).decode(errors="replace")

    data = "añb STOP c".encode()
    text = TextStream(detokenize, ["STOP"])
    pieces = list(text.run(iter(data)))
    assert "".join(pieces) == text.text == "añb " and text.finish_reason == "stop"
    assert all("\ufffd" not in p for p in pieces) and len(text.ids) == len("añb STOP".encode())
    text = TextStream(detokenize, ["STOPPED"])
    assert "".join(text.run(iter(data))) == text.text == "añb STOP c" and text.finish_reason == "length"
