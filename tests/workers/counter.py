"""A stateful plain process (no SDK): a counter that advances in a thread, served over HTTP."""

import os
import sys
import threading
import time

from text_server import serve

state = {"n": 0, "boot": time.time_ns()}


def tick() -> None:
    while True:
        state["n"] += 1
        time.sleep(0.01)


threading.Thread(target=tick, daemon=True).start()
serve(int(sys.argv[1]), lambda: f"{state['n']} {state['boot']} {os.getpid()}")
