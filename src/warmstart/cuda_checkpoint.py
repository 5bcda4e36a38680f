"""A drop-in for NVIDIA's `cuda-checkpoint` tool, on the driver API through cuda-bindings.

    warmstart cuda-checkpoint --toggle --pid P
    warmstart cuda-checkpoint --action lock|checkpoint|restore|unlock --pid P [--timeout MS] [--device-map OLD=NEW,...]
    warmstart cuda-checkpoint --get-state --pid P           # prints running | locked | checkpointed | failed
    warmstart cuda-checkpoint --get-restore-tid --pid P     # prints the thread id

Linked or installed as `cuda-checkpoint` on PATH (`ln -s "$(command -v warmstart)" /usr/local/bin/cuda-checkpoint`),
it serves CRIU's CUDA plugin and container runtimes, which run that tool and read its stdout.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from warmstart.errors import UsageError, WarmstartError

ACTIONS = ("lock", "checkpoint", "restore", "unlock")

HELP = """CUDA checkpoint and restore of a running process (warmstart's implementation of cuda-checkpoint).

  --toggle --pid <pid>
        Suspend CUDA in the process if it is running (lock, then checkpoint its GPU memory into host
        memory), or bring it back if it is checkpointed (restore, then unlock).
  --action <lock|checkpoint|restore|unlock> --pid <pid> [--timeout <ms>] [--device-map <old>=<new>,...]
        One step of the sequence lock -> checkpoint -> restore -> unlock. --timeout bounds how long lock
        waits for in-flight GPU work (default: no limit). --device-map moves a restore onto other GPUs,
        given as comma-separated pairs of GPU UUIDs.
  --get-state --pid <pid>
        Print the process's CUDA state: running, locked, checkpointed or failed.
  --get-restore-tid --pid <pid>
        Print the id of the thread the driver uses to restore the process.
  -h, --help
        Print this help.
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not argparse's usage block
        raise UsageError(f"bad arguments: {message}", "see cuda-checkpoint --help")


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="cuda-checkpoint", add_help=False, allow_abbrev=False)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--toggle", action="store_true")
    mode.add_argument("--action", choices=ACTIONS)
    mode.add_argument("--get-state", action="store_true")
    mode.add_argument("--get-restore-tid", action="store_true")
    mode.add_argument("-h", "--help", action="store_true")
    ap.add_argument("--pid", type=int)
    ap.add_argument("--timeout", type=int, default=0, help="milliseconds")
    ap.add_argument("--device-map", default="")
    return ap


def device_map(spec: str) -> dict[str, str]:
    """'OLD=NEW,OLD2=NEW2' -> {OLD: NEW, ...}, each side a GPU UUID."""
    from warmstart.gpu.driver import uuid_bytes

    out: dict[str, str] = {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        old, sep, new = item.partition("=")
        try:
            if not sep:
                raise ValueError(item)
            uuid_bytes(old)
            uuid_bytes(new)
        except ValueError:
            raise UsageError(f"bad --device-map entry {item!r}", "write it as GPU-<old uuid>=GPU-<new uuid>") from None
        out[old] = new
    return out


def run(args: argparse.Namespace) -> str:
    """Do what the flags ask; return what to print on stdout."""
    from warmstart.gpu import driver as cuda

    if args.pid is None or args.pid <= 0:
        raise UsageError("--pid is required", "pass --pid <pid of the CUDA process>")
    pid: int = args.pid
    timeout = max(args.timeout, 0)  # the driver reads 0 as no limit
    if args.get_state:
        return cuda.state(pid)
    if args.get_restore_tid:
        return str(cuda.restore_thread_id(pid))
    action: str | None = args.action  # None with --toggle: decided next
    if args.toggle:
        action = "suspend" if cuda.state(pid) == "running" else "resume"
    _act(action, pid, timeout, args.device_map)
    return ""


def _act(action: str | None, pid: int, timeout: int, device_map_spec: str) -> None:
    """One action, or the two of suspend (lock, checkpoint) or resume (restore, unlock)."""
    from warmstart.gpu import driver as cuda

    if action in ("suspend", "lock"):
        cuda.lock(pid, timeout)
    if action == "suspend":
        try:
            cuda.checkpoint(pid)
        except BaseException:
            cuda.unlock(pid)
            raise
    if action == "checkpoint":
        cuda.checkpoint(pid)
    if action in ("resume", "restore"):
        cuda.restore(pid, device_map(device_map_spec) or None)
    if action in ("resume", "unlock"):
        cuda.unlock(pid)


def main(argv: list[str]) -> int:
    try:
        args, extra = _parser().parse_known_args(argv)
    except UsageError as e:
        print(f"error: {e.line()}", file=sys.stderr)
        return e.exit_code
    if args.help or not argv:
        print(HELP, end="")
        return 0
    if extra:
        print(f"error: unknown argument {extra[0]!r} — see cuda-checkpoint --help", file=sys.stderr)
        return 2
    if not (args.toggle or args.action or args.get_state or args.get_restore_tid):
        print("error: nothing to do — pass --toggle, --action, --get-state or --get-restore-tid", file=sys.stderr)
        return 2
    try:
        printed = run(args)
    except WarmstartError as e:
        print(f"error: {e.line()}", file=sys.stderr)
        return e.exit_code
    if printed:
        print(printed)
    return 0
