"""Writing artifacts atomically and refusing any that are incomplete, corrupt or tampered with.

An artifact is built in a hidden sibling directory (`.NAME.partial-PID`) and renamed into place only
after every image file is checksummed and the manifest is on disk, so a dump that dies midway never
leaves a directory that looks like an artifact. Image files are not fsync'd: a crash that loses their
pages is caught by the checksums at restore, which is what the checksums are for.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from warmstart import linux, paths, procs
from warmstart.artifact import signing
from warmstart.artifact.manifest import (
    IMAGES_DIR,
    MANIFEST_NAME,
    ROOTFS_DIR,
    SAVED_DIR,
    SCHEMA_VERSION,
    SHM_DIR,
    FileEntry,
    Manifest,
)
from warmstart.errors import ArtifactError, UsageError

_CHUNK = 8 << 20
TREE_CHUNK = 64 << 20
_PARTIAL = ".partial-"


@dataclass(frozen=True)
class Staging:
    final: Path
    tmp: Path

    @property
    def images(self) -> Path:
        return self.tmp / IMAGES_DIR


def _marker(tmp: Path) -> Path:
    """Where this host notes a staging directory while a checkpoint builds it, so that one killed midway is
    found and removed later wherever it was written (`remove_stale_partials`)."""
    return paths.state_dir("partials") / (hashlib.sha256(str(tmp).encode()).hexdigest()[:24] + ".path")


def _owner(tmp: Path) -> int | None:
    name = tmp.name
    pid = name.rpartition(_PARTIAL)[2] if name.startswith(".") and _PARTIAL in name else ""
    return int(pid) if pid.isdigit() else None


def remove_stale_partials() -> list[Path]:
    """The staging directories of checkpoints that died (their process is gone): removed; returns them. Only a
    directory this user owns, named as a staging directory and noted by this host, is removed."""
    removed = []
    for marker in paths.state_dir("partials").glob("*.path"):
        tmp = Path(marker.read_text())
        pid = _owner(tmp)
        if pid is not None and procs.alive(pid):
            continue
        try:
            st = os.lstat(tmp)
            if pid is not None and stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid():
                shutil.rmtree(tmp)
                removed.append(tmp)
        except FileNotFoundError:
            pass
        marker.unlink(missing_ok=True)
    return removed


def stage(final: Path) -> Staging:
    final = final.absolute()
    if final.exists():
        raise UsageError(f"{final} already exists", "choose a new output directory or remove the old one")
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials()
    tmp = final.parent / f".{final.name}{_PARTIAL}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    _marker(tmp).write_text(str(tmp))
    tmp.mkdir(mode=0o700)
    (tmp / IMAGES_DIR).mkdir(mode=0o700)
    return Staging(final=final, tmp=tmp)


def discard(staging: Staging) -> None:
    shutil.rmtree(staging.tmp, ignore_errors=True)
    _marker(staging.tmp).unlink(missing_ok=True)


def digest_range(path: Path, start: int, length: int | None, stop: Callable[[], None]) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        left = length
        while left is None or left > 0:
            stop()
            chunk = f.read(_CHUNK if left is None else min(_CHUNK, left))
            if not chunk:
                break
            h.update(chunk)
            if left is not None:
                left -= len(chunk)
    return h.digest()


def chunk_size_for(size: int) -> int:
    """Files this big are hashed as a tree of chunks, so one large image file uses every core."""
    return TREE_CHUNK if size > 2 * TREE_CHUNK else 0


class HashWhileWriting:
    """The checksum `checksum` would compute of a file that is being written front to back, hashed piece by
    piece on `pool` as the writer passes each piece, so that no pass reads it all again afterwards. The first
    piece is hashed last: writers of sealed and compressed files write their header there when done."""

    def __init__(self, path: Path, pool: ThreadPoolExecutor, stop: Callable[[], None]) -> None:
        self.path, self.pool, self.stop = path, pool, stop
        self.pieces: list[Future[bytes]] = []  # of pieces 1, 2, ...
        self.digest = ""  # set by finish

    def _submit(self, i: int) -> None:
        self.pieces.append(self.pool.submit(digest_range, self.path, i * TREE_CHUNK, TREE_CHUNK, self.stop))

    def written(self, upto: int) -> None:
        """Bytes [0, upto) are written: hash the whole pieces among them not hashed yet."""
        while (len(self.pieces) + 2) * TREE_CHUNK <= upto:
            self._submit(len(self.pieces) + 1)

    def finish(self, size: int) -> str:
        """The file is complete, `size` bytes, nothing of it to change: its checksum (waits for the pieces)."""
        if not chunk_size_for(size):
            self.digest = digest_range(self.path, 0, None, self.stop).hex()
            return self.digest
        while (len(self.pieces) + 1) * TREE_CHUNK < size:
            self._submit(len(self.pieces) + 1)
        first = digest_range(self.path, 0, TREE_CHUNK, self.stop)
        self.digest = hashlib.sha256(first + b"".join(f.result() for f in self.pieces)).hexdigest()
        return self.digest


def _hash_all(root: Path, files: list[tuple[str, int, int]], stop: Callable[[], None] = lambda: None
              ) -> dict[str, str]:
    """{rel: hex digest} for (rel, size, chunk_bytes) entries.

    chunk_bytes 0: SHA-256 of the file. Otherwise: SHA-256 of the concatenated SHA-256 digests of each
    chunk_bytes-long piece. hashlib drops the GIL while hashing, so the pieces hash in parallel threads.
    """
    tasks: list[tuple[str, int, int | None]] = []
    for rel, size, chunk in files:
        if chunk:
            tasks += [(rel, off, chunk) for off in range(0, max(size, 1), chunk)]
        else:
            tasks.append((rel, 0, None))
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 2)) as pool:
        digests = list(pool.map(lambda t: digest_range(root / t[0], t[1], t[2], stop), tasks))
    parts: dict[str, list[bytes]] = {}
    for (rel, _, _), d in zip(tasks, digests, strict=True):
        parts.setdefault(rel, []).append(d)
    chunked = {rel for rel, _, chunk in files if chunk}
    return {rel: hashlib.sha256(b"".join(ds)).hexdigest() if rel in chunked else ds[0].hex()
            for rel, ds in parts.items()}


def _image_files(root: Path) -> list[str]:
    out = []
    for top in (IMAGES_DIR, SHM_DIR, SAVED_DIR, ROOTFS_DIR):
        for dirpath, _, names in os.walk(root / top):
            for n in names:
                out.append(str((Path(dirpath) / n).relative_to(root)))
    return sorted(out)


def stored_bytes(root: Path, files: list[FileEntry]) -> int:
    """Bytes the artifact's files take on disk: /dev/shm segments are sparse (mostly holes)."""
    return sum(min(f.size, (root / f.path).stat().st_blocks * 512) if f.path.startswith(SHM_DIR + "/") else f.size
               for f in files)


def checksum(staging: Staging, stop: Callable[[], None] = lambda: None,
             known: Mapping[Path, str] | None = None) -> list[FileEntry]:
    """known: checksums of files already hashed as they were written (HashWhileWriting), by path."""
    sizes = {r: (staging.tmp / r).stat().st_size for r in _image_files(staging.tmp)}
    chunks = {r: chunk_size_for(n) for r, n in sizes.items()}
    have = {r: known[staging.tmp / r] for r in sizes if known and staging.tmp / r in known}
    digests = have | _hash_all(staging.tmp, [(r, n, chunks[r]) for r, n in sizes.items() if r not in have], stop)
    return [FileEntry(path=r, size=n, sha256=digests[r], chunk_bytes=chunks[r]) for r, n in sizes.items()]


def make_private(root: Path) -> None:
    """Every directory of the tree 0700 and every file 0600: an artifact holds process memory (prompts, keys).
    Symlinks are left as they are, never followed."""
    for dirpath, _, files in os.walk(root):
        os.chmod(dirpath, 0o700)
        for n in files:
            p = Path(dirpath) / n
            if not p.is_symlink():
                os.chmod(p, 0o600)


def commit(staging: Staging, manifest: Manifest, sign: bool = True) -> Path:
    """Write the manifest (whose `files` came from `checksum`) and its signature, make the tree private, and
    rename the directory into place."""
    data = manifest.model_dump_json(indent=2).encode()
    linux.write_new(staging.tmp / MANIFEST_NAME, data)
    if sign:
        linux.write_new(staging.tmp / signing.SIGNATURE_NAME, signing.sign(data))
    make_private(staging.tmp)
    os.rename(staging.tmp, staging.final)
    _marker(staging.tmp).unlink(missing_ok=True)
    dfd = os.open(staging.final.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return staging.final


def require(artifact: Path) -> Path:
    """The manifest's path, or an error saying why this is no artifact."""
    artifact = artifact.absolute()
    if not artifact.is_dir():
        raise ArtifactError(f"no artifact at {artifact}", "pass the directory `warmstart checkpoint -o` wrote")
    mpath = artifact / MANIFEST_NAME
    if not mpath.is_file():
        raise ArtifactError(
            f"{artifact} is not a warmstart artifact: {MANIFEST_NAME} is missing (an interrupted checkpoint?)",
            "checkpoint the worker again",
        )
    return mpath


def load(artifact: Path) -> Manifest:
    mpath = require(artifact)
    try:
        raw = json.loads(mpath.read_text())
    except (ValueError, RecursionError) as e:  # bad JSON, a 5000-digit number, nesting deeper than Python's stack
        raise ArtifactError(f"{mpath} is corrupt: {e}", "checkpoint the worker again") from e
    version = raw.get("schema_version") if isinstance(raw, dict) else None
    if version != SCHEMA_VERSION:
        raise ArtifactError(
            f"{mpath} has schema version {version!r}; this warmstart reads {SCHEMA_VERSION}",
            "restore it with the warmstart version that wrote it, or checkpoint again",
        )
    try:
        return Manifest.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ArtifactError(f"{mpath} is corrupt: {where}: {first['msg']}", "checkpoint the worker again") from e


def _stamp(st: os.stat_result) -> list[int]:
    # Any write to a file changes its ctime, and ctime cannot be set from user space.
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _cache_path(artifact: Path) -> Path:
    key = hashlib.sha256(str(artifact).encode()).hexdigest()[:24]
    return paths.home() / "verified" / f"{key}.json"


def _stamps(artifact: Path, manifest: Manifest) -> dict[str, list[int]]:
    """Size-check every listed file and return its stamp; raise naming the first missing or wrong one."""
    listed = {f.path for f in manifest.files}
    for rel in _image_files(artifact):
        if rel not in listed:
            raise ArtifactError(
                f"unexpected file {artifact / rel} is not in the manifest (tampered artifact?)",
                "remove the file or checkpoint again",
            )
    stamps: dict[str, list[int]] = {}
    for f in manifest.files:
        p = artifact / f.path
        try:
            st = p.stat()
        except FileNotFoundError:
            raise ArtifactError(f"artifact file {p} is missing",
                                "copy the whole artifact directory or checkpoint again") from None
        if st.st_size != f.size:
            raise ArtifactError(
                f"artifact file {p} is {st.st_size} bytes, the manifest says {f.size} (truncated or tampered)",
                "copy the artifact again or checkpoint again",
            )
        stamps[f.path] = _stamp(st)
    stamps[MANIFEST_NAME] = _stamp((artifact / MANIFEST_NAME).stat())
    return stamps


def _remember(artifact: Path, stamps: dict[str, list[int]]) -> None:
    cache = _cache_path(artifact)
    paths.state_dir("verified")
    tmp = cache.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(stamps))
    os.replace(tmp, cache)


def remember_verified(artifact: Path, manifest: Manifest) -> None:
    """Record an artifact this process has just checksummed itself (after `commit`). Best effort: without the
    record (a full state disk) the next restore checksums the files again."""
    artifact = artifact.absolute()
    try:
        _remember(artifact, _stamps(artifact, manifest))
    except OSError:
        pass


def verify(artifact: Path, manifest: Manifest, use_cache: bool = True, stop: Callable[[], None] = lambda: None
           ) -> float:
    """Check every file against the manifest; raise naming the first bad file. Returns bytes hashed.

    A successful check is remembered by size, mtime, ctime and inode of every file and the manifest;
    a later restore of an untouched artifact skips re-hashing.
    """
    artifact = artifact.absolute()
    stamps = _stamps(artifact, manifest)
    if use_cache:
        try:
            if json.loads(_cache_path(artifact).read_text()) == stamps:
                return 0
        except (FileNotFoundError, json.JSONDecodeError):
            pass
    digests = _hash_all(artifact, [(f.path, f.size, f.chunk_bytes) for f in manifest.files], stop)
    for f in manifest.files:
        if digests[f.path] != f.sha256:
            raise ArtifactError(
                f"artifact file {artifact / f.path} does not match its checksum (corrupt or tampered)",
                "copy the artifact again or checkpoint again",
            )
    _remember(artifact, stamps)
    return float(sum(f.size for f in manifest.files))
