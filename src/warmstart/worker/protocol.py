"""The quiesce/resume protocol between warmstart and a worker: JSON files in a control directory.

warmstart writes `request.json` ({seq, op, settings}); the worker answers with `ack.json` ({seq, op, ok,
error}); the worker announces itself, once warm, in `worker.json`. Files, not sockets, because the
directory survives the checkpoint: after a restore each replica's own control directory is mounted over
the path the worker polls, and a resume request already waiting there is picked up at once.
Every write is atomic (write a temporary file, then rename). Stdlib only: it runs inside workers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

ENV_CONTROL_DIR = "WARMSTART_CONTROL_DIR"
REQUEST = "request.json"
# While a checkpoint holds the worker quiesced it renews {"until": unix time} here; a quiesced worker whose lease
# ran out resumes by itself (the checkpoint died), and acknowledges that as op LEASE_EXPIRED.
LEASE = "lease.json"
LEASE_S = 10.0
LEASE_EXPIRED = "lease-expired"
ACK = "ack.json"
WORKER = "worker.json"
SDK_VERSION = 1

# In quiesce, resume and cancel settings: a directory of the artifact for what the worker saves outside its
# image (warmstart.worker.savedir), offered when the worker can see the artifact's path.
SAVED_DIR = "saved_dir"

QUIESCE = "quiesce"
RESUME = "resume"  # after a restore, or after a checkpoint that left the worker running
CANCEL = "cancel"  # the checkpoint gave up: resume if quiesced, else ignore


def write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.unlink()
    except FileNotFoundError:
        pass
    # O_EXCL never follows a symlink planted at tmp; the rename replaces whatever is at path without following it.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        os.write(fd, json.dumps(obj).encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None
