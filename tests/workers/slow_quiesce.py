"""An SDK worker whose quiesce (argv[2] s) or resume (argv[3] s, default 0) takes long: warmstart must time out
and say what it left."""

import http.server
import sys
import time

from warmstart.worker import attach


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


server = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
resume_s = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
attach(on_quiesce=lambda: time.sleep(float(sys.argv[2])), on_resume=lambda _: time.sleep(resume_s),
       port=server.server_address[1], engine="slow")
server.serve_forever()
