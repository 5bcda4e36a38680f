"""The reference worker: OpenAI-compatible /v1/completions and /health over the reference model.

    python -m warmstart.reference.server --port 8000 [--model DIR] [--kv-cache-mb 256]

It holds a KV-cache pool (a preallocated buffer, as real engines reserve one) that it releases on
quiesce and reallocates on resume, and it takes part in warmstart's quiesce/resume protocol: in-flight
requests finish before it acknowledges a quiesce, and new ones wait until it resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from warmstart.worker import ResumeSettings, attach


class Engine:
    def __init__(self, model_dir: str, kv_cache_mb: int, device: str) -> None:
        import torch
        from transformers import AutoTokenizer, LlamaForCausalLM

        self.torch = torch
        self.device = device
        self.model_dir = model_dir
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = LlamaForCausalLM.from_pretrained(model_dir).to(device).eval()
        self.kv_cache_bytes = kv_cache_mb << 20
        self.kv_cache = None
        self.gate = threading.Lock()  # held by each request, and by the worker while quiesced
        self.replica: int | None = None
        self.allocate_kv_cache()

    def allocate_kv_cache(self) -> None:
        if self.kv_cache_bytes:
            self.kv_cache = self.torch.zeros(self.kv_cache_bytes, dtype=self.torch.uint8, device=self.device)

    def complete(self, prompt: str, max_tokens: int) -> tuple[str, int, int]:
        ids = self.tokenizer(prompt, return_tensors="pt").input_ids.to(self.device)
        with self.torch.inference_mode():
            out = self.model.generate(ids, max_new_tokens=max_tokens, do_sample=False, min_new_tokens=max_tokens,
                                      pad_token_id=self.tokenizer.eos_token_id)
        new = out[0, ids.shape[1] :]
        return self.tokenizer.decode(new, skip_special_tokens=True), int(ids.shape[1]), int(new.shape[0])

    def quiesce(self) -> None:
        self.gate.acquire()  # waits for in-flight requests; new ones block until resume
        self.kv_cache = None
        if self.device.startswith("cuda"):
            self.torch.cuda.empty_cache()  # hand it back to the driver, or the CUDA checkpoint still copies it

    def resume(self, settings: ResumeSettings) -> None:
        self.allocate_kv_cache()
        if settings.restored:
            self.replica = settings.replica
        self.gate.release()


def make_handler(engine: Engine, model_name: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # one request per connection: nothing open across a checkpoint

        def _send(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/health":
                self._send(200, {"status": "ok", "pid": os.getpid(), "replica": engine.replica})
            elif self.path == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": model_name, "object": "model"}]})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self) -> None:
            if self.path != "/v1/completions":
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            try:
                req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                prompt, max_tokens = str(req["prompt"]), int(req.get("max_tokens", 16))
            except (ValueError, KeyError) as e:
                self._send(400, {"error": {"message": f"bad request: {e}"}})
                return
            with engine.gate:
                text, n_in, n_out = engine.complete(prompt, max_tokens)
            self._send(200, {
                "id": f"cmpl-{time.time_ns()}", "object": "text_completion", "created": int(time.time()),
                "model": model_name,
                "choices": [{"index": 0, "text": text, "finish_reason": "length", "logprobs": None}],
                "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out},
            })

        def log_message(self, fmt: str, *args: object) -> None:
            pass

    return Handler


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--model", help="model directory (default: build the reference model on first use)")
    ap.add_argument("--kv-cache-mb", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    if args.model is None:
        from warmstart.reference import model

        args.model = str(model.ensure())
    engine = Engine(args.model, args.kv_cache_mb, args.device)
    engine.complete("warm-up", 2)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(engine, "warmstart-reference"))
    server.daemon_threads = True
    attach(engine.quiesce, engine.resume, port=server.server_address[1], engine="reference", model=args.model)
    print(f"reference worker ready on {args.host}:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
