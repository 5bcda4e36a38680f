"""The public Python API (warmstart.api, re-exported by warmstart), called off the main thread as an
orchestrator (or the Kubernetes agent) calls it, with real CRIU and real processes."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

import warmstart
from conftest import COUNTER, free_port, http_get, wait_http
from warmstart.errors import Interrupted

pytestmark = [pytest.mark.criu, pytest.mark.slow]
T = TypeVar("T")


def in_thread(fn: Callable[[], T]) -> T:
    """fn() in a new thread (not the main one); its result, or its exception re-raised here."""
    box: dict[str, object] = {}

    def body() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised below
            box["error"] = e

    t = threading.Thread(target=body)
    t.start()
    t.join(timeout=120)
    assert not t.is_alive(), "the call did not return"
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def test_checkpoint_and_restore_from_other_threads(need_criu, home: Path, tmp_path: Path) -> None:
    port = free_port()
    warmstart.run("counter", [sys.executable, str(COUNTER), str(port)])
    wait_http(port)
    n_before, boot, _ = http_get(port).split()

    done = in_thread(lambda: warmstart.checkpoint("counter", tmp_path / "art", leave_running=True))
    assert done.artifact == tmp_path / "art" and done.manifest.image_bytes > 0
    assert {"stage", "criu_dump", "checksum"} <= set(done.manifest.step_seconds())

    res = in_thread(lambda: warmstart.restore(tmp_path / "art", name="copy"))
    (rep,) = res.replicas
    assert rep.port is not None and res.steps and res.steps[0].step == "verify"
    n_after, boot_after, _ = http_get(rep.port).split()
    assert boot_after == boot and int(n_after) >= int(n_before)  # the same process, continued
    assert {w.name for w in warmstart.workers() if w.alive()} == {"counter", "copy"}
    warmstart.stop("copy")
    assert http_get(port).split()[1] == boot  # the source still serves


def test_a_cancelled_checkpoint_undoes_itself_and_the_worker_serves(need_criu, home: Path, tmp_path: Path) -> None:
    port = free_port()
    warmstart.run("counter", [sys.executable, str(COUNTER), str(port)])
    wait_http(port)
    boot = http_get(port).split()[1]
    cancel = warmstart.Cancel()
    seen: list[str] = []

    def progress(line: str) -> None:
        seen.append(line)
        if line.startswith("dumping"):  # set from inside a step: acted on at the next step boundary
            cancel.set("the test")

    with pytest.raises(Interrupted, match="checkpoint interrupted by the test"):
        in_thread(lambda: warmstart.checkpoint("counter", tmp_path / "art", progress=progress, cancel=cancel))
    assert any(s.startswith("dumping") for s in seen)
    assert not (tmp_path / "art").exists() and not list(tmp_path.glob(".art*"))  # staging removed
    time.sleep(0.1)
    assert http_get(port).split()[1] == boot  # not stopped: the checkpoint never finished
