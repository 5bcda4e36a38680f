"""Worker-side SDK: call `attach(...)` once the worker is warm.

    ctl = attach(on_quiesce=free_caches, on_resume=reopen, port=8000, engine="myengine")

`on_quiesce()` runs before the dump: finish or block in-flight work, release what should not be in the
image (KV cache, connections). `on_resume(settings)` runs after a restore (settings.restored is True,
with the replica id and port) or after a checkpoint that left the worker running. A worker started
without warmstart (no control directory in its environment) gets None and nothing runs.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from warmstart.worker import lmem, savedir
from warmstart.worker import protocol as p

# Poll slowly while serving; fast while quiesced, since that wait is on the restore's critical path.
_POLL_SERVING_S = 0.05
_POLL_QUIESCED_S = 0.002
_LEASE_CHECK_S = 0.5


@dataclass(frozen=True)
class ResumeSettings:
    restored: bool  # False when the checkpoint left this same process running
    replica: int | None = None
    name: str | None = None
    port: int | None = None  # the host port forwarded to this replica

    @classmethod
    def from_request(cls, settings: dict[str, Any]) -> ResumeSettings:
        return cls(
            restored=bool(settings.get("restored", False)),
            replica=settings.get("replica"),
            name=settings.get("name"),
            port=settings.get("port"),
        )


class Controller:
    def __init__(
        self,
        control_dir: Path,
        on_quiesce: Callable[[], None] | None,
        on_resume: Callable[[ResumeSettings], None] | None,
    ) -> None:
        self.dir = control_dir
        self._on_quiesce = on_quiesce or (lambda: None)
        self._on_resume = on_resume or (lambda s: None)
        self._seq = 0
        self._quiesced = False
        self._lmem: list[lmem.ShrunkStack] = []
        self.last_resume: ResumeSettings | None = None

    def announce(self, port: int | None, engine: str, model: str | None) -> None:
        req = p.read_json(self.dir / p.REQUEST)
        self._seq = int(req["seq"]) if req else 0  # requests older than this worker are not for it
        p.write_json(self.dir / p.WORKER, {"pid": os.getpid(), "sdk": p.SDK_VERSION, "port": port,
                                            "engine": engine, "model": model, "at": time.time()})
        threading.Thread(target=self._loop, name="warmstart-control", daemon=True).start()

    def _ack(self, seq: int, op: str, error: str = "") -> None:
        ack: dict[str, Any] = {"seq": seq, "op": op, "ok": not error, "error": error, "at": time.time()}
        if op == p.QUIESCE and not error:
            from warmstart.gpumem import region  # no CUDA import: it only sums what its regions released
            from warmstart.weights import client as weights

            # Weights mapped from a weight service: the restore asks the service for them (by content hash).
            held = weights.held()
            # The restore must find room for this again on the target GPU, on top of the checkpointed memory:
            # released regions, and GPU weights (a restored worker holds a private copy of them).
            ack["gpu_bytes_to_remap"] = region.released_bytes() + sum(
                w["bytes"] for w in held if w["device"].startswith("cuda"))
            ack["weights"] = held
        p.write_json(self.dir / p.ACK, ack)

    def _handle(self, req: dict[str, Any]) -> None:
        seq, op = int(req["seq"]), req.get("op")
        settings = req.get("settings") or {}
        try:
            if op == p.QUIESCE and not self._quiesced:
                savedir.use(settings.get(p.SAVED_DIR))
                self._on_quiesce()
                self._lmem = _shrink_local_memory()
                self._quiesced = True
            elif op in (p.RESUME, p.CANCEL) and self._quiesced:
                savedir.use(settings.get(p.SAVED_DIR))
                _regrow_local_memory(self._lmem)
                self._lmem = []
                resume = ResumeSettings.from_request(settings)
                self._on_resume(resume)
                self._quiesced = False
                self.last_resume = resume
        except Exception as e:  # the host must hear about any failure, whatever its type
            self._ack(seq, op or "?", f"{type(e).__name__}: {e}")
            return
        self._ack(seq, op or "?")

    def _lease_ran_out(self) -> bool:
        lease = p.read_json(self.dir / p.LEASE)
        return lease is not None and float(lease.get("until", 0)) < time.time()

    def _resume_unasked(self) -> None:
        """The checkpoint that quiesced this worker is gone: serve again, as after a cancel."""
        print("warmstart: the checkpoint that quiesced this worker stopped renewing its lease; resuming",
              file=sys.stderr, flush=True)
        self._handle({"seq": self._seq, "op": p.CANCEL, "settings": {}})
        p.write_json(self.dir / p.ACK, {"seq": self._seq, "op": p.LEASE_EXPIRED, "ok": True, "error": "",
                                         "at": time.time()})

    def _loop(self) -> None:
        stamp: tuple[int, int, int, int] | None = None
        lease_checked = 0.0
        while True:
            time.sleep(_POLL_QUIESCED_S if self._quiesced else _POLL_SERVING_S)
            if self._quiesced and time.monotonic() - lease_checked > _LEASE_CHECK_S:
                lease_checked = time.monotonic()
                if self._lease_ran_out():
                    self._resume_unasked()
                    continue
            try:
                st = os.stat(self.dir / p.REQUEST)
            except FileNotFoundError:
                continue
            new = (st.st_ino, st.st_mtime_ns, st.st_size, st.st_dev)
            if new == stamp:
                continue
            stamp = new
            req = p.read_json(self.dir / p.REQUEST)
            if req and int(req.get("seq", 0)) > self._seq:
                self._seq = int(req["seq"])
                self._handle(req)


def _shrink_local_memory() -> list[lmem.ShrunkStack]:
    try:
        return lmem.shrink()
    except RuntimeError as e:  # only a smaller image is lost: the checkpoint goes on
        print(f"warmstart: local memory not shrunk before the checkpoint ({e})", file=sys.stderr, flush=True)
        return []


def _regrow_local_memory(saved: list[lmem.ShrunkStack]) -> None:
    try:
        lmem.regrow(saved)
    except RuntimeError as e:  # the driver grows it again by itself for any kernel that needs more
        print(f"warmstart: stack limit not set back after the restore ({e})", file=sys.stderr, flush=True)


def attach(
    on_quiesce: Callable[[], None] | None = None,
    on_resume: Callable[[ResumeSettings], None] | None = None,
    *,
    port: int | None = None,
    engine: str = "custom",
    model: str | None = None,
) -> Controller | None:
    """Join warmstart's protocol if this worker runs under warmstart; call once the worker is warm."""
    control = os.environ.get(p.ENV_CONTROL_DIR)
    if not control:
        return None
    ctl = Controller(Path(control), on_quiesce, on_resume)
    ctl.announce(port, engine, model)
    return ctl
