"""An SDK worker that saves its large state outside its image when the checkpoint offers a directory for it.

GET answers "<sha256 of the state> <its first 32 bytes, hex> <where it was last read from>". On quiesce the
state goes into the directory (warmstart.worker.savedir) and leaves memory; on resume it is read back from there.
"""

import hashlib
import os
import sys

from text_server import serve

from warmstart.worker import attach, savedir

state: bytes | None = os.urandom(8 << 20)
source = "memory"


def quiesce() -> None:
    global state
    where = savedir.get()
    if where and state is not None:
        with open(os.path.join(where, "state.bin"), "wb") as f:
            f.write(state)
        state = None


def resume(settings: object) -> None:
    global state, source
    if state is None:
        where = savedir.get()
        if not where:
            raise RuntimeError("state was saved, but the resume says no directory")
        with open(os.path.join(where, "state.bin"), "rb") as f:
            state = f.read()
        source = where


def text() -> str:
    data = state or b""
    return f"{hashlib.sha256(data).hexdigest()} {data[:32].hex()} {source}"


port = int(sys.argv[1])
attach(on_quiesce=quiesce, on_resume=resume, port=port, engine="saved-state")
serve(port, text)
