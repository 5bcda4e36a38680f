"""The live suite's view of a real cluster (the one KUBECONFIG names): its API, pods reached through the API
server's pod proxy, commands run in pods through exec, and the agent's Events and metrics. Nothing here is
specific to one cluster; tests/live/test_live.py says what it needs."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from kubernetes import client, config
from kubernetes.stream import stream

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "warmstart"
GROUP, VERSION, PLURAL = "warmstart.dev", "v1alpha1", "checkpoints"
RESTORED = "warmstart.dev/restored"
T = TypeVar("T")


def answers() -> str | None:
    """None when a cluster answers at KUBECONFIG, else why not (the suite is skipped with that reason)."""
    path = os.environ.get("KUBECONFIG")
    if not path:
        return "KUBECONFIG is not set: the live suite runs only against a cluster it is given"
    if not os.environ.get("WARMSTART_LIVE_IMAGE"):
        return "WARMSTART_LIVE_IMAGE is not set (the agent image, present on or pullable by the nodes)"
    try:
        config.load_kube_config(config_file=path)
        client.VersionApi().get_code(_request_timeout=5)
    except Exception as e:  # noqa: BLE001 - any reason is a reason to skip
        return f"no cluster answers at KUBECONFIG={path}: {type(e).__name__}: {e}"[:300]
    return None


def helm_binary() -> str:
    return shutil.which("helm") or str(Path(sys.executable).parent / "helm")


def wait(fn: Callable[[], T | None], timeout: float, what: str, every: float = 0.5) -> T:
    """fn() until it returns something truthy; fails naming `what` (and fn's last answer) after timeout s."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = fn()
        except client.ApiException as e:
            last = f"{e.status} {e.reason}"
        else:
            if last:
                return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last: {last!r})")


class Cluster:
    def __init__(self, namespace: str) -> None:
        self.ns = namespace
        self.core = client.CoreV1Api()
        self.apps = client.AppsV1Api()
        self.custom = client.CustomObjectsApi()

    def helm(self, *args: str) -> str:
        r = subprocess.run([helm_binary(), *args, "--namespace", self.ns], capture_output=True, text=True,
                           timeout=600, env={**os.environ})
        assert r.returncode == 0, f"helm {' '.join(map(shlex.quote, args))}: {r.stderr}"
        return r.stdout

    # ---- objects ----

    def pod(self, name: str) -> dict[str, Any]:
        return dict(client.ApiClient().sanitize_for_serialization(self.core.read_namespaced_pod(name, self.ns)))

    def pods(self, selector: str) -> list[dict[str, Any]]:
        items = self.core.list_namespaced_pod(self.ns, label_selector=selector).items
        return [client.ApiClient().sanitize_for_serialization(p) for p in items]

    def checkpoint(self, name: str) -> dict[str, Any] | None:
        try:
            return dict(self.custom.get_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name))
        except client.ApiException as e:
            if e.status == 404:
                return None
            raise

    def phase(self, name: str) -> str | None:
        cr = self.checkpoint(name)
        return None if cr is None else (cr.get("status") or {}).get("phase", "Pending")

    def gone(self, kind: str, name: str) -> bool:
        try:
            (self.core.read_namespaced_pod if kind == "Pod" else self.core.read_namespaced_config_map)(name, self.ns)
        except client.ApiException as e:
            return e.status == 404
        return False

    def delete_pod(self, name: str, grace: int | None = None, wait_s: float = 60) -> None:
        try:
            self.core.delete_namespaced_pod(name, self.ns, grace_period_seconds=grace)
        except client.ApiException as e:
            if e.status != 404:
                raise
        if wait_s:
            wait(lambda: self.gone("Pod", name), wait_s, f"pod {name} to go")

    def events(self, kind: str, name: str) -> list[dict[str, Any]]:
        items = self.core.list_namespaced_event(
            self.ns, field_selector=f"involvedObject.kind={kind},involvedObject.name={name}").items
        return [{"reason": e.reason, "type": e.type, "message": e.message, "count": e.count,
                 "source": e.source.component if e.source else None} for e in items]

    def agent_events(self, kind: str, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events(kind, name) if e["source"] == "warmstart-agent"]

    def condition(self, pod: str, ctype: str = RESTORED) -> dict[str, Any] | None:
        conds = self.pod(pod).get("status", {}).get("conditions") or []
        return next((c for c in conds if c.get("type") == ctype), None)

    # ---- inside pods ----

    def proxy(self, pod: str, port: int, path: str, body: dict[str, Any] | None = None) -> str:
        """An HTTP request to the pod's port through the API server's pod proxy (GET, or POST of JSON)."""
        url = f"/api/v1/namespaces/{self.ns}/pods/{pod}:{port}/proxy/{path.lstrip('/')}"
        api, method = self.core.api_client, "POST" if body is not None else "GET"
        headers = {"Content-Type": "application/json", "Accept": "*/*"}
        if not hasattr(api, "param_serialize"):  # kubernetes < 35
            resp = api.call_api(url, method, header_params=headers, body=body, auth_settings=["BearerToken"],
                                _preload_content=False, _request_timeout=60)
            return str(resp[0].data.decode())
        method, url, headers, data, _ = api.param_serialize(method, url, header_params=headers, body=body,
                                                            auth_settings=["BearerToken"])
        out = api.call_api(method, url, header_params=headers, body=data, _request_timeout=60)
        out.read()
        if not 200 <= out.status < 300:
            raise client.ApiException(status=out.status, reason=out.reason)
        return str(out.data.decode())

    def get(self, pod: str, port: int, path: str = "/") -> str | None:
        """GET through the proxy; None while nothing answers."""
        try:
            return self.proxy(pod, port, path)
        except client.ApiException:
            return None

    def exec(self, pod: str, command: list[str], container: str | None = None) -> str:
        kw = {"container": container} if container else {}
        return str(stream(self.core.connect_get_namespaced_pod_exec, pod, self.ns, command=command,
                          stderr=True, stdin=False, stdout=True, tty=False, _request_timeout=60, **kw))

    def processes(self, pod: str, python: str, container: str | None = None) -> list[str]:
        """The command lines of every process in the pod's container but the one asking (pid namespace)."""
        code = ("import os, json\nout = []\nfor p in os.listdir('/proc'):\n"
                "    if p.isdigit() and p != str(os.getpid()):\n"
                "        try:\n            raw = open(f'/proc/{p}/cmdline', 'rb').read()\n"
                "        except OSError:\n            continue  # gone meanwhile\n"
                "        out.append(raw.replace(b'\\0', b' ').decode(errors='replace').strip())\n"
                "print(json.dumps(sorted(c for c in out if c)))\n")
        out = self.exec(pod, [python, "-c", code], container)
        return list(json.loads(out.strip().splitlines()[-1]))

    # ---- the agent ----

    def metrics(self, agent_pod: str, port: int) -> dict[str, float]:
        """The agent's Prometheus samples, 'name{labels}' -> value."""
        out: dict[str, float] = {}
        for line in self.proxy(agent_pod, port, "/metrics").splitlines():
            m = re.match(r"^(warmstart_[a-z_]+(?:\{[^}]*\})?) (\S+)$", line)
            if m:
                out[m.group(1)] = float(m.group(2))
        return out

    def logs(self, pod: str, previous: bool = False) -> str:
        try:
            return str(self.core.read_namespaced_pod_log(pod, self.ns, previous=previous, _request_timeout=30))
        except client.ApiException as e:
            return f"(no log: {e.status} {e.reason})"
