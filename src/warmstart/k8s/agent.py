"""`warmstart agent`: the per-node agent. Watches the pods of its own node and acts on reconcile's decisions.

It runs privileged with hostPID (it ptraces workers and enters pod namespaces), with the artifact volume
mounted at the same path as in the pods it serves. Every step is an Event on the pod or Checkpoint and a
Prometheus metric; a failure is a Failed status or a False condition with its reason, never a retry loop.

SIGTERM (the pod deleted, the DaemonSet rolled) or SIGINT stops it cleanly: no new pod is taken, a checkpoint
in flight is cancelled and undone by its pipeline (the source resumes; CRIU's dump is let finish) and ends
Failed with reason AgentStopped, and a restore in flight finishes, since one cut short would leave its
placeholder refused for good. A second signal, or the pod's grace period running out, ends it at once, and
the next agent marks what was left Checkpointing as Failed (AgentRestarted).
"""

from __future__ import annotations

import signal
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from warmstart import gates
from warmstart.errors import EnvironmentProblem, Interrupted, WarmstartError
from warmstart.k8s import containers, informer, reconcile
from warmstart.k8s.resources import (
    GROUP,
    KIND,
    PLURAL,
    RESTORED_CONDITION,
    SKIP_GATES_HINT,
    VERSION,
    condition,
)
from warmstart.pipeline.steps import Cancel

try:  # the agent's dependencies are the optional extra `k8s`; the rest of warmstart never needs them
    from kubernetes import client, config, watch
    from prometheus_client import Counter, Histogram, start_http_server
except ImportError as e:  # pragma: no cover - reported by main()
    _MISSING: Exception | None = e
else:
    _MISSING = None
    OPS = Counter("warmstart_operations_total", "Checkpoints and restores by result", ["op", "result"])
    SECONDS = Histogram("warmstart_operation_seconds", "Duration of checkpoints and restores", ["op"],
                        buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300))
    STEP_SECONDS = Histogram("warmstart_step_seconds", "Duration of each pipeline step", ["op", "step"],
                             buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60))


def _reason(e: Exception) -> str:
    if isinstance(e, gates.Refused):
        return e.line(SKIP_GATES_HINT)
    if isinstance(e, WarmstartError):
        return e.line()
    if isinstance(e, OSError):
        return str(e)
    return f"internal error: {type(e).__name__}: {e} (a bug: see the agent's log and report it)"


NODE_TTL_S = 30.0


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Agent:
    def __init__(self, node: str, claim: str, artifacts: Path) -> None:
        self.node, self.claim, self.artifacts = node, claim, artifacts
        self.core = client.CoreV1Api()
        self.custom = client.CustomObjectsApi()
        self.busy: set[str] = set()  # pod uids being handled
        self.lock = threading.Lock()
        self.caches: dict[str, informer.Informer] = {}  # pods and checkpoints: filled by run()
        self.labels_read: tuple[float, dict[str, str]] | None = None  # (when, this node's labels)
        self.pool: ThreadPoolExecutor | None = None
        self.stop = threading.Event()  # no new pod is taken once set
        self.stopped_by = ""  # the signal that stopped it
        self.cancels: set[Cancel] = set()  # one per checkpoint in flight: shutdown() sets them

    # ---- the API side ----

    def node_labels(self) -> dict[str, str]:
        """This node's labels, read at most every NODE_TTL_S: the chart grants `get` on nodes only, since a
        watch of one node needs `list` on all of them."""
        now = time.monotonic()
        if self.labels_read is None or now - self.labels_read[0] > NODE_TTL_S:
            self.labels_read = (now, dict(self.core.read_node(self.node).metadata.labels or {}))
        return self.labels_read[1]

    def checkpoints(self, namespace: str) -> dict[str, dict[str, Any]]:
        cached = self.caches.get("checkpoints")
        if cached and cached.synced.is_set():
            items = [c for c in cached.snapshot() if c["metadata"].get("namespace") == namespace]
        else:
            items = self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
        return {c["metadata"]["name"]: c for c in items}

    def event(self, obj: dict[str, Any], kind: str, reason: str, message: str, warning: bool = False) -> None:
        meta = obj["metadata"]
        body = client.CoreV1Event(
            metadata=client.V1ObjectMeta(generate_name=f"{meta['name']}.", namespace=meta["namespace"]),
            involved_object=client.V1ObjectReference(kind=kind, name=meta["name"], namespace=meta["namespace"],
                                                     uid=meta.get("uid"), api_version=obj.get("apiVersion")),
            reason=reason, message=message[:1000], type="Warning" if warning else "Normal",
            source=client.V1EventSource(component="warmstart-agent", host=self.node),
            first_timestamp=_now(), last_timestamp=_now(), count=1)
        try:
            self.core.create_namespaced_event(meta["namespace"], body)
        except client.ApiException as e:
            print(f"warmstart agent: event {reason} not recorded: {e.reason}", flush=True)

    def set_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, name, {"status": status})

    # ---- decisions and actions ----

    def decide(self, pod: dict[str, Any]) -> reconcile.Action:
        return reconcile.decide(pod, self.node, self.node_labels(), self.checkpoints(pod["metadata"]["namespace"]),
                                self.claim)

    def handle(self, pod: dict[str, Any]) -> None:
        if self.stop.is_set():
            return
        action = self.decide(pod)
        if isinstance(action, (reconcile.Ignore, reconcile.Wait)):
            return
        uid = pod["metadata"]["uid"]
        with self.lock:
            if uid in self.busy:
                return
            self.busy.add(uid)
        try:
            # An event queued while this pod was handled carries the pod as it was before: decide again on the
            # pod as it is now, or a restore just done would be tried again (and its pod marked failed).
            meta = pod["metadata"]
            pod = client.ApiClient().sanitize_for_serialization(
                self.core.read_namespaced_pod(meta["name"], meta["namespace"]))
            action = self.decide(pod)
            if self.stop.is_set():
                return
            if isinstance(action, reconcile.Checkpoint):
                self.checkpoint(pod, action)
            elif isinstance(action, reconcile.Restore):
                self.restore(pod, action)
            elif isinstance(action, reconcile.Refuse) and not reconcile.already_refused(pod, action.reason):
                self.refuse(pod, action.reason)
        finally:
            with self.lock:
                self.busy.discard(uid)

    def checkpoint(self, pod: dict[str, Any], a: reconcile.Checkpoint) -> None:
        from warmstart import api

        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
                "metadata": {"name": a.name, "namespace": a.namespace,
                             "labels": {f"{GROUP}/source-pod": pod["metadata"]["name"]}},
                "spec": a.spec.body()}
        try:
            cr = self.custom.create_namespaced_custom_object(GROUP, VERSION, a.namespace, PLURAL, body)
        except client.ApiException as e:
            if e.status == 409:
                return  # another agent (or an earlier run) owns it
            raise
        self.set_status(a.namespace, a.name, {"phase": "Checkpointing", "node": self.node, "startedAt": _now(),
                                              **({"imageID": a.image_id} if a.image_id else {})})
        self.event(cr, KIND, "Checkpointing", f"checkpointing pod {pod['metadata']['name']} on {self.node}")
        t0 = time.monotonic()
        out = self.artifacts / a.spec.storage.path
        cancel = self._cancel_token()
        try:
            if not reconcile.inside_namespace(a.spec.storage.path, a.namespace):
                raise WarmstartError(f"storage path {a.spec.storage.path!r} is outside namespace {a.namespace}'s "
                                     "directory of the artifact volume")
            out.parent.mkdir(parents=True, exist_ok=True)
            worker = containers.worker_pid(a.container_id)
            res = api.checkpoint(worker, out, leave_running=True, engine=a.spec.engine, cancel=cancel,
                                 rootfs_exclude=a.rootfs_exclude, progress=lambda line: self.warned(cr, line))
        except Exception as e:  # noqa: BLE001 - any failure ends the Checkpoint as Failed, never Checkpointing
            self.checkpoint_failed(cr, e, stopped=isinstance(e, Interrupted) and cancel.is_set())
            return
        finally:
            with self.lock:
                self.cancels.discard(cancel)
        seconds = time.monotonic() - t0
        OPS.labels("checkpoint", "ok").inc()
        SECONDS.labels("checkpoint").observe(seconds)
        for step, s in res.manifest.step_seconds().items():
            STEP_SECONDS.labels("checkpoint", step).observe(s)
        self.set_status(a.namespace, a.name, {
            "phase": "Ready", "artifact": a.spec.storage.path, "sizeBytes": res.manifest.image_bytes,
            "node": self.node, "seconds": round(seconds, 3), "steps": res.manifest.step_seconds(),
            "conditions": [condition("Ready", True, "Checkpointed", f"{res.manifest.image_bytes} bytes", _now())]})
        self.event(cr, KIND, "Checkpointed", f"{res.manifest.image_bytes / 1e6:.0f} MB in {seconds:.1f} s")

    def checkpoint_failed(self, cr: dict[str, Any], e: Exception, stopped: bool) -> None:
        reason = (f"the agent stopped ({self.stopped_by}) while it checkpointed; what the checkpoint had started "
                  "was undone and the source pod serves on" if stopped else _reason(e))
        OPS.labels("checkpoint", "failed").inc()
        meta = cr["metadata"]
        self.set_status(meta["namespace"], meta["name"], {"phase": "Failed", "reason": reason, "conditions": [
            condition("Ready", False, "AgentStopped" if stopped else "CheckpointFailed", reason, _now())]})
        self.event(cr, KIND, "CheckpointFailed", reason, warning=True)

    def restore(self, pod: dict[str, Any], a: reconcile.Restore) -> None:
        from warmstart import api

        t0 = time.monotonic()
        for line in a.notices:
            self.announce(pod, line)
        try:
            target = containers.init_pid(a.container_id)
            name = f"{a.namespace}.{pod['metadata']['name']}"[:63].rstrip(".-_")
            res = api.restore_into(self.artifacts / a.artifact, target, name=name, skip_gates=a.skip_gates,
                                   progress=lambda line: self.announce(pod, line))
        except Exception as e:  # noqa: BLE001 - any failure is a False condition with its reason
            self.refuse(pod, _reason(e))
            return
        seconds = time.monotonic() - t0
        OPS.labels("restore", "ok").inc()
        SECONDS.labels("restore").observe(seconds)
        rep = res.replicas[0]
        for step, s in (("verify", res.verify_s), ("criu_restore", rep.criu_s), ("cuda_restore", rep.cuda_s),
                        ("ready", rep.ready_s)):
            STEP_SECONDS.labels("restore", step).observe(s)
        self.pod_condition(pod, True, "Restored", f"from Checkpoint {a.name} in {seconds:.2f} s")
        self.event(pod, "Pod", "Restored", f"from Checkpoint {a.name} in {seconds:.2f} s")

    def _cancel_token(self) -> Cancel:
        cancel = Cancel()
        with self.lock:
            self.cancels.add(cancel)
            if self.stop.is_set():
                cancel.set(f"{self.stopped_by}: the agent is stopping")
        return cancel

    def warned(self, cr: dict[str, Any], line: str) -> None:
        """A checkpoint's warning (e.g. it goes without the container's rootfs diff) is a Warning Event on the
        Checkpoint, not lost; the rest of its progress is not worth an API call."""
        if line.startswith(gates.WARNING):
            self.event(cr, KIND, "CheckpointWarning", line.removeprefix(gates.WARNING), warning=True)

    def announce(self, pod: dict[str, Any], line: str) -> None:
        """A restore's progress line: a warning (a gate bypassed) is a Warning Event, a note (a gate not
        evaluated) a Normal one; the rest is not worth an API call."""
        if line.startswith(gates.WARNING):
            self.event(pod, "Pod", "RestoreWarning", line.removeprefix(gates.WARNING), warning=True)
        elif line.startswith(gates.NOTE):
            self.event(pod, "Pod", "RestoreNote", line.removeprefix(gates.NOTE))

    def refuse(self, pod: dict[str, Any], reason: str) -> None:
        OPS.labels("restore", "failed").inc()
        self.event(pod, "Pod", "RestoreFailed", reason, warning=True)  # first: it outlives a pod deleted meanwhile
        try:
            self.pod_condition(pod, False, "RestoreFailed", reason)
        except client.ApiException as e:
            if e.status != 404:
                raise

    def pod_condition(self, pod: dict[str, Any], ok: bool, reason: str, message: str) -> None:
        meta = pod["metadata"]
        self.core.patch_namespaced_pod_status(meta["name"], meta["namespace"], {"status": {"conditions": [
            condition(RESTORED_CONDITION, ok, reason, message, _now())]}})

    # ---- the loop ----

    def shutdown(self, why: str) -> None:
        """Take no new pod, cancel the checkpoints in flight, and return once every pod in hand is done with
        (module docstring)."""
        with self.lock:
            self.stopped_by = why
            self.stop.set()
            busy, cancels = len(self.busy), list(self.cancels)
        print(f"warmstart agent: {why}: stopping; {busy} pod(s) in hand (checkpoints are cancelled and undone, "
              "restores finish)", flush=True)
        for cancel in cancels:
            cancel.set(f"{why}: the agent is stopping")
        if self.pool:
            self.pool.shutdown(wait=True, cancel_futures=True)
        print("warmstart agent: stopped", flush=True)

    def recover(self) -> None:
        """Checkpoints this node's agent left Checkpointing when it died end as Failed, with one Event: their
        pipeline died with that agent (its staging directory is removed by the next checkpoint)."""
        items = self.custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)["items"]
        for cr in items:
            st = cr.get("status") or {}
            if st.get("phase") == "Checkpointing" and st.get("node") == self.node:
                reason = "the agent restarted while it checkpointed; the source pod was left serving"
                meta = cr["metadata"]
                self.set_status(meta["namespace"], meta["name"], {"phase": "Failed", "reason": reason, "conditions": [
                    condition("Ready", False, "AgentRestarted", reason, _now())]})
                self.event(cr, KIND, "CheckpointFailed", reason, warning=True)

    def run(self, workers: int = 4) -> None:
        """Follow this node's pods and the Checkpoints through informers (k8s/informer.py), and
        handle pods in a bounded pool (a checkpoint takes its worker for seconds to minutes). A Checkpoint
        that turns Ready or Failed brings back the restore targets on this node waiting for it."""
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="warmstart-agent")
        to_dict = client.ApiClient().sanitize_for_serialization

        def stream(*args: Any, **kwargs: Any) -> Any:
            return watch.Watch().stream(*args, **kwargs)

        self.caches["checkpoints"] = informer.Informer("checkpoints", self.custom.list_cluster_custom_object,
                                                       GROUP, VERSION, PLURAL, on_change=self._checkpoint_changed)
        pods = self.caches["pods"] = informer.Informer("pods", self.core.list_pod_for_all_namespaces,
                                                       field_selector=f"spec.nodeName={self.node}",
                                                       on_change=self._pod_changed)
        self.caches["checkpoints"].start(stream, to_dict, self.stop)
        pods.run(stream, to_dict, self.stop)  # its list hands every pod of this node to the pool
        if pods.forbidden.is_set():
            raise EnvironmentProblem("the agent may not list and watch pods, which it follows",
                                     "grant list and watch on pods to its service account (the Helm chart does)")

    def _submit(self, pod: dict[str, Any]) -> None:
        if self.pool and not self.stop.is_set():
            try:
                self.pool.submit(self._safe_handle, pod)
            except RuntimeError:  # shut down since the check
                pass

    def _pod_changed(self, kind: str, pod: dict[str, Any]) -> None:
        if kind != "DELETED":
            self._submit(pod)

    def _checkpoint_changed(self, kind: str, cr: dict[str, Any]) -> None:
        deleted = kind == "DELETED"
        if not deleted and (cr.get("status") or {}).get("phase") not in ("Ready", "Failed"):
            return
        pods = self.caches.get("pods")
        meta = cr["metadata"]
        for pod in pods.snapshot() if pods else []:
            if reconcile.concerns(pod, meta["name"], meta.get("namespace", ""), deleted):
                self._submit(pod)

    def _safe_handle(self, pod: dict[str, Any]) -> None:
        try:
            self.handle(pod)
        except Exception:
            print(f"warmstart agent: handling {pod['metadata'].get('name')} failed:\n{traceback.format_exc()}",
                  flush=True)


def _load_config(kubeconfig: str | None) -> None:
    """In a pod, its service account; outside one (or with --kubeconfig / KUBECONFIG), that file."""
    if not kubeconfig:
        try:
            config.load_incluster_config()
            return
        except config.ConfigException:
            pass
    try:
        config.load_kube_config(config_file=kubeconfig)
    except (config.ConfigException, OSError) as e:
        from warmstart.errors import EnvironmentProblem

        raise EnvironmentProblem(f"no Kubernetes API to talk to: not in a pod, and no usable kubeconfig ({e})",
                                 "run the agent through the Helm chart's DaemonSet, or pass --kubeconfig") from None


def main(node: str, claim: str, artifacts: Path, metrics_port: int, kubeconfig: str | None = None) -> None:
    if _MISSING is not None:
        from warmstart.errors import EnvironmentProblem

        raise EnvironmentProblem(f"the agent needs the kubernetes and prometheus-client packages ({_MISSING})",
                                 "pip install 'warmstart[k8s]'")
    _load_config(kubeconfig)
    start_http_server(metrics_port)
    print(f"warmstart agent on node {node}: artifacts in {artifacts} (claim {claim}), metrics on :{metrics_port}",
          flush=True)
    agent = Agent(node, claim, artifacts)
    agent.recover()
    stop_on_signals()
    try:
        agent.run()
    except Stopping as stop:
        agent.shutdown(stop.signame)


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopping(BaseException):
    """A stop signal, raised on the main thread wherever it is (in a watch): a BaseException, so that the
    informer's `except Exception` (the API server went away: watch again) does not swallow it."""

    def __init__(self, signame: str) -> None:
        super().__init__(signame)
        self.signame = signame


def stop_on_signals() -> None:
    """SIGTERM and SIGINT raise Stopping on the main thread (main() then shuts the agent down)."""
    for s in _STOP_SIGNALS:
        signal.signal(s, _raise_stopping)


def _raise_stopping(signum: int, _frame: object) -> None:
    for s in _STOP_SIGNALS:
        signal.signal(s, signal.SIG_DFL)  # a second one ends the agent at once
    raise Stopping(signal.Signals(signum).name)
