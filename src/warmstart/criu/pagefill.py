"""Whether several replicas restored at once should read their pages into huge pages on this host: learnt from
this host's own restores, not assumed.

Two VMs of one kind disagreed by 2x in opposite directions, and so did one VM an hour apart (docs/benchmarks.md,
"A fresh VM: replicas' page size learnt, not fixed"). A probe cannot tell ahead: how fast 2 MiB pages come
depends on how much of the guest's memory the hypervisor backs, which changes from minute to minute. So each
restore of several replicas records CRIU's seconds per GB for the page size it used, under WARMSTART_HOME for
this boot; the next one takes the size with the better recent median, and every few restores tries the other.
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from warmstart import paths
from warmstart.errors import WarmstartError

_KEEP = 3  # the most recent restores kept for each size
_EXPLORE_EVERY = 6  # one restore in this many takes the size that looked slower, in case that changed


def pick(huge: list[float], small: list[float], restores: int) -> bool:
    """Huge pages or not, from recent seconds per GB each way and the count of restores recorded so far."""
    if not huge:
        return True  # as for one replica, until the other size has been tried
    if not small:
        return False
    best = statistics.median(huge) <= statistics.median(small)
    return (not best) if restores % _EXPLORE_EVERY == _EXPLORE_EVERY - 1 else best


def _boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def _path() -> Path:
    return paths.state_dir("host") / "pagefill.json"


def _load() -> dict[str, object]:
    try:
        fd = os.open(_path(), os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return {}
    with os.fdopen(fd) as f:
        try:
            data = json.load(f)
        except ValueError:
            return {}
    return data if isinstance(data, dict) and data.get("boot_id") == _boot_id() else {}


@dataclass
class Record:
    """This boot's recent restores of one number of replicas at once: CRIU's seconds per GB each way."""
    huge: list[float] = field(default_factory=list)
    small: list[float] = field(default_factory=list)
    restores: int = 0


def _key(writers: int) -> str:
    return str(min(writers, os.cpu_count() or 1))


def _entry(data: dict[str, object], writers: int) -> Record:
    found = data.get(_key(writers))
    if not isinstance(found, dict):
        return Record()
    try:
        return Record([float(x) for x in found.get("huge", [])], [float(x) for x in found.get("small", [])],
                      int(found.get("restores", 0)))
    except (TypeError, ValueError):
        return Record()


def choose(writers: int) -> bool:
    """Whether `writers` replicas restored at once read into huge pages (one replica always does)."""
    if writers <= 1:
        return True
    r = _entry(_load(), writers)
    return pick(r.huge, r.small, r.restores)


def record(writers: int, huge: bool, criu_s: float, gigabytes: float) -> None:
    """Note how long the slowest replica's CRIU took, for the next choice. Never raises: the restore it follows
    succeeded, and a record not written only means the next restore learns less."""
    if writers <= 1 or gigabytes <= 0:
        return
    try:
        data = _load()
        r = _entry(data, writers)
        if huge:
            r.huge = [*r.huge, round(criu_s / gigabytes, 4)][-_KEEP:]
        else:
            r.small = [*r.small, round(criu_s / gigabytes, 4)][-_KEEP:]
        r.restores += 1
        path = _path()
    except (OSError, WarmstartError):
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({**data, "boot_id": _boot_id(), _key(writers): asdict(r)}, f)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
