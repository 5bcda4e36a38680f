"""Where warmstart keeps its runtime state: one directory per managed worker or restored replica."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from warmstart import config
from warmstart.errors import EnvironmentProblem, UsageError

_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")


def home() -> Path:
    """State root; WARMSTART_HOME overrides it (tests give each run its own)."""
    return config.current().home


def workers_dir() -> Path:
    return home() / "workers"


def worker_dir(name: str) -> Path:
    return workers_dir() / check_name(name)


def private_dir(path: Path, setting: str = "WARMSTART_HOME") -> Path:
    """Make `path` (and missing parents) mode 0700 and return it; refuse a symlink, or a directory another user
    owns or can write: state and logs hold what workers print and run."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = os.lstat(path)
    except OSError as e:
        raise EnvironmentProblem(f"cannot create {path}: {e.strerror}",
                                 f"set {setting} to a directory this user can create") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise EnvironmentProblem(f"{path} is not a directory that only this user can write",
                                 f"chmod 700 {path}, owned by this user, or set {setting}")
    return path


def read_private(path: Path, what: str, fix: str) -> bytes:
    """A key file: regular, this user's, readable by no one else, not followed through a symlink."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        raise EnvironmentProblem(f"cannot read the {what} {path}: {e.strerror}", fix) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise EnvironmentProblem(f"the {what} {path} is not a private file of this user (mode "
                                     f"{stat.S_IMODE(st.st_mode):o})", f"chmod 600 {path}, owned by this user")
        return os.read(fd, 1 << 16)
    finally:
        os.close(fd)


def state_dir(*parts: str) -> Path:
    """A directory of the state root, every level of it private."""
    d = private_dir(home())
    for part in parts:
        d = private_dir(d / part)
    return d


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise UsageError(
            f"invalid worker name {name!r}",
            "use 1-63 lowercase letters, digits, '-', '_' or '.', starting with a letter or digit",
        )
    return name
