"""The test workers' HTTP face: every GET answers with the text a function returns (stdlib only)."""

import http.server
from collections.abc import Callable


def serve(port: int, text: Callable[[], str], host: str = "127.0.0.1") -> None:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = text().encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    http.server.ThreadingHTTPServer((host, port), Handler).serve_forever()
