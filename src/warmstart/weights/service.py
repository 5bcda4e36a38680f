"""`warmstart weights serve`: keeps model weights resident and hands them to local workers.

    worker ──unix socket──► {"op": "get", "files": [...], "hash": H?}
           ◄─────────────── {"ok": true, "hash": H, "layout": {...}, "device": "cpu"|"cuda:N"} + one fd (SCM_RIGHTS)

A weight set is a list of safetensors files, identified by the SHA-256 of their contents (headers, then the
SHA-256 of each 64 MiB piece of their data, in order): workers asking for the same files share one copy,
and a restore that names a hash gets exactly those weights or an error. Loading reads on several threads
straight into the shared memory (CPU) or through pinned buffers to the GPU, hashing as it reads. Other ops:
"prefetch" (load, no fd: a restore starts the load while CRIU runs), "copy" (GPU: copy the weights into
memory the worker exported and sent with the request: a process restored by CRIU cannot import memory
exported by another process, CUDA_ERROR_OPERATING_SYSTEM on driver 580, but can export its own) and "status".
"""

from __future__ import annotations

import array
import hashlib
import json
import os
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, cast

from warmstart.errors import EnvironmentProblem, UsageError
from warmstart.weights import backing
from warmstart.weights.layout import Layout, plan

DEFAULT_SOCKET = "/run/warmstart/weights.sock"
THREADS = min(32, os.cpu_count() or 8)  # reading and hashing both run on these threads

FileKey = tuple[tuple[str, int, int], ...]  # (path, size, mtime_ns) of each file
Digest = tuple[int, int, bytes]  # (file index, piece index, SHA-256 of the piece or b"")


@dataclass
class WeightSet:
    key: FileKey
    layout: Layout
    memory: backing.Memory | None  # None until loaded
    hash: str
    load_s: float
    served: int = 0
    copies: int = 0
    ready: threading.Event = field(default_factory=threading.Event)

    def loaded(self) -> backing.Memory:
        if self.memory is None:
            raise RuntimeError("loading the weights failed (see the service's log)")
        return self.memory


class _Piece(NamedTuple):
    """One read of a load: CHUNK bytes (or a file's last, shorter piece) of one file's data section."""

    file: int  # index in the layout's files
    number: int  # of the piece in its file
    file_offset: int
    blob_offset: int
    n: int


def _pieces(layout: Layout) -> list[_Piece]:
    return [_Piece(i, j, f.data_start + off, f.offset + off, min(backing.CHUNK, f.size - off))
            for i, f in enumerate(layout.files) for j, off in enumerate(range(0, f.size, backing.CHUNK))]


def _content_hash(layout: Layout, digests: list[Digest]) -> str:
    h = hashlib.sha256()
    for i, f in enumerate(layout.files):
        with open(f.path, "rb") as fh:
            h.update(fh.read(f.data_start))  # the header: names, dtypes, shapes
        for fi, _, d in digests:
            if fi == i:
                h.update(d)
    return h.hexdigest()


def _file_key(paths: list[Path]) -> FileKey:
    out = []
    for p in sorted(paths, key=lambda p: p.name):
        st = p.stat()
        out.append((str(p.resolve()), st.st_size, st.st_mtime_ns))
    return tuple(out)


def _stamps(paths: list[Path]) -> str:
    """Size, mtime, ctime and inode of each file: any write changes ctime, which user space cannot set back."""
    out = []
    for p in sorted(paths, key=lambda p: p.name):
        st = p.stat()
        out.append([str(p.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev])
    return json.dumps(out)


class Store:
    """The loaded weight sets, by their files; one load at a time per set, any number of readers.

    Content hashes are remembered by the files' stamps (hash_cache), so a restarted service loads known
    files at read speed instead of hashing them again.
    """

    def __init__(self, device: str, hash_cache: Path | None = None) -> None:
        self.device = device
        self.hash_cache = hash_cache
        self.sets: dict[FileKey, WeightSet] = {}
        self._lock = threading.Lock()
        self._staging: list[backing.Staging] = []

    def get(self, files: list[str]) -> WeightSet:
        paths = [Path(f) for f in files]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"weight file not found: {missing[0]}")
        key = _file_key(paths)
        with self._lock:
            ws = self.sets.get(key)
            owner = ws is None
            if ws is None:
                ws = WeightSet(key, plan(paths), None, "", 0.0)
                self.sets[key] = ws
        if owner:
            try:
                self._load(ws)
            except BaseException:
                with self._lock:
                    del self.sets[key]
                ws.ready.set()
                raise
            ws.ready.set()
        ws.ready.wait()
        ws.loaded()
        return ws

    def _memory(self, size: int, name: str) -> backing.Memory:
        if self.device == "cpu":
            return backing.CpuBacking(size, name)
        return backing.CudaBacking(size, name, int(self.device.split(":")[1]))

    def _known_hash(self, stamps: str) -> str | None:
        try:
            return json.loads(self.hash_cache.read_text()).get(stamps) if self.hash_cache else None
        except (OSError, ValueError):
            return None

    def _remember_hash(self, stamps: str, digest: str) -> None:
        if not self.hash_cache:
            return
        try:
            known = json.loads(self.hash_cache.read_text())
        except (OSError, ValueError):
            known = {}
        known[stamps] = digest
        tmp = self.hash_cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known))
        os.replace(tmp, self.hash_cache)

    def _load(self, ws: WeightSet) -> None:
        t0 = time.monotonic()
        stamps = _stamps([Path(f.path) for f in ws.layout.files])
        known = self._known_hash(stamps)
        mem = self._memory(ws.layout.size, Path(ws.layout.files[0].path).parent.name)
        digests = self._read(mem, ws.layout, hashing=not known)
        if known is None:
            known = _content_hash(ws.layout, digests)
            if _stamps([Path(f.path) for f in ws.layout.files]) == stamps:  # unchanged while we read it
                self._remember_hash(stamps, known)
        ws.memory, ws.hash, ws.load_s = mem, known, time.monotonic() - t0
        print(f"warmstart weights: loaded {ws.layout.size / 1e9:.2f} GB ({len(ws.layout.files)} files, "
              f"{ws.hash[:12]}) to {mem.device} in {ws.load_s:.2f} s "
              f"({ws.layout.size / max(ws.load_s, 1e-9) / 1e9:.1f} GB/s)", flush=True)

    def _read(self, mem: backing.Memory, layout: Layout, hashing: bool) -> list[Digest]:
        """Read every piece of the files into mem, on THREADS threads; closes mem if that fails."""
        pieces = _pieces(layout)
        fds = [os.open(f.path, os.O_RDONLY) for f in layout.files]
        if isinstance(mem, backing.CudaBacking) and not self._staging:
            self._staging = [mem.staging() for _ in range(THREADS)]
        read = self._reader(mem, fds, hashing)
        try:
            with ThreadPoolExecutor(max_workers=THREADS) as pool:
                return sorted(pool.map(read, pieces))
        except BaseException:
            mem.close()
            raise
        finally:
            for fd in fds:
                os.close(fd)

    def _reader(self, mem: backing.Memory, fds: list[int], hashing: bool) -> Callable[[_Piece], Digest]:
        """What a loading thread does with each piece; on a GPU, each thread takes a staging buffer of its own."""
        local = threading.local()
        counter = iter(range(THREADS))
        counter_lock = threading.Lock()

        def read(t: _Piece) -> Digest:
            if isinstance(mem, backing.CudaBacking):
                if not hasattr(local, "buf"):
                    with counter_lock:
                        local.buf = self._staging[next(counter)]
                data = mem.load_pinned(fds[t.file], t.file_offset, t.blob_offset, t.n, local.buf)
            else:
                data = mem.load(fds[t.file], t.file_offset, t.blob_offset, t.n)
            return t.file, t.number, hashlib.sha256(data).digest() if hashing else b""

        return read


def _status(store: Store) -> dict[str, Any]:
    sets = [{"hash": ws.hash, "files": [k[0] for k in ws.key], "bytes": ws.layout.size,
             "load_s": round(ws.load_s, 3), "served": ws.served, "copies": ws.copies}
            for ws in list(store.sets.values()) if ws.memory is not None]
    return {"ok": True, "device": store.device, "sets": sets}


def _answer(store: Store, req: dict[str, Any], fds: list[int]) -> tuple[dict[str, Any], int | None]:
    op = req.get("op")
    if op == "status":
        return _status(store), None
    if op not in ("get", "prefetch", "copy"):
        return {"ok": False, "error": f"unknown op {op!r}"}, None
    ws = store.get(list(req.get("files") or []))
    mem = ws.loaded()
    want = req.get("hash")
    if want and want != ws.hash:
        return {"ok": False, "error": f"weight hash mismatch: the files now hash to {ws.hash[:16]}, "
                                      f"the worker was checkpointed with {want[:16]}"}, None
    if op == "prefetch":
        return {"ok": True, "hash": ws.hash, "load_s": ws.load_s}, None
    if op == "copy":  # into the worker's own memory (its fd came with the request)
        if not fds or not isinstance(mem, backing.CudaBacking):
            return {"ok": False, "error": "copy needs GPU weights and the worker's memory descriptor"}, None
        t0 = time.monotonic()
        mem.copy_into(fds[0], int(req["size"]))
        ws.copies += 1
        return {"ok": True, "hash": ws.hash, "copy_s": round(time.monotonic() - t0, 4)}, None
    ws.served += 1
    return {"ok": True, "hash": ws.hash, "device": mem.device, "layout": ws.layout.to_json()}, mem.export_fd()


def _requests(conn: socket.socket) -> Iterator[tuple[bytes, list[int]]]:
    """Each request line on the connection, with the descriptors that came with it."""
    buf = b""
    fds: list[int] = []
    while True:
        data, anc, _, _ = conn.recvmsg(1 << 16, socket.CMSG_SPACE(4 * 4))
        if not data:
            return
        buf += data
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield line, fds
            fds = []


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        store = cast(_Server, self.server).store
        for line, fds in _requests(self.request):
            try:
                answer, fd = _answer(store, json.loads(line), fds)
            except Exception as e:  # one bad request must not take the service down for the others
                answer, fd = {"ok": False, "error": f"{type(e).__name__}: {e}"}, None
            finally:
                for f in fds:
                    os.close(f)
            data = (json.dumps(answer) + "\n").encode()
            if fd is None:
                self.request.sendall(data)
            else:
                try:
                    self.request.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
                finally:
                    os.close(fd)


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, store: Store) -> None:
        self.store = store
        super().__init__(path, _Handler)


def serve(socket_path: str, device: str) -> None:
    if device != "cpu":
        try:
            from warmstart.gpumem import vmm

            vmm.primary_context(int(device.split(":")[1]))
        except (ImportError, RuntimeError) as e:
            raise EnvironmentProblem(f"cannot use {device} for weights: {e}",
                                     "install cuda-bindings and check the GPU, or serve with --device cpu") from None
    path = Path(socket_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(str(path))
            raise UsageError(f"a weight service already listens on {path}", "use it, or pass another --socket")
        except ConnectionRefusedError:
            path.unlink()  # a stale socket of a service that died
        finally:
            probe.close()
    server = _Server(str(path), Store(device, path.with_name(path.name + ".hashes.json")))
    os.chmod(path, 0o600)
    print(f"warmstart weights: serving on {path} ({device})", flush=True)
    server.serve_forever()
