"""Every WARMSTART_* setting of the host side, parsed and validated in one place (docs/cli.md lists them).

`current()` reads the environment each time it is called, so a pipeline takes its settings once, when it
starts, and a test may change them between calls. A bad value is a UsageError naming the variable and the fix.
Variables that are protocol rather than settings (WARMSTART_CONTROL_DIR, WARMSTART_WORKER_NAME, set for a
worker; WARMSTART_SHM_*, set for CRIU's action script) live with their protocol.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from warmstart.errors import UsageError
from warmstart.reference import modelcache


@dataclass(frozen=True)
class Settings:
    home: Path  # WARMSTART_HOME: state (worker records, logs, the verified-checksum cache)
    criu: str | None  # WARMSTART_CRIU: the criu binary; default: the checkout's build, then PATH
    read_threads: int  # WARMSTART_READ_THREADS: threads a restore reads an image with (default: cores, <= 16)
    huge_pages: str  # WARMSTART_HUGE_PAGES: restore large anonymous areas into huge pages: auto (measured), 1, 0
    image_cache: Path  # WARMSTART_IMAGE_CACHE: raw images of compressed ones, for restores on this node
    image_cache_mb: int  # WARMSTART_IMAGE_CACHE_MB: the most it holds (the oldest go first); default below
    zero_pages: str  # WARMSTART_ZERO_PAGES: take pages of zeros out of CRIU's image: auto (where it pays), 1, 0
    compress: str  # WARMSTART_COMPRESS: store large pages images compressed: auto (where it pays), 1, 0
    disk_mbps: int  # WARMSTART_DISK_MBPS: the disk's rate, for deciding what pays (image/plan.py)
    debug: bool  # WARMSTART_DEBUG: tracebacks on errors, as --debug
    key_dir: Path  # WARMSTART_KEY_DIR: this host's artifact signing key (created on first use)
    signing_key: Path | None  # WARMSTART_SIGNING_KEY: a private key file to sign with instead (a mounted Secret)
    trusted_keys: tuple[Path, ...]  # WARMSTART_TRUSTED_KEYS: more public keys (files or directories), ':'-separated
    insecure_unsigned: bool  # WARMSTART_INSECURE_UNSIGNED: write and accept unsigned artifacts (experts only)
    encrypt: bool  # WARMSTART_ENCRYPT: seal process memory in the artifact (CRIU's images, /dev/shm segments)
    encrypt_saved: bool  # WARMSTART_ENCRYPT_SAVED: seal what the worker saved outside its image too (weights)
    seal_behind: bool  # WARMSTART_SEAL_BEHIND: seal the large pages images while CRIU writes them (image/behind.py)
    encryption_key: Path | None  # WARMSTART_ENCRYPTION_KEY: a key file to seal with instead of this host's
    decryption_keys: tuple[Path, ...]  # WARMSTART_DECRYPTION_KEYS: older keys still opened, ':'-separated
    model_cache_mb: int  # WARMSTART_MODEL_CACHE_MB: the most the reference worker's model cache holds
    rootfs_exclude: tuple[str, ...]  # WARMSTART_ROOTFS_EXCLUDE: container paths left out of the rootfs diff


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    value = env.get(name, "")
    if value == "":
        return default
    if value not in ("0", "1"):
        raise UsageError(f"{name} must be 0 or 1, not {value!r}", f"unset it or set {name}=0 or {name}=1")
    return value == "1"


def _mode(env: Mapping[str, str], name: str) -> str:
    """auto (decided per image from what it costs and saves here: image/plan.py), 1 (always) or 0 (never)."""
    value = env.get(name, "") or "auto"
    if value not in ("auto", "0", "1"):
        raise UsageError(f"{name} must be auto, 0 or 1, not {value!r}", f"unset it or set {name}=auto")
    return value


def _count(env: Mapping[str, str], name: str, default: int, most: int = 1024) -> int:
    value = env.get(name, "")
    if value == "":
        return default
    if not value.isdigit() or len(value) > 12 or not 1 <= int(value) <= most:
        raise UsageError(f"{name} must be a whole number from 1 to {most}, not {value!r}",
                         f"unset it or set e.g. {name}=8")
    return int(value)


def _paths(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """':'-separated absolute paths."""
    out = tuple(p for p in env.get(name, "").split(":") if p)
    bad = [p for p in out if not p.startswith("/") or "/.." in p or "/./" in p]
    if bad:
        raise UsageError(f"{name} must list absolute paths separated by ':', not {bad[0]!r}",
                         f"e.g. {name}=/root/.cache:/tmp/scratch")
    return tuple(p.rstrip("/") or "/" for p in out)


def default_image_cache_mb(meminfo: Path = Path("/proc/meminfo")) -> int:
    """16 GiB, or a quarter of this host's memory where that is more: a cached image pays only while it is in
    the page cache, and one image of an 8B worker checkpointed without the SDK is 18 GB."""
    try:
        line = next(ln for ln in meminfo.read_text().splitlines() if ln.startswith("MemTotal:"))
        total_mb = int(line.split()[1]) >> 10
    except (OSError, StopIteration, ValueError, IndexError):
        total_mb = 0
    return max(16384, total_mb // 4)


def parse(env: Mapping[str, str]) -> Settings:
    return Settings(
        home=Path(env.get("WARMSTART_HOME") or "/run/warmstart"),
        criu=env.get("WARMSTART_CRIU") or None,
        read_threads=_count(env, "WARMSTART_READ_THREADS", min(os.cpu_count() or 1, 16)),
        huge_pages=_mode(env, "WARMSTART_HUGE_PAGES"),
        image_cache=Path(env.get("WARMSTART_IMAGE_CACHE") or "/var/cache/warmstart/images"),
        image_cache_mb=_count(env, "WARMSTART_IMAGE_CACHE_MB", default_image_cache_mb(), most=1 << 30),
        zero_pages=_mode(env, "WARMSTART_ZERO_PAGES"),
        compress=_mode(env, "WARMSTART_COMPRESS"),
        disk_mbps=_count(env, "WARMSTART_DISK_MBPS", 1500, most=1 << 20),
        debug=env.get("WARMSTART_DEBUG", "") not in ("", "0"),
        key_dir=Path(env.get("WARMSTART_KEY_DIR") or "/var/lib/warmstart/keys"),
        signing_key=Path(env["WARMSTART_SIGNING_KEY"]) if env.get("WARMSTART_SIGNING_KEY") else None,
        trusted_keys=tuple(Path(p) for p in env.get("WARMSTART_TRUSTED_KEYS", "").split(":") if p),
        insecure_unsigned=_flag(env, "WARMSTART_INSECURE_UNSIGNED", False),
        encrypt=_flag(env, "WARMSTART_ENCRYPT", True),
        encrypt_saved=_flag(env, "WARMSTART_ENCRYPT_SAVED", False),
        seal_behind=_flag(env, "WARMSTART_SEAL_BEHIND", True),
        encryption_key=Path(env["WARMSTART_ENCRYPTION_KEY"]) if env.get("WARMSTART_ENCRYPTION_KEY") else None,
        decryption_keys=tuple(Path(p) for p in env.get("WARMSTART_DECRYPTION_KEYS", "").split(":") if p),
        model_cache_mb=modelcache.limit_mb(env),  # parsed there: the worker reads it too
        rootfs_exclude=_paths(env, "WARMSTART_ROOTFS_EXCLUDE"),
    )


def current() -> Settings:
    return parse(os.environ)


def debug_requested() -> bool:
    """WARMSTART_DEBUG alone: read before anything else can fail, so that a bad setting's error is debuggable."""
    return os.environ.get("WARMSTART_DEBUG", "") not in ("", "0")
