"""`warmstart demo`: the reference worker's cold start against its restore, on this machine."""

from __future__ import annotations

import json
import shutil
import socket
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from warmstart import api, paths, registry
from warmstart.errors import UsageError, WorkerError
from warmstart.pipeline.steps import Progress, quiet

PROMPT = "The fastest way to start an inference worker is"
MAX_TOKENS = 24


@dataclass
class DemoResult:
    cold_start_s: float
    checkpoint_s: float
    restore_ready_s: float  # the slowest replica
    restore_ready_s_each: list[float]
    first_completion_s_each: list[float]
    image_bytes: int
    identical: bool
    completion: str
    artifact: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def complete(port: int, prompt: str = PROMPT, max_tokens: int = MAX_TOKENS, timeout_s: float = 60) -> str:
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return str(json.loads(r.read())["choices"][0]["text"])
    except OSError as e:
        raise WorkerError(f"worker on port {port} did not answer a completion: {e}", "see its log") from e


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(replicas: int = 1, keep: bool = False, progress: Progress = quiet) -> DemoResult:
    from warmstart.reference import model

    progress("preparing the reference model (built once, then cached)")
    model.ensure()
    name = registry.free_name("demo")
    port = _free_port()
    progress(f"cold-starting the reference worker '{name}' on port {port}")
    t0 = time.monotonic()
    command = [sys.executable, "-m", "warmstart.reference.server", "--port", str(port)]
    replica_names: list[str] = []
    paths.home().mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="demo-", dir=paths.home()))
    try:
        api.run(name, command, engine="reference", wait=True, timeout_s=300)
        cold_text = complete(port)
        cold_start_s = time.monotonic() - t0

        artifact = workdir / "artifact"
        ck = api.checkpoint(name, artifact, progress=progress)
        t1 = time.monotonic()
        rr = api.restore(artifact, name=f"{name}-restored", replicas=replicas, progress=progress)
        replica_names = [r.name for r in rr.replicas]
        firsts, texts = [], []
        for r in rr.replicas:
            if r.port is None:
                raise WorkerError(f"replica {r.name} listens on no port", "see its log")
            texts.append(complete(r.port))
            firsts.append(time.monotonic() - t1)
        ready = [r.ready_s for r in rr.replicas]
        return DemoResult(
            cold_start_s=cold_start_s, checkpoint_s=ck.seconds, restore_ready_s=max(ready),
            restore_ready_s_each=ready, first_completion_s_each=firsts, image_bytes=ck.manifest.image_bytes,
            identical=all(t == cold_text for t in texts), completion=cold_text, artifact=str(artifact),
        )
    finally:
        if not keep:
            for n in [name, *replica_names]:
                try:
                    registry.stop(n, grace_s=2)
                except UsageError:
                    pass  # already gone (the checkpoint stops the source)
            shutil.rmtree(workdir, ignore_errors=True)
