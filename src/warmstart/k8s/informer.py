"""A list-then-watch cache of one kind of object, as client-go's informers keep one: the agent decides on it
instead of asking the API server for every Checkpoint on every pod event.

The kubernetes client's own watch is enough for the two kinds the agent follows (its node's pods and the
Checkpoints), so kopf is not used: it would bring its own event loop and handler model for what is
a list, a watch from the list's resourceVersion, and a list again when the API server answers 410 Gone.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

Obj = dict[str, Any]
Lister = Callable[..., Any]  # a client method: list_* (a list) or, under watch.Watch().stream, a watch
Changed = Callable[[str, Obj], None]  # (ADDED | MODIFIED | DELETED, object), after the cache has it


def key(obj: Obj) -> str:
    meta = obj["metadata"]
    return f"{meta.get('namespace') or ''}/{meta['name']}"


class Gone(Exception):
    """The watch's resourceVersion is too old (410): list again."""


class Informer:
    def __init__(self, name: str, lister: Lister, *args: Any, on_change: Changed | None = None,
                 **kwargs: Any) -> None:
        self.name, self.lister, self.args, self.kwargs = name, lister, args, kwargs
        self.on_change = on_change or (lambda _t, _o: None)
        self.items: dict[str, Obj] = {}
        self.version: str | None = None
        self.lock = threading.Lock()
        self.synced = threading.Event()
        self.forbidden = threading.Event()  # the list or watch was refused (403): RBAC, which retrying won't change

    def snapshot(self) -> list[Obj]:
        with self.lock:
            return list(self.items.values())

    def relist(self, listed: Obj) -> None:
        """Replace the cache with a list's answer (as dicts); its resourceVersion is where the watch starts.
        Every object listed counts as changed: what changed while no watch ran is not known."""
        items = listed.get("items") or []
        with self.lock:
            self.items = {key(o): o for o in items}
            self.version = (listed.get("metadata") or {}).get("resourceVersion")
        self.synced.set()
        for o in items:
            self.on_change("ADDED", o)

    def apply(self, event: Obj) -> None:
        """One watch event (as dicts). Raises Gone on an ERROR event (410: the version is too old)."""
        kind, obj = event["type"], event["object"]
        if kind == "ERROR":
            raise Gone(str(obj.get("message", obj)))
        with self.lock:
            if kind == "DELETED":
                self.items.pop(key(obj), None)
            elif kind in ("ADDED", "MODIFIED"):
                self.items[key(obj)] = obj
            self.version = (obj.get("metadata") or {}).get("resourceVersion") or self.version
        if kind in ("ADDED", "MODIFIED", "DELETED"):
            self.on_change(kind, obj)

    def run(self, stream: Callable[..., Any], to_dict: Callable[[Any], Obj], stop: threading.Event) -> None:
        """List, then watch from there until `stop`; list again after a 410 or a failed watch (5 s later)."""
        from kubernetes import client

        while not stop.is_set():
            try:
                if self.version is None:
                    self.relist(to_dict(self.lister(*self.args, **self.kwargs)))
                for ev in stream(self.lister, *self.args, resource_version=self.version, timeout_seconds=300,
                                 **self.kwargs):
                    self.apply({"type": ev["type"], "object": to_dict(ev["object"])})
                    if stop.is_set():
                        return
            except Gone:
                self.version = None
            except client.ApiException as e:
                if e.status == 403:
                    print(f"warmstart agent: {self.name} may not be listed and watched ({e.status} {e.reason}); not "
                          "cached: read on each use (grant list and watch to the agent's service account)", flush=True)
                    self.forbidden.set()
                    return
                self.version = None if e.status == 410 else self.version
                print(f"warmstart agent: {self.name} watch failed ({e.status} {e.reason}); again in 5 s", flush=True)
                stop.wait(5)
            except Exception as e:  # noqa: BLE001 - the API server went away: watch again
                print(f"warmstart agent: {self.name} watch failed ({e}); again in 5 s", flush=True)
                stop.wait(5)

    def start(self, stream: Callable[..., Any], to_dict: Callable[[Any], Obj], stop: threading.Event,
              timeout_s: float = 60.0) -> None:
        """Run in a daemon thread; return once the first list is in, or was refused (or after timeout_s, still
        listing)."""
        threading.Thread(target=self.run, args=(stream, to_dict, stop), name=f"warmstart-{self.name}",
                         daemon=True).start()
        deadline = time.monotonic() + timeout_s
        while (not self.synced.wait(1) and not self.forbidden.is_set() and time.monotonic() < deadline
               and not stop.is_set()):
            pass
