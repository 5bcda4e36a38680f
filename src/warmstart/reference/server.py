"""The reference worker: an OpenAI-compatible API (warmstart.reference.protocol) over the reference model.

    python -m warmstart.reference.server --port 8000 [--model DIR] [--kv-cache-mb 256] [--weights-socket S]

It decodes greedily (or samples, when asked) with its KV cache in a preallocated pool, as real engines reserve
one (on GPU: bf16, the pool a CUDA virtual-memory region, the decode step captured once as a CUDA graph; the
weights in a kept region that goes through host memory across a checkpoint, see warmstart.reference.load). It
takes part in warmstart's quiesce/resume protocol: in-flight requests (a stream included) finish before it
acknowledges a quiesce, new ones wait until it resumes, and the pool's memory is released while quiesced (GPU:
unmapped and mapped again at the same address, so the graph stays valid; CPU: its pages dropped), so the KV cache
is not in the image.

GET /health answers what a user can act on: {"status": "ok", "model" (the id to ask for), "name" (warmstart's name
for this worker or replica), "restored", "replica" (its index, for a restored one), "port" (where a user reaches it:
the port it listens on, or a restored replica's host port; null if no host port forwards to it), "pid" (its process
id; in a restored replica, the checkpointed worker's, kept in the replica's own pid namespace), "device", "max_len"}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from warmstart.reference import protocol
from warmstart.reference.textstream import TextStream
from warmstart.worker import ResumeSettings, attach

if TYPE_CHECKING:
    from warmstart.gpumem.region import GpuRegion
    from warmstart.weights.client import SharedWeights


@dataclass
class Identity:
    """Which worker this is and where a user reaches it, as /health reports it."""

    name: str | None = field(default_factory=lambda: os.environ.get("WARMSTART_WORKER_NAME"))  # `warmstart run`'s
    port: int | None = None  # the port it listens on; after a restore, the replica's host port (None: none)
    restored: bool = False
    replica: int | None = None

    def resumed(self, settings: ResumeSettings) -> None:
        if settings.restored:  # not after a checkpoint that left this same process running
            self.restored, self.replica, self.port = True, settings.replica, settings.port
            self.name = settings.name or self.name


class Engine:
    def __init__(self, model_dir: str, kv_cache_mb: int, device: str, dtype: str, max_len: int, graph: bool,
                 weights_socket: str | None = None, pack: bool = True) -> None:
        import torch

        from warmstart.reference import decode, load

        self.torch = torch
        self.device = device
        self.model_dir = model_dir
        self.tokenizer = load.tokenizer(model_dir)
        config = load.config(model_dir)
        self.weights: SharedWeights | None = None  # when mapped from a weight service
        self.weights_region: GpuRegion | None = None  # kept, holding the weights, on GPU without a service
        if weights_socket:
            tensors = self._shared_weights(model_dir, device, dtype, weights_socket)
        else:
            tensors, self.weights_region = load.weights(model_dir, device, dtype, pack)
        need = decode.cache_bytes(config, max_len, tensors["lm_head.weight"].element_size())
        # The KV pool: engines size it from free memory; here --kv-cache-mb, at least one sequence's worth.
        nbytes = max(kv_cache_mb << 20, need)
        self.region: GpuRegion | None = None
        if device.startswith("cuda"):
            from warmstart.gpumem.region import GpuRegion

            self.region = GpuRegion(nbytes, torch.device(device).index or 0)
            pool = self.region.tensor(torch)
        else:
            pool = torch.zeros(nbytes, dtype=torch.uint8)
        self.cpu_pool = pool if self.region is None else None
        self.kv_cache_bytes = nbytes
        self.decoder = decode.Decoder(tensors, config, pool, max_len, use_graph=graph and self.region is not None)
        self.gate = threading.Lock()  # held by each request, and by the worker while quiesced
        self.identity = Identity()

    def _shared_weights(self, model_dir: str, device: str, dtype: str, socket_path: str) -> dict[str, Any]:
        """Every tensor aliasing the weight service's memory: no load, no copy."""
        import glob

        from warmstart.weights.client import SharedWeights

        torch = self.torch
        self.weights = shared = SharedWeights(socket_path, sorted(glob.glob(f"{model_dir}/*.safetensors")),
                                              device=device)
        tensors = shared.tensors(torch)
        wrong = {t.dtype for t in tensors.values()} - {getattr(torch, dtype)}
        if wrong:
            raise SystemExit(f"the weight files hold {sorted(map(str, wrong))}, not {dtype}: pass --dtype to match")
        return tensors

    @property
    def max_len(self) -> int:
        return int(self.decoder.max_len)

    def complete(self, prompt: str, max_tokens: int) -> tuple[str, int, int]:
        """Greedy: (text, prompt tokens, completion tokens); the prompt cut from the left to fit the cache."""
        ids = self.tokenizer.encode(prompt).ids
        new = self.decoder.generate(ids, max_tokens)
        return self.detokenize(new), len(ids), len(new)

    def detokenize(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def encode(self, prompt: str, max_tokens: int) -> list[int]:
        """The prompt's tokens, or ApiError if there are none or they and max_tokens do not fit the cache."""
        ids: list[int] = self.tokenizer.encode(prompt).ids
        if not ids:
            raise protocol.ApiError(400, "The prompt is empty", "prompt")
        protocol.check_fits(len(ids), max_tokens, self.max_len)
        return ids

    def runs(self, req: protocol.Request, prompts: list[list[int]]) -> Iterator[tuple[int, TextStream, Iterator[str]]]:
        """Each choice in turn: (its index, its TextStream, the pieces of its text as they are decoded). The
        caller holds the gate. Sampled when temperature > 0, all choices from one generator seeded by `seed`."""
        from warmstart.reference import decode

        pick = None
        if req.temperature > 0:
            generator = self.torch.Generator(device=self.decoder.device)
            if req.seed is None:
                generator.seed()
            else:
                generator.manual_seed(req.seed)
            pick = decode.sampler(req.temperature, req.top_p, generator)
        for i, ids in enumerate(prompts):
            for j in range(req.n):
                text = TextStream(self.detokenize, req.stop)
                yield i * req.n + j, text, text.run(self.decoder.tokens(ids, req.max_tokens, pick))

    def quiesce(self) -> None:
        self.gate.acquire()  # waits for in-flight requests; new ones block until resume
        try:
            self._release()
        except BaseException:  # the checkpoint is off: serve again with everything mapped
            try:
                self._bring_back()
            finally:
                self.gate.release()
            raise

    def resume(self, settings: ResumeSettings) -> None:
        self._bring_back()
        self.identity.resumed(settings)
        self.gate.release()

    def _release(self) -> None:
        if self.region is not None:
            self.region.release()  # the KV pool leaves GPU memory, so the CUDA checkpoint does not copy it
            self.torch.cuda.empty_cache()  # and the allocator's idle blocks too
        if self.weights_region is not None:
            self.weights_region.release()  # the weights move to host memory: CRIU carries them, not the driver
        if self.cpu_pool is not None:
            _discard(self.cpu_pool)  # on CPU too: the pages go, so CRIU does not dump the KV cache
        if self.weights is not None:
            self.weights.release()  # the weights stay in the service: neither checkpoint carries them

    def _bring_back(self) -> None:
        """Map whatever _release() unmapped (each restore() does nothing for what is still mapped)."""
        if self.weights is not None:
            self.weights.restore()
        region = self.weights_region
        kept = region if region is not None and not region.mapped else None
        t0 = time.monotonic()
        if self.weights_region is not None:
            self.weights_region.restore()
        t1 = time.monotonic()
        if self.region is not None:
            self.region.restore()
        if kept is not None:
            gb = kept.nbytes / 1e9
            print(f"resume: {gb:.2f} GB of weights back in {t1 - t0:.3f} s ({gb / max(t1 - t0, 1e-9):.1f} GB/s), "
                  f"KV pool mapped in {time.monotonic() - t1:.3f} s", flush=True)


def _discard(t: Any) -> None:  # t: a contiguous CPU torch tensor
    """Drop a CPU buffer's pages (MADV_DONTNEED): it reads as zeros afterwards, as a released GPU region does."""
    import mmap

    from warmstart import linux

    page = mmap.PAGESIZE
    start = -(-t.data_ptr() // page) * page
    end = (t.data_ptr() + t.numel() * t.element_size()) // page * page
    if end > start:
        linux.madvise(start, end - start, mmap.MADV_DONTNEED, "the KV pool (MADV_DONTNEED)")


class Handler(BaseHTTPRequestHandler):
    """The HTTP API: GET /health, /v1/models[/ID]; POST /v1/completions, /v1/chat/completions (streamed as
    server-sent events with "stream": true). A subclass made by make_handler names the engine and the model."""

    protocol_version = "HTTP/1.0"  # one request per connection: nothing open across a checkpoint
    engine: Engine
    model_name: str

    def _send(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _model(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": 0, "owned_by": "warmstart"}

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/health":
            self._send(200, self._health())
        elif path == "/v1/models":
            self._send(200, {"object": "list", "data": [self._model()]})
        elif path == f"/v1/models/{self.model_name}":
            self._send(200, self._model())
        elif path.startswith("/v1/models/"):
            name = path.removeprefix("/v1/models/")
            self._error(protocol.ApiError(404, f"The model `{name}` does not exist: this worker serves "
                                               f"`{self.model_name}`", "model", "model_not_found"))
        else:
            self._error(protocol.not_found(f"no route GET {path}"))

    def _health(self) -> dict[str, Any]:
        e, me = self.engine, self.engine.identity
        return {"status": "ok", "model": self.model_name, "name": me.name, "restored": me.restored,
                "replica": me.replica, "port": me.port, "pid": os.getpid(), "device": e.device, "max_len": e.max_len}

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        if path not in ("/v1/completions", "/v1/chat/completions"):
            self._error(protocol.not_found(f"no route POST {path}"))
            return
        engine = self.engine
        try:
            req = protocol.parse(self._body(), path == "/v1/chat/completions", self.model_name, engine.max_len)
            prompts = [engine.encode(p, req.max_tokens) for p in req.prompts]
        except protocol.ApiError as e:
            self._error(e)
            return
        with engine.gate:
            try:
                (self._stream if req.stream else self._answer)(req, prompts)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client went away: nothing to answer

    def _body(self) -> bytes:
        try:
            length = int(self.headers.get("Content-Length", 0))
        except ValueError:
            raise protocol.ApiError(400, "Content-Length is not a number") from None
        return self.rfile.read(length) if length > 0 else b""

    def _error(self, e: protocol.ApiError) -> None:
        self._send(e.status, e.body())

    def _answer(self, req: protocol.Request, prompts: list[list[int]]) -> None:
        choices, completion_tokens = [], 0
        for _, text, deltas in self.engine.runs(req, prompts):
            for _piece in deltas:
                pass
            choices.append((text.text, text.finish_reason))
            completion_tokens += len(text.ids)
        usage = protocol.usage(sum(map(len, prompts)), completion_tokens)
        self._send(200, protocol.Shaper(req.chat, self.model_name).response(choices, usage))

    def _stream(self, req: protocol.Request, prompts: list[list[int]]) -> None:
        """Server-sent events, one per piece of text, then `data: [DONE]`; the connection's end ends the body."""
        shaper = protocol.Shaper(req.chat, self.model_name)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        completion_tokens = 0
        for index, text, deltas in self.engine.runs(req, prompts):
            if req.chat:
                self._event(shaper.chunk(index, None, None))  # the assistant's role opens each choice
            for piece in deltas:
                self._event(shaper.chunk(index, piece, None))
            self._event(shaper.chunk(index, "", text.finish_reason))
            completion_tokens += len(text.ids)
        if req.include_usage:
            self._event(shaper.usage_chunk(protocol.usage(sum(map(len, prompts)), completion_tokens)))
        self.wfile.write(b"data: [DONE]\n\n")

    def _event(self, data: dict[str, Any]) -> None:
        self.wfile.write(b"data: " + json.dumps(data).encode() + b"\n\n")

    def log_message(self, fmt: str, *args: object) -> None:
        pass


def make_handler(engine: Engine, model_name: str) -> type[BaseHTTPRequestHandler]:
    return type("BoundHandler", (Handler,), {"engine": engine, "model_name": model_name})


def _reference_model() -> str:
    """The reference model's directory, built on first use; one line and exit 2 for a bad cache setting."""
    from warmstart.errors import WarmstartError
    from warmstart.reference import model

    try:
        return str(model.ensure())
    except WarmstartError as e:
        print(f"error: {e.line()}", file=sys.stderr)
        raise SystemExit(e.exit_code) from None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--model", help="model directory (default: build the reference model on first use)")
    ap.add_argument("--kv-cache-mb", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--max-len", type=int, default=256, help="longest sequence (prompt + completion)")
    ap.add_argument("--no-graph", action="store_true", help="do not capture the decode step as a CUDA graph")
    ap.add_argument("--weights-socket", help="map the weights from this weight service instead of loading them")
    ap.add_argument("--no-pack", action="store_true", help="save bf16 weights into the checkpoint as they are, "
                    "not packed losslessly into 3/4 of the bytes")
    args = ap.parse_args(argv)
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.device.startswith("cuda"):
        # cuBLAS workspaces of 8 MiB instead of torch's 32 MiB on Hopper (one per stream; three here): ample
        # for decode-sized matrix products, and ~70 MB less GPU memory for the checkpoint to copy.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:2:16:8")
    if args.model is None:
        args.model = _reference_model()
    engine = Engine(args.model, args.kv_cache_mb, args.device, dtype, args.max_len, not args.no_graph,
                    args.weights_socket, not args.no_pack)
    engine.complete("warm-up", 2)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(engine, "warmstart-reference"))
    server.daemon_threads = True
    engine.identity.port = server.server_address[1]
    attach(engine.quiesce, engine.resume, port=server.server_address[1], engine="reference", model=args.model)
    print(f"reference worker ready on {args.host}:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
