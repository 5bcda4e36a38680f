"""The `warmstart` command's entry point: through a running fork server where one takes it (forkserver.py),
else here. Imports nothing of the host side before that choice."""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = ("forkserver", "agent", "placeholder")  # long-lived, or a container's first process: never forked


def main() -> None:
    argv = sys.argv[1:]
    command = next((a for a in argv if not a.startswith("-")), None)  # after global options such as --debug
    if command not in _HERE and Path(sys.argv[0]).name != "cuda-checkpoint":
        from warmstart import forkserver

        code = forkserver.ask(argv)
        if code is not None:
            sys.exit(code)
    from warmstart.cli import main as cli_main

    cli_main()
