"""The reference worker's model cache: the models warmstart.reference.model builds, bounded in size.

They live in `$WARMSTART_CACHE/models` (default ~/.cache/warmstart/models), one directory each. Making a model
keeps the cache within WARMSTART_MODEL_CACHE_MB: the least recently made or used models go first, but never the
one just made, nor one a live process has open, mapped, or names on its command line (a worker serving it, as
far as this user can see in /proc). Stdlib only: it runs inside the worker.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from warmstart.errors import UsageError

LIMIT_ENV = "WARMSTART_MODEL_CACHE_MB"
DEFAULT_MB = 32768  # the GPU benchmark's 1.1B and 8B models (bf16) fit together
_MOST_MB = 1 << 30
_PREFIX = "reference-"


@dataclass(frozen=True)
class Entry:
    path: Path
    bytes: int
    used: float  # when it was last made or used (the directory's mtime)
    in_use: bool  # a live process has it open, mapped or names it


def root() -> Path:
    base = os.environ.get("WARMSTART_CACHE") or Path.home() / ".cache" / "warmstart"
    return Path(base) / "models"


def limit_mb(env: Mapping[str, str]) -> int:
    """WARMSTART_MODEL_CACHE_MB, or UsageError naming it and the fix."""
    value = env.get(LIMIT_ENV, "")
    if value == "":
        return DEFAULT_MB
    if not value.isdigit() or len(value) > 12 or not 1 <= int(value) <= _MOST_MB:
        raise UsageError(f"{LIMIT_ENV} must be a whole number of MiB from 1 to {_MOST_MB}, not {value!r}",
                         f"unset it or set e.g. {LIMIT_ENV}={DEFAULT_MB}")
    return int(value)


def touch(model: Path) -> None:
    """The model was used now: it goes last."""
    try:
        os.utime(model)
    except OSError:
        pass  # someone else's cache: only the order of removal suffers


def entries() -> list[Entry]:
    """The cached models, the most recently used first."""
    try:
        dirs = [p for p in root().iterdir() if p.name.startswith(_PREFIX) and (p / "config.json").is_file()]
    except OSError:
        return []
    seen = _paths_in_use()
    out = []
    for p in dirs:
        try:
            out.append(Entry(p, _size(p), p.stat().st_mtime, _named(p, seen)))
        except OSError:
            continue  # removed meanwhile
    return sorted(out, key=lambda e: e.used, reverse=True)


def prune(keep: Path, limit: int) -> list[Path]:
    """Keep the most recently used models that fit in `limit` MiB with `keep` and those in use, which always
    stay; remove the rest, and what killed builds left. Returns the models removed."""
    left, full, gone = limit << 20, False, []
    for e in entries():
        protected = e.in_use or e.path.resolve() == keep.resolve()
        full = full or (not protected and e.bytes > left)
        if full and not protected:
            _remove(e.path)
            gone.append(e.path)
        else:
            left -= e.bytes
    _remove_stale_builds()
    return gone


def clear() -> tuple[list[Path], list[Path]]:
    """Remove every cached model not in use (the reference worker builds it again): (removed, kept in use)."""
    removed: list[Path] = []
    kept: list[Path] = []
    for e in entries():
        (kept if e.in_use else removed).append(e.path)
        if not e.in_use:
            _remove(e.path)
    _remove_stale_builds()
    return removed, kept


def _remove(model: Path) -> None:
    """Out of sight first (a worker starting now builds it again rather than read half of it), then deleted."""
    gone = model.with_name(f".{model.name}.tmp-{os.getpid()}")
    try:
        os.rename(model, gone)
    except OSError:
        return
    shutil.rmtree(gone, ignore_errors=True)


def _remove_stale_builds() -> None:
    """Directories `.NAME.tmp-PID` whose process is gone: a build or a removal that was killed."""
    for p in root().glob(f".{_PREFIX}*.tmp-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _size(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def _named(model: Path, seen: set[str]) -> bool:
    names = {str(model), str(model.resolve())}
    inside = tuple(f"{n}/" for n in names)
    return any(s in names or s.startswith(inside) for s in seen)


def _paths_in_use() -> set[str]:
    """Every path a live process has open or mapped, or passes as an absolute argument, that this user can see."""
    seen: set[str] = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            seen |= _links(proc / "fd") | _mapped(proc) | _arguments(proc)
    return seen


def _links(fd_dir: Path) -> set[str]:
    out = set()
    try:
        fds = list(fd_dir.iterdir())
    except OSError:  # gone, or not this user's
        return set()
    for fd in fds:
        try:
            out.add(os.readlink(fd))
        except OSError:
            continue  # closed meanwhile
    return out


def _mapped(proc: Path) -> set[str]:
    try:
        lines = (proc / "maps").read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return set()
    return {parts[5] for parts in (line.split(None, 5) for line in lines) if len(parts) == 6}


def _arguments(proc: Path) -> set[str]:
    try:
        args = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return set()
    values = (a.partition("=")[2] if a.startswith("-") else a for a in args)  # --model=/m as well as /m
    return {v.rstrip("/") for v in values if v.startswith("/")}
