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
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None
