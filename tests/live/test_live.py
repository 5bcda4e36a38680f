"""Live end-to-end: the Helm chart, the agent image and the agent against a real Kubernetes cluster.

    KUBECONFIG=... WARMSTART_LIVE_IMAGE=warmstart/agent:0.1.0 pytest -m live tests/live -v

Skipped, with the reason, unless KUBECONFIG names a cluster that answers and WARMSTART_LIVE_IMAGE names the
agent image (present on the nodes or pullable by them). No mock: every object is the API server's, every pod
runs in the cluster's runtime, every check goes through the API (pod proxy, exec, Events, status).

What it does, in order (docs/kubernetes.md states what each should end in):
  1. helm install the chart (namespace WARMSTART_LIVE_NAMESPACE, default warmstart-live; the agent's
     GPU-only nodeSelector dropped), then an agent runs on a node that every later pod is pinned to;
  2. a labelled source pod running the reference worker (WARMSTART_LIVE_WORKER_IMAGE: the agent image plus
     warmstart's `reference` extra, default the agent image) -> Checkpoint Pending -> Checkpointing -> Ready,
     with its status fields, Events and metrics;
  3. a Deployment of placeholders with the readiness gate, scaled 0 -> 3: each Ready through
     warmstart.dev/restored=True, answering with the source's pid and completion;
  4. failures, each ending in its stated status or condition and one Event, nothing left running, the source
     still serving: a mismatched image (WARMSTART_LIVE_OTHER_IMAGE: another image with warmstart; skipped
     without one) and model, the artifact deleted, the source pod deleted mid-checkpoint (Failed, or Ready
     when CRIU had its memory), the agent pod killed mid-checkpoint and mid-restore, a placeholder deleted mid-restore.
Other settings: WARMSTART_LIVE_PYTHON (the images' Python with warmstart, default python3),
WARMSTART_LIVE_HELM_ARGS (more `helm install` arguments, e.g. --set artifacts.storageClassName=nfs),
WARMSTART_LIVE_KEEP=1 (leave the namespace and release for a look), WARMSTART_LIVE_LOGS=DIR (the agents' logs).
"""

from __future__ import annotations

import json
import os
import shlex
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("kubernetes", reason="the live suite needs the kubernetes package (warmstart[k8s])")

import cluster as live  # noqa: E402 - after the import check
from kubernetes import client, watch  # noqa: E402

WHY_NOT = live.answers()
pytestmark = [pytest.mark.live, pytest.mark.timeout(900),
              pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")]

IMAGE = os.environ.get("WARMSTART_LIVE_IMAGE", "")
WORKER_IMAGE = os.environ.get("WARMSTART_LIVE_WORKER_IMAGE") or IMAGE
OTHER_IMAGE = os.environ.get("WARMSTART_LIVE_OTHER_IMAGE", "")
PYTHON = os.environ.get("WARMSTART_LIVE_PYTHON", "python3")
NS = os.environ.get("WARMSTART_LIVE_NAMESPACE", "warmstart-live")
RELEASE = "ws"
AGENT_SELECTOR = f"app.kubernetes.io/name=warmstart,app.kubernetes.io/instance={RELEASE}"
METRICS_PORT = 9400
REF_PORT, LIGHT_PORT = 8000, 8080
PROMPT = "The warm worker said"
SECCOMP = {"type": "Localhost", "localhostProfile": "warmstart/no-io-uring.json"}


# ---- the release and the node ----

class Env:
    """The installed release: the cluster, the agent's node, the artifact claim and where pods mount it."""

    def __init__(self, kube: live.Cluster) -> None:
        self.kube = kube
        pod = live.wait(lambda: next((p for p in kube.pods(AGENT_SELECTOR) if _ready(p)), None), 300,
                        "an agent pod to be Ready")
        self.node = pod["spec"]["nodeName"]
        labels = kube.core.read_node(self.node).metadata.labels or {}
        self.hostname = labels.get("kubernetes.io/hostname", self.node)
        ds = pod["spec"]
        vol = next(v for v in ds["volumes"] if v["name"] == "artifacts")
        self.claim = vol["persistentVolumeClaim"]["claimName"]
        self.mount = next(m["mountPath"] for m in ds["containers"][0]["volumeMounts"] if m["name"] == "artifacts")
        self.source_pid = 0
        self.completion = ""

    def agent(self) -> str:
        """The Ready agent pod on the node (a new one after a test killed the last)."""
        return str(live.wait(lambda: next((p["metadata"]["name"] for p in self.kube.pods(AGENT_SELECTOR)
                                           if p["spec"].get("nodeName") == self.node and _ready(p)
                                           and not p["metadata"].get("deletionTimestamp")), None),
                             300, f"the agent on {self.node} to be Ready"))

    def ready(self, name: str, timeout: float = 600) -> None:
        """Wait for the pod to be Ready; a container that restarts fails at once, with its log."""
        def check() -> bool:
            pod = self.kube.pod(name)
            if any(s.get("restartCount") for s in pod.get("status", {}).get("containerStatuses") or []):
                raise AssertionError(f"pod {name} restarted: {self.kube.logs(name, previous=True)[-3000:]}")
            return _ready(pod)
        live.wait(check, timeout, f"pod {name} to be Ready")

    def node_processes(self) -> list[str]:
        """Every process's command line on the node, seen from the agent (it runs with hostPID)."""
        return self.kube.processes(self.agent(), PYTHON)

    def criu_running(self, op: str) -> bool:
        return any(any(t == "criu" or t.endswith("/criu") for t in c.split()) and op in c.split()
                   for c in self.node_processes())

    def metrics(self) -> dict[str, float]:
        """The agent's metrics (asked again while a just-replaced agent pod's name still answers 404)."""
        return live.wait(lambda: self.kube.metrics(self.agent(), METRICS_PORT) or {"up": 1.0}, 120, "metrics")

    def pod(self, name: str, labels: dict[str, str], annotations: dict[str, str], command: list[str],
            port: int, image: str = "", gate: bool = False) -> dict[str, Any]:
        """A pod (template) pinned to the agent's node, mounting the artifact claim and the live worker."""
        spec: dict[str, Any] = {
            "nodeSelector": {"kubernetes.io/hostname": self.hostname},
            "terminationGracePeriodSeconds": 5,
            "containers": [{
                "name": "worker", "image": image or WORKER_IMAGE, "imagePullPolicy": "IfNotPresent",
                "command": command, "ports": [{"containerPort": port}],
                "env": [{"name": "WARMSTART_CACHE", "value": f"{self.mount}/{NS}/.model-cache"}],
                "readinessProbe": {"httpGet": {"path": "/health" if port == REF_PORT else "/", "port": port},
                                   "periodSeconds": 2, "timeoutSeconds": 5},
                "securityContext": {"seccompProfile": SECCOMP},
                "volumeMounts": [{"name": "artifacts", "mountPath": self.mount},
                                 {"name": "live", "mountPath": "/live", "readOnly": True}]}],
            "volumes": [{"name": "artifacts", "persistentVolumeClaim": {"claimName": self.claim}},
                        {"name": "live", "configMap": {"name": "live-worker"}}]}
        if gate:
            spec["readinessGates"] = [{"conditionType": live.RESTORED}]
        return {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "labels": labels, "annotations": annotations}, "spec": spec}

    def light_source(self, name: str, mib: int) -> None:
        """A labelled source pod running the live worker with `mib` MiB of memory; Checkpoint `name`."""
        body = self.pod(name, {live.GROUP + "/checkpoint-source": "true"},
                        {live.GROUP + "/checkpoint-name": name, live.GROUP + "/engine": "plain"},
                        ["warmstart", "placeholder", "--", PYTHON, "/live/worker.py", str(LIGHT_PORT), str(mib)],
                        LIGHT_PORT)
        self.kube.core.create_namespaced_pod(NS, body)

    def target(self, name: str, checkpoint: str, image: str = "", **annotations: str) -> None:
        body = self.pod(name, {live.GROUP + "/restore-target": checkpoint},
                        {live.GROUP + "/" + k: v for k, v in annotations.items()}, ["warmstart", "placeholder"],
                        REF_PORT if checkpoint == "ref" else LIGHT_PORT, image=image, gate=True)
        self.kube.core.create_namespaced_pod(NS, body)

    def source_serves(self) -> None:
        """The reference source answers as it did before: same pid, same completion."""
        health = json.loads(self.kube.proxy("live-ref", REF_PORT, "/health"))
        assert health["pid"] == self.source_pid
        assert complete(self.kube, "live-ref") == self.completion


def _ready(pod: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod.get("status", {}).get("conditions") or [])


def complete(kube: live.Cluster, pod: str) -> str:
    out = json.loads(kube.proxy(pod, REF_PORT, "/v1/completions", {"model": "warmstart-reference",
                                                                     "prompt": PROMPT, "max_tokens": 24}))
    return str(out["choices"][0]["text"])


def _delete_namespace(kube: live.Cluster) -> None:
    try:
        kube.core.delete_namespace(NS)
    except client.ApiException as e:
        if e.status != 404:
            raise

    def gone() -> bool:
        try:
            kube.core.read_namespace(NS)
        except client.ApiException as e:
            return e.status == 404
        return False
    live.wait(gone, 300, f"namespace {NS} to be deleted")


def _save_logs(kube: live.Cluster) -> None:
    where = os.environ.get("WARMSTART_LIVE_LOGS")
    if not where:
        return
    Path(where).mkdir(parents=True, exist_ok=True)
    for p in kube.pods(AGENT_SELECTOR):
        name = p["metadata"]["name"]
        Path(where, f"{name}.log").write_text(kube.logs(name))
        Path(where, f"{name}.previous.log").write_text(kube.logs(name, previous=True))


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    kube = live.Cluster(NS)
    _delete_namespace(kube)
    kube.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=NS)))
    kube.core.create_namespaced_config_map(NS, client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name="live-worker"),
        data={"worker.py": (Path(__file__).parent / "worker.py").read_text(),
              "text_server.py": (Path(__file__).parents[1] / "workers" / "text_server.py").read_text()}))
    repo, _, tag = IMAGE.rpartition(":") if ":" in IMAGE.rsplit("/", 1)[-1] else (IMAGE, "", "latest")
    kube.helm("install", RELEASE, str(live.CHART), "--wait", "--timeout", "10m",
              "--set", f"image.repository={repo}", "--set", f"image.tag={tag}",
              "--set", "image.pullPolicy=IfNotPresent", "--set", "nodeSelector=null",
              *shlex.split(os.environ.get("WARMSTART_LIVE_HELM_ARGS", "")))
    e = Env(kube)
    yield e
    _save_logs(kube)
    if not os.environ.get("WARMSTART_LIVE_KEEP"):
        kube.helm("uninstall", RELEASE, "--wait")
        _delete_namespace(kube)


class Phases(threading.Thread):
    """Every phase a Checkpoint goes through, from the API server's watch (no status yet = Pending)."""

    def __init__(self, kube: live.Cluster, name: str) -> None:
        super().__init__(daemon=True)
        self.kube, self.name = kube, name
        self.seen: list[str] = []
        self.started = threading.Event()

    def run(self) -> None:
        w = watch.Watch()
        self.started.set()
        for ev in w.stream(self.kube.custom.list_namespaced_custom_object, live.GROUP, live.VERSION, NS,
                           live.PLURAL, field_selector=f"metadata.name={self.name}", timeout_seconds=600):
            phase = (ev["object"].get("status") or {}).get("phase", "Pending")
            if not self.seen or self.seen[-1] != phase:
                self.seen.append(phase)
            if phase in ("Ready", "Failed"):
                w.stop()


def one_event(kube: live.Cluster, kind: str, name: str, reason: str) -> dict[str, Any]:
    """The agent recorded exactly one Event of `reason` on the object (waiting a little for it to land)."""
    evs = live.wait(lambda: [e for e in kube.agent_events(kind, name) if e["reason"] == reason], 30,
                    f"a {reason} Event on {kind} {name}")
    time.sleep(2)  # a duplicate would come right after
    evs = [e for e in kube.agent_events(kind, name) if e["reason"] == reason]
    assert len(evs) == 1 and evs[0]["count"] == 1, evs
    return evs[0]


def refused(env: Env, pod: str, *words: str) -> dict[str, Any]:
    """The target ends with restored=False (RestoreFailed) naming `words`, one Event, only its placeholder."""
    kube = env.kube
    cond = live.wait(lambda: (c := kube.condition(pod)) and c["status"] == "False" and c, 180,
                     f"{pod}'s restored condition to be False")
    assert cond["reason"] == "RestoreFailed", cond
    for w in words:
        assert w in cond["message"], cond
    ev = one_event(kube, "Pod", pod, "RestoreFailed")
    assert ev["type"] == "Warning" and ev["message"] == cond["message"]

    def only_the_placeholder() -> list[str] | None:  # (its container may be restarting after a killed worker)
        try:
            procs = kube.processes(pod, PYTHON)
        except (IndexError, ValueError):
            return None
        return procs if len(procs) == 1 and procs[0].endswith("warmstart placeholder") else None
    live.wait(only_the_placeholder, 60, f"only the placeholder to run in {pod}")
    assert not _ready(kube.pod(pod))
    return dict(cond)


# ---- 1-3: install, checkpoint, scale ----

def test_chart_installs_a_ready_agent_with_metrics(env: Env) -> None:
    ds = env.kube.apps.read_namespaced_daemon_set(f"{RELEASE}-warmstart", NS)
    assert ds.status.number_ready >= 1 and ds.status.number_ready == ds.status.desired_number_scheduled
    assert "warmstart_operations_total" in env.kube.proxy(env.agent(), METRICS_PORT, "/metrics")
    crd = client.ApiextensionsV1Api().read_custom_resource_definition("checkpoints.warmstart.dev")
    assert any(c.type == "Established" and c.status == "True" for c in crd.status.conditions)


def test_source_pod_is_checkpointed_pending_checkpointing_ready(env: Env) -> None:
    kube = env.kube
    phases = Phases(kube, "ref")
    phases.start()
    phases.started.wait()
    command = ["warmstart", "placeholder", "--", PYTHON, "-m", "warmstart.reference.server", "--host", "0.0.0.0",
               "--port", str(REF_PORT), "--kv-cache-mb", "16"]
    body = env.pod("live-ref", {live.GROUP + "/checkpoint-source": "true", "app": "live-ref"},
                   {live.GROUP + "/checkpoint-name": "ref", live.GROUP + "/engine": "reference",
                    live.GROUP + "/model": "warmstart-reference"}, command, REF_PORT)
    kube.core.create_namespaced_pod(NS, body)
    env.ready("live-ref")
    cr = live.wait(lambda: (c := kube.checkpoint("ref")) and (c.get("status") or {}).get("phase") in
                   ("Ready", "Failed") and c, 600, "Checkpoint ref to end")
    phases.join(30)
    st = cr["status"]
    assert st["phase"] == "Ready", st
    assert phases.seen == ["Pending", "Checkpointing", "Ready"]
    spec = cr["spec"]
    assert spec["engine"] == "reference" and spec["model"] == "warmstart-reference"
    assert spec["image"] == WORKER_IMAGE and spec["args"] == command and len(spec["identity"]) == 16
    assert spec["storage"] == {"claim": env.claim, "path": f"{NS}/ref"}
    assert cr["metadata"]["labels"][live.GROUP + "/source-pod"] == "live-ref"
    assert st["artifact"] == f"{NS}/ref" and st["node"] == env.node and st["sizeBytes"] > 0
    assert st["seconds"] > 0 and st["steps"] and all(v >= 0 for v in st["steps"].values())
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True" and ready["reason"] == "Checkpointed"
    one_event(kube, "Checkpoint", "ref", "Checkpointing")
    assert "MB in" in one_event(kube, "Checkpoint", "ref", "Checkpointed")["message"]
    m = env.metrics()
    assert m['warmstart_operations_total{op="checkpoint",result="ok"}'] == 1
    assert m['warmstart_operation_seconds_count{op="checkpoint"}'] == 1
    assert any(k.startswith('warmstart_step_seconds_count{op="checkpoint"') for k in m)
    # The source was left serving: the same process answers, with the same (greedy) completion each time.
    env.source_pid = json.loads(kube.proxy("live-ref", REF_PORT, "/health"))["pid"]
    env.completion = complete(kube, "live-ref")
    assert env.completion and complete(kube, "live-ref") == env.completion


def test_placeholders_scaled_0_to_3_are_restored_and_answer_as_the_source(env: Env) -> None:
    kube = env.kube
    assert env.completion, "needs the Checkpoint of the previous test"
    template = env.pod("x", {live.GROUP + "/restore-target": "ref", "app": "live-replicas"},
                       {live.GROUP + "/engine": "reference", live.GROUP + "/model": "warmstart-reference"},
                       ["warmstart", "placeholder"], REF_PORT, gate=True)
    del template["metadata"]["name"]
    deploy = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "live-replicas"},
              "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "live-replicas"}},
                       "template": {"metadata": template["metadata"], "spec": template["spec"]}}}
    kube.apps.create_namespaced_deployment(NS, deploy)
    before = env.metrics()
    kube.apps.patch_namespaced_deployment_scale("live-replicas", NS, {"spec": {"replicas": 3}})
    def three_ready() -> bool:
        for p in kube.pods("app=live-replicas"):  # a refusal is final: fail at once, with its reason
            c = next((c for c in p["status"].get("conditions") or [] if c["type"] == live.RESTORED), None)
            assert not c or c["status"] == "True", f"{p['metadata']['name']}: {c['message']}"
        return (kube.apps.read_namespaced_deployment("live-replicas", NS).status.ready_replicas or 0) == 3
    live.wait(three_ready, 600, "3 ready replicas")
    pods = kube.pods("app=live-replicas")
    assert len(pods) == 3
    for p in pods:
        name = p["metadata"]["name"]
        cond = kube.condition(name)
        assert cond and cond["status"] == "True" and cond["reason"] == "Restored", cond
        assert cond["message"].startswith("from Checkpoint ref in ")
        assert one_event(kube, "Pod", name, "Restored")["message"] == cond["message"]
        assert json.loads(kube.proxy(name, REF_PORT, "/health"))["pid"] == env.source_pid
        assert complete(kube, name) == env.completion
    after = env.metrics()
    ok = 'warmstart_operations_total{op="restore",result="ok"}'
    assert after.get(ok, 0) - before.get(ok, 0) == 3
    assert after['warmstart_operation_seconds_count{op="restore"}'] >= 3
    assert after['warmstart_step_seconds_count{op="restore",step="criu_restore"}'] >= 3
    env.source_serves()
    kube.apps.patch_namespaced_deployment_scale("live-replicas", NS, {"spec": {"replicas": 0}})
    live.wait(lambda: not kube.pods("app=live-replicas"), 120, "the replicas to go")


# ---- 4: failures ----

def test_a_target_of_another_image_is_refused(env: Env) -> None:
    if not OTHER_IMAGE:
        pytest.skip("WARMSTART_LIVE_OTHER_IMAGE is not set (another image with warmstart in it)")
    env.target("live-other-image", "ref", image=OTHER_IMAGE)
    refused(env, "live-other-image", f"image {OTHER_IMAGE} differs from the checkpoint's {WORKER_IMAGE}")
    env.kube.delete_pod("live-other-image")
    env.source_serves()


def test_a_target_of_another_model_is_refused(env: Env) -> None:
    env.target("live-other-model", "ref", model="another-model")
    refused(env, "live-other-model", "model another-model differs from the checkpoint's warmstart-reference")
    env.kube.delete_pod("live-other-model")
    env.source_serves()


def _light_checkpoint(env: Env, name: str, mib: int) -> None:
    env.light_source(name, mib)
    env.ready(name)
    live.wait(lambda: env.kube.phase(name) in ("Ready", "Failed"), 600, f"Checkpoint {name} to end")
    assert env.kube.phase(name) == "Ready", env.kube.checkpoint(name)


def test_a_deleted_artifact_is_refused_and_the_source_keeps_serving(env: Env) -> None:
    kube = env.kube
    _light_checkpoint(env, "gone", 64)
    before = kube.proxy("gone", LIGHT_PORT, "/").split()
    kube.exec(env.agent(), ["rm", "-rf", f"{env.mount}/{NS}/gone"])
    env.target("live-gone", "gone")
    refused(env, "live-gone")
    now = kube.proxy("gone", LIGHT_PORT, "/").split()
    assert now[1:] == before[1:] and int(now[0]) > int(before[0])  # same process, still counting
    kube.delete_pod("live-gone")
    env.source_serves()


def _when_checkpointing(env: Env, name: str) -> None:
    """The agent started the pipeline (it writes the phase first): the next seconds are mid-checkpoint."""
    live.wait(lambda: env.kube.phase(name) == "Checkpointing", 300, f"Checkpoint {name} to be Checkpointing",
              every=0.1)


def _when_criu(env: Env, op: str, name: str) -> None:
    live.wait(lambda: env.criu_running(op), 300, f"criu {op} to run for {name}", every=0.2)


def test_a_source_deleted_mid_checkpoint_ends_its_checkpoint_once(env: Env) -> None:
    """Deleted (SIGKILL, grace 0) while the agent checkpoints it: the Checkpoint ends Failed with its reason, or
    Ready when CRIU had its memory already (the artifact is then whole); one Event says which; nothing is left
    behind."""
    kube = env.kube
    env.light_source("midck", 3072)
    _when_checkpointing(env, "midck")
    kube.delete_pod("midck", grace=0, wait_s=0)
    live.wait(lambda: kube.phase("midck") in ("Ready", "Failed"), 300, "Checkpoint midck to end")
    st = kube.checkpoint("midck")["status"]  # type: ignore[index]
    cond = next(c for c in st["conditions"] if c["type"] == "Ready")
    if st["phase"] == "Failed":
        assert cond["status"] == "False" and cond["reason"] == "CheckpointFailed" and st["reason"]
        assert one_event(kube, "Checkpoint", "midck", "CheckpointFailed")["message"] == st["reason"]
        assert not [e for e in kube.agent_events("Checkpoint", "midck") if e["reason"] == "Checkpointed"]
    else:
        assert cond["status"] == "True" and st["sizeBytes"] > 0
        one_event(kube, "Checkpoint", "midck", "Checkpointed")
        assert not [e for e in kube.agent_events("Checkpoint", "midck") if e["reason"] == "CheckpointFailed"]
    live.wait(lambda: kube.gone("Pod", "midck"), 120, "pod midck to go")
    live.wait(lambda: not env.criu_running("dump"), 60, "no criu dump left")
    assert not any("/live/worker.py 8080 3072" in c for c in env.node_processes())
    env.source_serves()


def _agent_deleted_mid_checkpoint(env: Env, name: str, grace: int | None) -> tuple[list[str], str]:
    """A light source checkpointed, its agent pod deleted mid-way (grace 0: SIGKILL; None: the pod's own grace
    period, SIGTERM first); what the source answered before, and the old agent's name."""
    env.light_source(name, 3000)
    env.ready(name)
    before = env.kube.proxy(name, LIGHT_PORT, "/").split()
    _when_checkpointing(env, name)
    old = env.agent()
    env.kube.delete_pod(old, grace=grace, wait_s=150)
    return before, old


def _serves_as_before(env: Env, name: str, before: list[str]) -> None:
    """The source was left serving: the same process, still counting."""
    now = live.wait(lambda: env.kube.get(name, LIGHT_PORT), 60, f"{name} to answer").split()
    assert now[1:] == before[1:] and int(now[0]) > int(before[0])


def test_the_agent_killed_mid_checkpoint_fails_it_at_restart(env: Env) -> None:
    kube = env.kube
    before, old = _agent_deleted_mid_checkpoint(env, "agentck", grace=0)
    live.wait(lambda: env.agent() != old, 300, "a new agent")
    live.wait(lambda: kube.phase("agentck") == "Failed", 120, "Checkpoint agentck to fail")
    st = kube.checkpoint("agentck")["status"]  # type: ignore[index]
    cond = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert cond["reason"] == "AgentRestarted" and "agent restarted" in st["reason"]
    assert one_event(kube, "Checkpoint", "agentck", "CheckpointFailed")["message"] == st["reason"]
    assert not env.criu_running("dump")
    _serves_as_before(env, "agentck", before)
    assert _ready(kube.pod("agentck"))
    kube.delete_pod("agentck")
    env.source_serves()


def test_the_agent_stopped_mid_checkpoint_undoes_it_and_a_deleted_checkpoint_is_taken_again(env: Env) -> None:
    """The agent pod deleted with its grace period (SIGTERM): the agent itself ends the Checkpoint Failed
    (AgentStopped), undoing what it had started, with one Event; the source serves on, the same process. Once
    the Failed Checkpoint is deleted, the next agent checkpoints the source again."""
    kube = env.kube
    before, old = _agent_deleted_mid_checkpoint(env, "graceck", grace=None)  # the chart's grace period
    live.wait(lambda: kube.phase("graceck") in ("Failed", "Ready"), 60, "Checkpoint graceck to end")
    st = kube.checkpoint("graceck")["status"]  # type: ignore[index]
    cond = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert cond["reason"] == "AgentStopped" and "SIGTERM" in st["reason"], st
    assert one_event(kube, "Checkpoint", "graceck", "CheckpointFailed")["message"] == st["reason"]
    live.wait(lambda: env.agent() != old, 300, "a new agent")
    assert not env.criu_running("dump")
    _serves_as_before(env, "graceck", before)
    kube.custom.delete_namespaced_custom_object(live.GROUP, live.VERSION, NS, live.PLURAL, "graceck")
    live.wait(lambda: kube.phase("graceck") == "Ready", 300, "Checkpoint graceck, deleted, to be taken again")
    kube.delete_pod("graceck")
    env.source_serves()


def test_the_agent_killed_mid_restore_leaves_the_target_restored_or_refused_and_clean(env: Env) -> None:
    kube = env.kube
    _light_checkpoint(env, "bigrs", 2900)
    env.target("live-agentrs", "bigrs")
    _when_criu(env, "restore", "live-agentrs")
    old = env.agent()
    kube.delete_pod(old, grace=0, wait_s=120)
    live.wait(lambda: env.agent() != old, 300, "a new agent")
    cond = live.wait(lambda: kube.condition("live-agentrs"), 300, "live-agentrs's restored condition")
    if cond["status"] == "True":  # the new agent restored it again: one Restored Event, serving the source
        one_event(kube, "Pod", "live-agentrs", "Restored")
        src = kube.proxy("bigrs", LIGHT_PORT, "/").split()
        assert kube.proxy("live-agentrs", LIGHT_PORT, "/").split()[1:] == src[1:]
    else:
        refused(env, "live-agentrs")
    kube.delete_pod("live-agentrs")
    env.source_serves()


def test_a_placeholder_deleted_mid_restore_leaves_nothing_running(env: Env) -> None:
    kube = env.kube
    assert kube.phase("bigrs") == "Ready", "needs Checkpoint bigrs of the previous test"
    before = env.metrics()
    env.target("live-delrs", "bigrs")
    _when_criu(env, "restore", "live-delrs")
    kube.delete_pod("live-delrs", grace=0, wait_s=120)
    one_event(kube, "Pod", "live-delrs", "RestoreFailed")
    live.wait(lambda: not env.criu_running("restore"), 60, "no criu restore left")
    workers = [c for c in env.node_processes() if c.startswith(f"{PYTHON} /live/worker.py 8080 2900")]
    assert len(workers) == 1, workers  # the source's only
    failed = 'warmstart_operations_total{op="restore",result="failed"}'
    assert env.metrics().get(failed, 0) - before.get(failed, 0) == 1
    env.source_serves()


def test_a_replica_outlives_its_source_pod(env: Env) -> None:
    """Deleting the source pod stops its container (every process in its cgroups): a restored replica, in its
    own placeholder's cgroups, serves on."""
    kube = env.kube
    assert env.completion, "needs the Checkpoint of the reference source"
    kube.apps.patch_namespaced_deployment_scale("live-replicas", NS, {"spec": {"replicas": 1}})
    live.wait(lambda: (kube.apps.read_namespaced_deployment("live-replicas", NS).status.ready_replicas or 0) == 1,
              300, "a ready replica")
    replica = kube.pods("app=live-replicas")[0]["metadata"]["name"]
    kube.delete_pod("live-ref", wait_s=120)
    assert json.loads(kube.proxy(replica, REF_PORT, "/health"))["pid"] == env.source_pid
    assert complete(kube, replica) == env.completion
    assert _ready(kube.pod(replica))
