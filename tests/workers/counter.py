"""A stateful plain process (no SDK): a counter that advances in a thread, served over HTTP."""

import http.server
import os
import sys
import threading
import time

state = {"n": 0, "boot": time.time_ns()}


def tick() -> None:
    while True:
        state["n"] += 1
        time.sleep(0.01)


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"{state['n']} {state['boot']} {os.getpid()}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


threading.Thread(target=tick, daemon=True).start()
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
