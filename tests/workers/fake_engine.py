"""A stand-in HTTP server for warmstart's engine-adapter error paths only (never for end-to-end claims).

--mode no-completions: answers /health and /v1/models, fails every completion.
--mode dies-on-sleep:  serves completions, exits when asked to pause (POST /sleep), as a crashing engine would.
"""

import argparse
import http.server
import json
import os


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--mode", choices=["no-completions", "dies-on-sleep"], required=True)
    args = ap.parse_args()

    class Handler(http.server.BaseHTTPRequestHandler):
        def _send(self, code: int, body: object) -> None:
            raw = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def do_GET(self) -> None:
            if self.path == "/health":
                self._send(200, {})
            elif self.path == "/v1/models":
                self._send(200, {"data": [{"id": "fake"}]})
            else:
                self._send(404, {"error": "not found"})

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path == "/v1/completions":
                if args.mode == "no-completions":
                    self._send(500, {"error": "model not loaded"})
                else:
                    self._send(200, {"choices": [{"text": "ok"}]})
            elif self.path.startswith("/sleep") and args.mode == "dies-on-sleep":
                os._exit(3)
            else:
                self._send(200, {})

        def log_message(self, *a: object) -> None:
            pass

    http.server.ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
