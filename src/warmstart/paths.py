"""Where warmstart keeps its runtime state: one directory per managed worker or restored replica."""

from __future__ import annotations

import re
from pathlib import Path

from warmstart import config
from warmstart.errors import UsageError

_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")


def home() -> Path:
    """State root; WARMSTART_HOME overrides it (tests give each run its own)."""
    return config.current().home


def workers_dir() -> Path:
    return home() / "workers"


def worker_dir(name: str) -> Path:
    return workers_dir() / check_name(name)


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise UsageError(
            f"invalid worker name {name!r}",
            "use 1-63 lowercase letters, digits, '-', '_' or '.', starting with a letter or digit",
        )
    return name
