"""What warmstart needs to know about an inference engine it did not write, spoken over the engine's HTTP API.

An adapter knows how to start the engine checkpointable (environment), which of its paths each replica must
get fresh (per-replica unix-socket directories), how to tell it is warm (health, then one real completion),
and how to quiesce and resume it around a checkpoint. The engine itself is never modified.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from warmstart import paths
from warmstart.errors import EngineHTTPError, WorkerError

HTTP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Quiesced:
    """What a quiesce did, so that the matching resume can undo exactly that."""

    kv_released: bool = False


def call(port: int, method: str, path: str, body: Any = None, timeout_s: float = HTTP_TIMEOUT_S) -> Any:
    """One request to the engine on 127.0.0.1:port; the JSON answer (or None for an empty body)."""
    data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")[:300].strip()
        raise EngineHTTPError(f"{method} {path} on port {port} answered {e.code}: {detail or e.reason}",
                              "see the engine's log") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise EngineHTTPError(f"{method} {path} on port {port} failed: {reason}",
                              "check the engine is running and serving on that port") from None
    return json.loads(raw) if raw.strip() else None


def socket_dir(worker_dir: Path, name: str) -> Path:
    """A directory for an engine's unix sockets, short enough for their 107-byte path limit (+ a 36-char uuid)."""
    d = worker_dir / name
    if len(str(d)) > 60:
        d = Path(tempfile.gettempdir()) / f"warmstart-{hashlib.sha256(str(d).encode()).hexdigest()[:12]}"
    # Its name is predictable in a shared /tmp: one someone else made (or a symlink) is refused, not used.
    return paths.private_dir(d, "WARMSTART_HOME (or TMPDIR)")


def flag_value(command: list[str], flag: str) -> str | None:
    """The value of `--flag V` or `--flag=V` in an engine's command line."""
    for i, arg in enumerate(command):
        if arg == flag and i + 1 < len(command):
            return command[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


class Engine:
    """An adapter; subclasses fill in the engine's specifics."""

    name = "engine"
    default_port = 8000
    health_path = "/health"

    def env(self, worker_dir: Path) -> dict[str, str]:
        """Environment that makes the engine checkpointable (added to the caller's)."""
        return {}

    def private_dirs(self, env: dict[str, str]) -> list[str]:
        """Directories (from the environment the engine runs with) each replica gets empty and its own."""
        return []

    def port(self, command: list[str]) -> int:
        value = flag_value(command, "--port")
        return int(value) if value else self.default_port

    def uses_gpu_release(self, command: list[str]) -> bool:
        """Whether the engine was started able to release its KV cache on request."""
        return False

    def model(self, port: int) -> str:
        """The served model's name, from the OpenAI-compatible /v1/models."""
        data = call(port, "GET", "/v1/models")
        models = (data or {}).get("data") or []
        if not models:
            raise WorkerError(f"{self.name} on port {port} serves no model", "see the engine's log")
        return str(models[0]["id"])

    def complete(self, port: int, prompt: str, max_tokens: int = 16, timeout_s: float = HTTP_TIMEOUT_S) -> str:
        """One greedy completion through the OpenAI-compatible API."""
        body = {"model": self.model(port), "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        data = call(port, "POST", "/v1/completions", body, timeout_s=timeout_s)
        try:
            return str(data["choices"][0]["text"])
        except (TypeError, KeyError, IndexError):
            raise WorkerError(f"{self.name} on port {port} answered a completion without text: {str(data)[:200]}",
                              "see the engine's log") from None

    def healthy(self, port: int) -> bool:
        try:
            call(port, "GET", self.health_path, timeout_s=5)
            return True
        except WorkerError:
            return False

    def wait_healthy(self, port: int, timeout_s: float, alive: Any = None, stop: Any = None) -> None:
        """Wait until the health endpoint answers; `alive()` returning False stops the wait early, and `stop()`
        raises to end it (a cancel)."""
        deadline = time.monotonic() + timeout_s
        while not self.healthy(port):
            if stop is not None:
                stop()
            if alive is not None and not alive():
                raise WorkerError(f"{self.name} exited before it became healthy", "see its log")
            if time.monotonic() > deadline:
                raise WorkerError(f"{self.name} is not healthy on port {port} after {timeout_s:g} s",
                                  "see its log; raise --timeout for slow starts")
            time.sleep(0.05)

    def check_warm(self, port: int) -> None:
        """Health and one real completion; a clear error (and nothing changed) when either fails."""
        if not self.healthy(port):
            raise WorkerError(f"{self.name} on port {port} is not warm yet: {self.health_path} does not answer",
                              "wait until it serves (`warmstart run --engine ... --wait`), then checkpoint")
        try:
            self.complete(port, "warmstart", max_tokens=1)
        except WorkerError as e:
            raise WorkerError(f"{self.name} on port {port} answers health but not completions: {e.problem}",
                              "see the engine's log; checkpoint once it serves completions") from None

    def quiesce(self, port: int, command: list[str], on_gpu: bool, timeout_s: float) -> Quiesced:
        return Quiesced()

    def resume(self, port: int, done: Quiesced, timeout_s: float) -> None:
        return None
