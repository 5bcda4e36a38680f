"""A Hugging Face transformers worker that knows nothing of warmstart (bench/nosdk.py checkpoints it).

    python bench/hf_worker.py --model DIR --port N

Loads the model directory in bf16 onto the GPU, generates one token to warm up, then serves on 127.0.0.1:
GET /health (200 once warm) and POST /generate {"prompt": str, "tokens": int} -> {"ids": [...]}, greedy.
Only torch, transformers and the standard library: no SDK, no quiesce, nothing of warmstart imported.
"""

from __future__ import annotations

import argparse
import json
from http.server import BaseHTTPRequestHandler, HTTPServer

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.bfloat16).to("cuda").eval()

    def generate(prompt: str, tokens: int) -> list[int]:
        ids = tok(prompt, return_tensors="pt").input_ids.to("cuda")
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                 pad_token_id=tok.eos_token_id)
        return [int(x) for x in out[0, ids.shape[1]:]]

    generate("warm up", 1)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_: object) -> None:
            pass

        def _reply(self, code: int, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self._reply(200 if self.path == "/health" else 404, b"ok\n")

        def do_POST(self) -> None:  # noqa: N802
            req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
            ids = generate(str(req["prompt"]), int(req["tokens"]))
            self._reply(200, json.dumps({"ids": ids}).encode())

    HTTPServer(("127.0.0.1", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
