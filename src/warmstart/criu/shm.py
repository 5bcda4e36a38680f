"""POSIX shared memory (/dev/shm) of a worker tree: saved into the artifact, placed in each replica's /dev/shm.

CRIU saves a shared file mapping by its path, not its contents, so the named segments an engine's processes
share (vLLM's shared-memory rings, multiprocessing's semaphores) would be missing from a replica's private,
empty /dev/shm. The checkpoint copies the ones the tree uses into the artifact (sparsely: rings are mostly
holes) while the tree is stopped (a CRIU action script), and each replica gets its own copy before CRIU restores
into it.

A segment held under a removed name while another name still links it (glibc creates a semaphore under a
temporary name, links it to the real one and removes the temporary) can only be dumped with CRIU's
`--link-remap`, which adds a `link_remap.N` name next to it; in /dev/shm that name is saved here too and
consumed by each replica's restore in its own /dev/shm. Outside /dev/shm such a file is refused before
the dump, because a restore would consume the one extra name on the host.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from warmstart import procs
from warmstart.errors import WorkerError
from warmstart.linux import sparse_copy

SHM = Path("/dev/shm")
_DELETED = " (deleted)"
_NAMES_ENV, _DEST_ENV, _BEFORE_ENV = "WARMSTART_SHM_NAMES", "WARMSTART_SHM_DEST", "WARMSTART_SHM_REMAPS_BEFORE"


@dataclass(frozen=True)
class ShmUse:
    names: list[str]  # linked segments in /dev/shm the tree holds open or mapped
    remapped: bool  # it also holds one under a removed name that another name links: CRIU adds link_remap.N

    def __bool__(self) -> bool:
        return bool(self.names) or self.remapped


def _held_paths(pid: int) -> list[tuple[str, str]]:
    """(path as the kernel shows it, /proc path that opens the same file) for every fd and file mapping."""
    out = [(target, f"/proc/{pid}/fd/{fd}") for fd, target in procs.fd_targets(pid) if target.startswith("/")]
    try:
        maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    except (FileNotFoundError, ProcessLookupError):
        return out
    for line in maps:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith("/"):
            out.append((parts[5], f"/proc/{pid}/map_files/{parts[0]}"))
    return out


def _linked_elsewhere(proc_path: str) -> bool:
    try:
        return os.stat(proc_path).st_nlink > 0
    except OSError:
        return False


def used_by(pids: list[int]) -> ShmUse:
    """What in /dev/shm the processes hold open or mapped; refuse what CRIU could only save on the host.

    Raises WorkerError for a file outside /dev/shm held under a removed name that other names still link.
    """
    names: set[str] = set()
    remapped = False
    for pid in pids:
        for shown, proc_path in _held_paths(pid):
            deleted = shown.endswith(_DELETED)
            path = shown[: -len(_DELETED)] if deleted else shown
            in_shm = Path(path).parent == SHM
            if in_shm and not deleted:
                if any(c.isspace() for c in path):
                    raise WorkerError(f"process {pid} uses /dev/shm segment {path!r}, whose name has white space",
                                      "name shared memory segments without spaces")
                names.add(Path(path).name)
            elif deleted and _linked_elsewhere(proc_path):
                if in_shm:
                    remapped = True
                    continue
                raise WorkerError(
                    f"process {pid} holds {path} under a name that was removed while another name still links it; "
                    "CRIU could save it only by adding a link on this host, which the first restore would consume",
                    "keep such files in /dev/shm or close them before the checkpoint",
                )
    return ShmUse(sorted(names), remapped)


def link_remaps(shm_root: Path = SHM) -> set[str]:
    return {p.name for p in shm_root.glob("link_remap.*")}


def remove_remaps(names: set[str], shm_root: Path = SHM) -> None:
    """Drop the link names a dump added to /dev/shm: the artifact holds its own copies."""
    for n in names:
        (shm_root / n).unlink(missing_ok=True)


def place(src: Path, root: Path = SHM) -> None:
    """Put an artifact's saved segments into a (replica's private) /dev/shm."""
    if not src.is_dir():
        return
    for f in sorted(src.iterdir()):
        sparse_copy(f, root / f.name)


# ---- the CRIU action script: runs at post-dump, while the tree is still frozen ----

# POSIX sh and cp only: CRIU runs it where it runs, which for a container is inside the container's mount
# namespace, where neither Python nor warmstart need exist.
_HOOK = """#!/bin/sh
[ "$CRTOOLS_SCRIPT_ACTION" = post-dump ] || exit 0
cd /dev/shm || exit 1
for n in $WARMSTART_SHM_NAMES link_remap.*; do
    [ -e "$n" ] || continue
    case " $WARMSTART_SHM_REMAPS_BEFORE " in *" $n "*) continue ;; esac
    cp --sparse=always "$n" "$WARMSTART_SHM_DEST/" || { echo "warmstart: saving /dev/shm/$n failed"; exit 1; }
done
"""


def hook(use: ShmUse, dest: Path, script: Path, shm_root: Path = SHM) -> dict[str, str]:
    """Write the --action-script (CRIU executes it directly) to script; return the environment CRIU needs."""
    script.write_text(_HOOK)
    script.chmod(0o700)
    dest.mkdir(parents=True, exist_ok=True)
    return {_NAMES_ENV: " ".join(use.names), _DEST_ENV: str(dest),
            _BEFORE_ENV: " ".join(sorted(link_remaps(shm_root)))}


def created_remaps(env: dict[str, str], shm_root: Path = SHM) -> set[str]:
    """The link_remap.N names the dump added to /dev/shm (the caller removes them from there)."""
    return link_remaps(shm_root) - set(env[_BEFORE_ENV].split())
