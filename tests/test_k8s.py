"""Kubernetes: the Helm chart rendered by real Helm and validated against the Kubernetes schemas, the
Checkpoint CRD's schema, reconcile decisions on real pod JSON, and container discovery through real cgroups.

No API server runs here: the agent's loop against a live cluster is not exercised (docs/kubernetes.md).
The node data plane (restore into a placeholder's namespaces, dump from a container's) is tests/test_joinns.py.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from conftest import COUNTER, REPO, WARMSTART, free_port, get_when_up, http_get
from warmstart import linux, procs
from warmstart.k8s import containers, reconcile
from warmstart.k8s.resources import RESTORED_CONDITION, CheckpointSpec, Storage, condition

CHART = REPO / "deploy" / "helm" / "warmstart"
EXAMPLE = REPO / "deploy" / "examples" / "vllm.yaml"
FIXTURES = REPO / "tests" / "k8s"
K8S_VERSION = "1.30.0"
HELM = Path(sys.executable).parent / "helm"


def helm(*args: str) -> str:
    r = subprocess.run([str(HELM), *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def render(*sets: str) -> list[dict]:
    args = ["template", "ws", str(CHART), "--namespace", "warmstart", "--include-crds"]
    for s in sets:
        args += ["--set", s]
    return [d for d in yaml.safe_load_all(helm(*args)) if d]


def validate(doc: dict) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_chart_lints() -> None:
    helm("lint", "--strict", str(CHART))


@pytest.mark.parametrize("sets", [
    [],
    ["metrics.serviceMonitor.enabled=true", "metrics.serviceMonitor.labels.release=prom"],
    ["artifacts.create=false", "artifacts.claimName=shared-ckpts", "seccomp.install=false"],
])
def test_chart_renders_and_every_manifest_validates(sets: list[str]) -> None:
    docs = render(*sets)
    kinds = {d["kind"] for d in docs}
    assert {"CustomResourceDefinition", "DaemonSet", "ClusterRole", "ClusterRoleBinding", "ServiceAccount",
            "Service"} <= kinds
    for d in docs:
        if d["apiVersion"] == "monitoring.coreos.com/v1":  # the Prometheus Operator's kind: not in the schemas
            assert d["kind"] == "ServiceMonitor" and d["spec"]["endpoints"][0]["port"] == "metrics"
            continue
        validate(d)
    ds = next(d for d in docs if d["kind"] == "DaemonSet")["spec"]["template"]["spec"]
    assert ds["hostPID"] is True and ds["containers"][0]["securityContext"]["privileged"] is True
    claim = next(v for v in ds["volumes"] if v["name"] == "artifacts")["persistentVolumeClaim"]["claimName"]
    pvcs = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    if "artifacts.create=false" in sets:
        assert claim == "shared-ckpts" and not pvcs and "initContainers" not in ds
    else:
        assert pvcs[0]["metadata"]["name"] == claim and pvcs[0]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_rbac_is_least_privilege() -> None:
    role = next(d for d in render() if d["kind"] == "ClusterRole")
    granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
               for v in rule["verbs"]}
    assert ("", "pods", "delete") not in granted and ("", "secrets", "get") not in granted
    assert not any(v in ("*", "delete", "deletecollection", "update") for _, _, v in granted)
    assert not any(r == "*" or g == "*" for g, r, _ in granted)
    assert {("", "pods/status", "patch"), ("warmstart.dev", "checkpoints/status", "patch"),
            ("", "events", "create")} <= granted


def test_seccomp_profile_refuses_only_io_uring() -> None:
    cm = next(d for d in render() if d["kind"] == "ConfigMap")
    profile = json.loads(cm["data"]["no-io-uring.json"])
    assert profile["defaultAction"] == "SCMP_ACT_ALLOW"
    assert sorted(profile["syscalls"][0]["names"]) == ["io_uring_enter", "io_uring_register", "io_uring_setup"]


def test_example_validates() -> None:
    docs = [d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d]
    for d in docs:
        validate(d)
    target = next(d for d in docs if d["metadata"]["name"] == "llm-replicas")["spec"]["template"]
    assert target["metadata"]["labels"]["warmstart.dev/restore-target"] == "llama-8b"
    assert target["spec"]["readinessGates"] == [{"conditionType": "warmstart.dev/restored"}]


def test_every_value_is_documented() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    doc = (REPO / "docs" / "kubernetes.md").read_text()

    def leaves(d: dict, prefix: str = "") -> list[str]:
        out = []
        for k, v in d.items():
            path = f"{prefix}{k}"
            free_form = isinstance(v, dict) and any("/" in key or "." in key for key in v)  # e.g. label maps
            out += leaves(v, path + ".") if isinstance(v, dict) and v and not free_form else [path]
        return out

    missing = [p for p in leaves(values) if f"`{p}`" not in doc]
    assert not missing, f"values not in docs/kubernetes.md: {missing}"


def _crd_schema() -> dict:
    crd = yaml.safe_load((CHART / "crds" / "checkpoints.warmstart.dev.yaml").read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_checkpoint_objects_the_agent_writes_fit_the_crd() -> None:
    spec = CheckpointSpec(engine="vllm", model="m", image="img:1", gpuModel="NVIDIA-H100-80GB-HBM3",
                          args=["python", "-m", "vllm"], storage=Storage(claim="c", path="ns/llama"))
    obj = {"apiVersion": "warmstart.dev/v1alpha1", "kind": "Checkpoint", "metadata": {"name": "llama"},
           "spec": spec.body(),
           "status": {"phase": "Ready", "artifact": "ns/llama", "sizeBytes": 123, "node": "n1", "seconds": 4.2,
                      "steps": {"criu_dump": 2.1}, "conditions": [condition("Ready", True, "Checkpointed", "ok",
                                                                             "2026-11-23T10:00:00Z")]}}
    jsonschema.validate(obj, _crd_schema())
    bad = copy.deepcopy(obj)
    bad["status"]["phase"] = "Done"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, _crd_schema())


def test_identity_ignores_storage_and_covers_the_rest() -> None:
    a = CheckpointSpec(image="i", args=["x"], storage=Storage(claim="c", path="p"))
    assert a.identity() == CheckpointSpec(image="i", args=["x"], storage=Storage(claim="d", path="q")).identity()
    assert a.identity() != CheckpointSpec(image="i", args=["y"], storage=Storage(claim="c", path="p")).identity()
    assert a.identity() != CheckpointSpec(image="j", args=["x"], storage=Storage(claim="c", path="p")).identity()


# ---- reconcile decisions on pod JSON as the API serves it ----

NODE = "gpu-node-1"
GPU = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}


def pod(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def ready_checkpoint(**spec: object) -> dict:
    body = {"image": "registry.example.com/vllm-warmstart:0.32.0", "engine": "vllm",
            "model": "meta-llama/Meta-Llama-3-8B-Instruct", "gpuModel": GPU["nvidia.com/gpu.product"],
            "storage": {"claim": "ws-warmstart-artifacts", "path": "warmstart/llama-8b"}, **spec}
    return {"metadata": {"name": "llama-8b"}, "spec": body,
            "status": {"phase": "Ready", "artifact": "warmstart/llama-8b"}}


def test_ready_source_is_checkpointed_once() -> None:
    a = reconcile.decide(pod("source-pod"), NODE, GPU, {}, "ws-warmstart-artifacts")
    assert isinstance(a, reconcile.Checkpoint)
    assert (a.name, a.namespace) == ("llama-8b", "warmstart")
    assert a.container_id.startswith("containerd://8f3e")
    assert a.spec.engine == "vllm" and a.spec.gpu_model == "NVIDIA-H100-80GB-HBM3"
    assert a.spec.args[:2] == ["warmstart", "placeholder"] and "--enable-sleep-mode" in a.spec.args
    assert a.spec.storage.path == "warmstart/llama-8b"
    for phase in ("Checkpointing", "Ready", "Failed"):
        existing = {"llama-8b": {"status": {"phase": phase, "reason": "x"}}}
        assert isinstance(reconcile.decide(pod("source-pod"), NODE, GPU, existing, "c"), reconcile.Ignore), phase


def test_source_not_ready_or_elsewhere_waits_or_is_ignored() -> None:
    p = pod("source-pod")
    next(c for c in p["status"]["conditions"] if c["type"] == "Ready")["status"] = "False"
    assert isinstance(reconcile.decide(p, NODE, GPU, {}, "c"), reconcile.Wait)
    assert isinstance(reconcile.decide(pod("source-pod"), "other-node", GPU, {}, "c"), reconcile.Ignore)
    p = pod("source-pod")
    p["metadata"]["deletionTimestamp"] = "2026-11-23T11:00:00Z"
    assert isinstance(reconcile.decide(p, NODE, GPU, {}, "c"), reconcile.Ignore)


def test_target_restores_from_a_ready_matching_checkpoint() -> None:
    a = reconcile.decide(pod("target-pod"), NODE, GPU, {"llama-8b": ready_checkpoint()}, "c")
    assert isinstance(a, reconcile.Restore)
    assert a.artifact == "warmstart/llama-8b" and a.container_id.startswith("containerd://1a2b")


def test_target_waits_for_its_checkpoint_and_its_container() -> None:
    assert isinstance(reconcile.decide(pod("target-pod"), NODE, GPU, {}, "c"), reconcile.Wait)
    pending = ready_checkpoint()
    pending["status"] = {"phase": "Checkpointing"}
    assert isinstance(reconcile.decide(pod("target-pod"), NODE, GPU, {"llama-8b": pending}, "c"), reconcile.Wait)
    p = pod("target-pod")
    p["status"]["containerStatuses"][0]["state"] = {"waiting": {"reason": "ContainerCreating"}}
    assert isinstance(reconcile.decide(p, NODE, GPU, {"llama-8b": ready_checkpoint()}, "c"), reconcile.Wait)


def test_target_is_refused_when_the_checkpoint_does_not_match() -> None:
    cases = {
        "image": ready_checkpoint(image="registry.example.com/vllm-warmstart:0.31.0"),
        "GPU": ready_checkpoint(gpuModel="NVIDIA-A100-SXM4-80GB"),
        "model": ready_checkpoint(model="other/model"),
    }
    for word, ckpt in cases.items():
        a = reconcile.decide(pod("target-pod"), NODE, GPU, {"llama-8b": ckpt}, "c")
        assert isinstance(a, reconcile.Refuse) and word in a.reason, (word, a)
    failed = ready_checkpoint()
    failed["status"] = {"phase": "Failed", "reason": "volume full"}
    a = reconcile.decide(pod("target-pod"), NODE, GPU, {"llama-8b": failed}, "c")
    assert isinstance(a, reconcile.Refuse) and "volume full" in a.reason


def test_an_artifact_outside_the_pods_namespace_is_refused() -> None:
    for path in ("other-ns/llama-8b", "default/../other-ns/x", "/etc", "default"):
        ckpt = ready_checkpoint()
        ckpt["status"]["artifact"] = path
        a = reconcile.decide(pod("target-pod"), NODE, GPU, {"llama-8b": ckpt}, "c")
        assert isinstance(a, reconcile.Refuse) and "not inside namespace" in a.reason, (path, a)


def test_the_same_refusal_twice_is_recognised() -> None:
    """A pod update (or the echo of the agent's own patch) that brings the same refusal changes nothing."""
    failed = ready_checkpoint()
    failed["status"] = {"phase": "Failed", "reason": "volume full"}
    p = pod("target-pod")
    a = reconcile.decide(p, NODE, GPU, {"llama-8b": failed}, "c")
    assert isinstance(a, reconcile.Refuse) and not reconcile.already_refused(p, a.reason)
    p["status"].setdefault("conditions", []).append(
        condition(RESTORED_CONDITION, False, "RestoreFailed", a.reason, "t"))
    assert reconcile.already_refused(p, a.reason)
    assert not reconcile.already_refused(p, "another reason")


def test_restored_target_is_left_alone() -> None:
    p = pod("target-pod")
    p["status"]["conditions"].append({"type": "warmstart.dev/restored", "status": "True"})
    assert isinstance(reconcile.decide(p, NODE, GPU, {"llama-8b": ready_checkpoint()}, "c"), reconcile.Ignore)


# ---- container discovery through real cgroups ----

def _pids_cgroup_root() -> Path:
    for root in (Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup")):
        if (root / "cgroup.procs").exists() and os.access(root, os.W_OK):
            return root
    pytest.skip("no writable pids cgroup hierarchy (needs root)")


@contextlib.contextmanager
def container(cid: str, script: str):
    """A 'container': `sh -c script` as pid 1 of its own pid, mount and network namespaces (loopback up),
    in a cgroup named as containerd names a container's."""
    root = _pids_cgroup_root()
    cg = root / "kubepods.slice" / f"cri-containerd-{cid}.scope"
    cg.mkdir(parents=True, exist_ok=True)
    p = subprocess.Popen(["unshare", "--pid", "--fork", "--mount", "--net", "--mount-proc", "sh", "-c",
                          f"echo $$ > {cg}/cgroup.procs; exec </dev/null >/dev/null 2>&1; ip link set lo up; "
                          + script], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while not containers.pids_of(f"containerd://{cid}") and time.monotonic() < deadline:
            time.sleep(0.02)
        yield p
    finally:
        members = containers.pids_of(f"containerd://{cid}")
        for pid in members:
            try:
                (root / "cgroup.procs").write_text(str(pid))
            except ProcessLookupError:
                pass
        for pid in members:
            procs.terminate(pid, grace_s=1)
        p.kill()
        p.wait()
        cg.rmdir()
        try:
            (root / "kubepods.slice").rmdir()
        except OSError:
            pass  # holds other cgroups: not ours to remove


def _wait_for(fn, timeout: float = 10):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def test_container_processes_found_by_container_id() -> None:
    cid = "ab" * 32
    with container(cid, "sleep 60 & wait"):
        found = _wait_for(lambda: len(containers.pids_of(f"containerd://{cid}")) >= 2 and
                          containers.pids_of(f"containerd://{cid}"))
        init = containers.init_pid(f"containerd://{cid}")
        assert procs.nspid(init)[-1] == 1 and init in found
        assert containers.worker_pid(f"containerd://{cid}") in found
    with pytest.raises(Exception, match="no process of container"):
        containers.init_pid("containerd://" + "cd" * 32)
    with pytest.raises(Exception, match="unexpected container id"):
        containers.container_hex("docker:/x")


def test_agent_module_imports_with_its_extra() -> None:
    from warmstart.k8s import agent

    assert agent._MISSING is None
    assert re.match(r"^\w+$", agent.OPS._name)


# ---- the agent's node side, for real, with the Kubernetes API kept in memory ----

class MemoryApi:
    """Stands in for the API server only (no cluster here): keeps Checkpoints, Events and pod conditions."""

    def __init__(self, node_labels: dict[str, str]) -> None:
        self.node_labels = node_labels
        self.checkpoints: dict[str, dict] = {}
        self.events: list = []
        self.pod_conditions: dict[str, list] = {}
        self.pods: dict[str, dict] = {}  # each pod as last handed to the agent

    # CoreV1Api
    def read_namespaced_pod(self, name: str, namespace: str) -> dict:
        pod = copy.deepcopy(self.pods[name])
        for c in self.pod_conditions.get(name, []):  # as the API server merges the agent's patches
            conds = pod["status"].setdefault("conditions", [])
            conds[:] = [x for x in conds if x["type"] != c["type"]] + [c]
        return pod

    def read_node(self, name: str):
        from kubernetes import client

        return client.V1Node(metadata=client.V1ObjectMeta(name=name, labels=self.node_labels))

    def create_namespaced_event(self, namespace: str, body) -> None:
        self.events.append(body)

    def patch_namespaced_pod_status(self, name: str, namespace: str, body: dict) -> None:
        self.pod_conditions.setdefault(name, []).extend(body["status"]["conditions"])

    # CustomObjectsApi
    def list_namespaced_custom_object(self, group, version, namespace, plural) -> dict:
        return {"items": list(self.checkpoints.values())}

    def list_cluster_custom_object(self, group, version, plural) -> dict:
        return {"items": list(self.checkpoints.values())}

    def create_namespaced_custom_object(self, group, version, namespace, plural, body) -> dict:
        from kubernetes import client

        if body["metadata"]["name"] in self.checkpoints:
            raise client.ApiException(status=409, reason="AlreadyExists")
        obj = copy.deepcopy(body)
        obj["metadata"].update(uid="cr-uid", namespace=namespace)
        self.checkpoints[obj["metadata"]["name"]] = obj
        return obj

    def patch_namespaced_custom_object_status(self, group, version, namespace, plural, name, body) -> None:
        self.checkpoints[name].setdefault("status", {}).update(body["status"])


def _agent(api: MemoryApi, artifacts: Path):
    from warmstart.k8s.agent import Agent

    a = Agent.__new__(Agent)
    a.node, a.claim, a.artifacts = NODE, "ws-warmstart-artifacts", artifacts
    a.core = a.custom = api
    a.busy, a.lock = set(), __import__("threading").Lock()
    a.caches, a.pool, a.stop, a.labels_read = {}, None, __import__("threading").Event(), None
    a.stopped_by, a.cancels = "", set()
    handle = a.handle

    def remembered(pod: dict) -> None:
        api.pods[pod["metadata"]["name"]] = pod
        handle(pod)
    a.handle = remembered
    return a


def test_a_checkpoint_left_checkpointing_by_a_dead_agent_is_failed_at_start_up(tmp_path: Path) -> None:
    api = MemoryApi(GPU)
    mine, other = ready_checkpoint(), ready_checkpoint()
    mine["metadata"].update(name="mine", namespace="warmstart")
    other["metadata"].update(name="other", namespace="warmstart")
    mine["status"] = {"phase": "Checkpointing", "node": NODE}
    other["status"] = {"phase": "Checkpointing", "node": "another-node"}
    api.checkpoints = {"mine": mine, "other": other}
    _agent(api, tmp_path).recover()
    assert mine["status"]["phase"] == "Failed" and "agent restarted" in mine["status"]["reason"]
    assert other["status"]["phase"] == "Checkpointing"  # another node's agent owns it
    assert [e.reason for e in api.events] == ["CheckpointFailed"]


def _pod(fixture: str, cid: str, **annotations: str) -> dict:
    p = pod(fixture)
    p["status"]["containerStatuses"][0]["containerID"] = f"containerd://{cid}"
    p["metadata"]["annotations"].update(annotations)
    return p


@pytest.mark.criu
def test_agent_checkpoints_a_source_pod_and_restores_it_into_placeholders(need_criu, home: Path,
                                                                          tmp_path: Path) -> None:

    api = MemoryApi({})
    agent = _agent(api, tmp_path / "artifacts")
    port = free_port()
    ws = " ".join(WARMSTART)
    src_cid, dst_cid, bad_cid = "5a" * 32, "6b" * 32, "7c" * 32
    with container(src_cid, f"exec {ws} placeholder -- {sys.executable} {COUNTER} {port}"):
        worker = _wait_for(lambda: procs.children(containers.init_pid(f"containerd://{src_cid}")))[0]
        boot = linux.in_network_of(worker, lambda: get_when_up(port)).split()[1]
        source = _pod("source-pod", src_cid, **{"warmstart.dev/engine": "plain"})
        agent.handle(source)
        ckpt = api.checkpoints["llama-8b"]
        assert ckpt["status"]["phase"] == "Ready", ckpt["status"]
        assert ckpt["status"]["sizeBytes"] > 0 and ckpt["status"]["node"] == NODE
        assert ckpt["status"]["imageID"] == SOURCE_DIGEST  # the source container's, for the image-digest gate
        assert (tmp_path / "artifacts" / ckpt["status"]["artifact"] / "manifest.json").is_file()
        assert [e.reason for e in api.events] == ["Checkpointing", "Checkpointed"]
        assert linux.in_network_of(worker, lambda: http_get(port)).split()[1] == boot  # source still serving
        agent.handle(source)  # once per Checkpoint name
        assert len(api.events) == 2

        target = _pod("target-pod", dst_cid, **{"warmstart.dev/engine": "plain",
                                                "warmstart.dev/model": ckpt["spec"]["model"]})
        with container(dst_cid, f"exec {ws} placeholder"):
            agent.handle(target)
            cond = api.pod_conditions[target["metadata"]["name"]][-1]
            assert (cond["type"], cond["status"]) == ("warmstart.dev/restored", "True"), cond
            ph = containers.init_pid(f"containerd://{dst_cid}")
            assert linux.in_network_of(ph, lambda: http_get(port)).split()[1] == boot

        wrong = _pod("target-pod", bad_cid)
        wrong["metadata"]["name"] = "wrong-image"
        wrong["spec"]["containers"][0]["image"] = "registry.example.com/vllm-warmstart:0.31.0"
        with container(bad_cid, f"exec {ws} placeholder"):
            agent.handle(wrong)
            cond = api.pod_conditions["wrong-image"][-1]
            assert cond["status"] == "False" and "image" in cond["message"]
            assert not procs.children(containers.init_pid(f"containerd://{bad_cid}"))  # left clean
        assert api.events[-1].type == "Warning" and api.events[-1].reason == "RestoreFailed"

        # The artifact gone from the volume: refused with the reason, the placeholder left clean.
        shutil.rmtree(tmp_path / "artifacts" / ckpt["status"]["artifact"])
        gone = _pod("target-pod", bad_cid, **{"warmstart.dev/engine": "plain"})
        gone["metadata"]["name"] = "no-artifact"
        with container(bad_cid, f"exec {ws} placeholder"):
            agent.handle(gone)
            cond = api.pod_conditions["no-artifact"][-1]
            assert cond["status"] == "False" and "artifact" in cond["message"], cond
            assert not procs.children(containers.init_pid(f"containerd://{bad_cid}"))


@pytest.mark.criu
def test_agent_marks_a_checkpoint_on_a_full_volume_failed_and_leaves_the_source_serving(
        need_criu, home: Path, tmp_path: Path) -> None:
    vol = tmp_path / "artifacts"
    vol.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(vol)], check=True)  # a full volume
    try:
        api = MemoryApi({})
        agent = _agent(api, vol)
        src_cid = "8d" * 32
        port = free_port()
        with container(src_cid, f"exec {' '.join(WARMSTART)} placeholder -- {sys.executable} {COUNTER} {port}"):
            worker = _wait_for(lambda: procs.children(containers.init_pid(f"containerd://{src_cid}")))[0]

            before = linux.in_network_of(worker, lambda: get_when_up(port)).split()
            agent.handle(_pod("source-pod", src_cid, **{"warmstart.dev/engine": "plain"}))
            st = api.checkpoints["llama-8b"]["status"]
            assert st["phase"] == "Failed" and st["reason"], st
            assert api.events[-1].reason == "CheckpointFailed" and api.events[-1].type == "Warning"
            after = linux.in_network_of(worker, lambda: http_get(port)).split()
            assert after[1] == before[1] and int(after[0]) > int(before[0])  # the source kept serving
            assert not [p for p in vol.rglob("*") if p.is_file()]  # nothing half-written left
    finally:
        subprocess.run(["umount", str(vol)], check=False)


@pytest.mark.criu
def test_an_agent_stopped_mid_checkpoint_undoes_it_fails_it_once_and_takes_no_new_pod(
        need_criu, home: Path, tmp_path: Path) -> None:
    """shutdown() (what SIGTERM leads to) while CRIU dumps: the dump finishes, the pipeline undoes the rest,
    the Checkpoint ends Failed (AgentStopped) with one Event, the source serves on, nothing is left on the
    volume, and a pod handed to the agent afterwards is not acted on."""
    import threading

    api = MemoryApi({})
    agent = _agent(api, tmp_path / "artifacts")
    dumping, stopped = threading.Event(), threading.Event()

    def progress(_cr: dict, line: str) -> None:
        if line.startswith("dumping process tree"):
            dumping.set()
            stopped.wait(10)
    agent.warned = progress
    src_cid, port = "9e" * 32, free_port()
    with container(src_cid, f"exec {' '.join(WARMSTART)} placeholder -- {sys.executable} {COUNTER} {port}"):
        worker = _wait_for(lambda: procs.children(containers.init_pid(f"containerd://{src_cid}")))[0]
        before = linux.in_network_of(worker, lambda: get_when_up(port)).split()
        source = _pod("source-pod", src_cid, **{"warmstart.dev/engine": "plain"})
        handling = threading.Thread(target=agent.handle, args=(source,))
        handling.start()
        assert dumping.wait(30), "the checkpoint never reached CRIU's dump"
        agent.shutdown("SIGTERM")
        stopped.set()
        handling.join(60)
        st = api.checkpoints["llama-8b"]["status"]
        assert st["phase"] == "Failed" and st["conditions"][0]["reason"] == "AgentStopped", st
        assert "SIGTERM" in st["reason"] and "undone" in st["reason"]
        assert [e.reason for e in api.events] == ["Checkpointing", "CheckpointFailed"]
        after = linux.in_network_of(worker, lambda: http_get(port)).split()
        assert after[1] == before[1] and int(after[0]) > int(before[0])  # the same process, serving
        assert not [p for p in (tmp_path / "artifacts").rglob("*") if p.is_file()]
        del api.checkpoints["llama-8b"]
        agent.handle(source)  # stopped: taken by no one
        assert "llama-8b" not in api.checkpoints and len(api.events) == 2


def test_a_stop_signal_gets_out_of_the_informers_watch_and_a_second_one_kills() -> None:
    """The informer retries on any Exception (the API server went away); the agent's stop must get past it,
    and once it has, the default action is back, so a second SIGTERM ends the agent at once."""
    import signal
    import threading

    from warmstart.k8s import agent, informer

    def lister(*_a: object, **_k: object) -> dict:
        return {"items": [], "metadata": {"resourceVersion": "1"}}

    def stream(*_a: object, **_k: object):
        while True:
            time.sleep(0.05)
            yield from ()

    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        agent.stop_on_signals()
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
        with pytest.raises(agent.Stopping) as stop:
            informer.Informer("pods", lister).run(stream, lambda o: o, threading.Event())
        assert stop.value.signame == "SIGTERM"
        assert signal.getsignal(signal.SIGTERM) == signal.getsignal(signal.SIGINT) == signal.SIG_DFL
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def test_a_refused_or_failed_target_is_not_restored_again() -> None:
    """A False restored condition is final: the pod's next update (a probe, the container restarting after the
    half-restored worker was killed) must not start another restore into it (the live run's restore loop)."""
    p = pod("target-pod")
    assert isinstance(reconcile.decide(p, NODE, GPU, {"llama-8b": ready_checkpoint()}, "c"), reconcile.Restore)
    p["status"]["conditions"].append(condition(RESTORED_CONDITION, False, "RestoreFailed", "CRIU restore failed", "t"))
    a = reconcile.decide(p, NODE, GPU, {"llama-8b": ready_checkpoint()}, "c")
    assert isinstance(a, reconcile.Ignore) and "CRIU restore failed" in a.reason and "delete it" in a.reason


def test_an_event_older_than_the_agents_last_restore_is_decided_on_the_pod_as_it_is(tmp_path: Path) -> None:
    """A pod update queued while the agent restored into the pod carries it without the restored condition;
    the agent decides on the pod as the API server has it now, and leaves it restored (the live run's
    'a worker named ... is running' refusal that turned a restored pod False)."""
    api = MemoryApi(GPU)
    api.checkpoints = {"llama-8b": ready_checkpoint()}
    agent = _agent(api, tmp_path)
    stale = pod("target-pod")
    name = stale["metadata"]["name"]
    api.pods[name] = stale
    api.pod_conditions[name] = [condition(RESTORED_CONDITION, True, "Restored", "from Checkpoint", "t")]
    agent.restore = lambda *a: pytest.fail("restored again")  # type: ignore[method-assign]
    type(agent).handle(agent, stale)  # the Agent's own handle: the API server's copy stays as it is
    assert [c["status"] for c in api.pod_conditions[name]] == ["True"] and not api.events


# ---- the gates a target's pod and node decide, and the annotation that bypasses gates ----

SOURCE_DIGEST = ("registry.example.com/vllm-warmstart"
                 "@sha256:3b1a5c8d9e0f1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7081920a")  # the fixtures' imageID


def digest_checkpoint(image_id: str = SOURCE_DIGEST, **spec: object) -> dict:
    ckpt = ready_checkpoint(**spec)
    ckpt["status"]["imageID"] = image_id
    return ckpt


def test_a_source_checkpoint_records_its_containers_image_digest() -> None:
    a = reconcile.decide(pod("source-pod"), NODE, GPU, {}, "c")
    assert isinstance(a, reconcile.Checkpoint) and a.image_id == SOURCE_DIGEST


def test_a_target_whose_image_digest_differs_is_refused_naming_the_gate_and_the_annotation() -> None:
    a = reconcile.decide(pod("target-pod"), NODE, GPU, {"llama-8b": digest_checkpoint()}, "c")
    assert isinstance(a, reconcile.Restore) and a.notices == ()  # the fixture's digests are the same
    other = digest_checkpoint("registry.example.com/vllm-warmstart@sha256:0000")
    a = reconcile.decide(pod("target-pod"), NODE, GPU, {"llama-8b": other}, "c")
    assert isinstance(a, reconcile.Refuse), a
    assert "gate image-digest:" in a.reason and "sha256:0000" in a.reason
    assert 'annotation warmstart.dev/skip-gates: "image-digest"' in a.reason and "\n" not in a.reason


def test_a_digest_missing_on_either_side_is_a_note_not_a_refusal() -> None:
    a = reconcile.decide(pod("target-pod"), NODE, GPU, {"llama-8b": ready_checkpoint()}, "c")
    assert isinstance(a, reconcile.Restore)
    assert a.notices == ("note: gate image-digest not evaluated: the Checkpoint records no image digest",)
    p = pod("target-pod")
    del p["status"]["containerStatuses"][0]["imageID"]
    a = reconcile.decide(p, NODE, GPU, {"llama-8b": digest_checkpoint()}, "c")
    assert isinstance(a, reconcile.Restore) and "no imageID" in a.notices[0]


def test_the_skip_gates_annotation_bypasses_the_pods_gates_loudly_and_reaches_the_restore() -> None:
    p = pod("target-pod")
    p["metadata"]["annotations"]["warmstart.dev/skip-gates"] = "image-digest, gpu-model,kernel"
    ckpt = digest_checkpoint("sha256:0000", gpuModel="NVIDIA-A100-SXM4-80GB")
    a = reconcile.decide(p, NODE, GPU, {"llama-8b": ckpt}, "c")
    assert isinstance(a, reconcile.Restore), a
    assert a.skip_gates == {"image-digest", "gpu-model", "kernel"}
    assert [n.split(" bypassed")[0] for n in a.notices] == ["warning: gate gpu-model", "warning: gate image-digest"]
    p["metadata"]["annotations"]["warmstart.dev/skip-gates"] = "image-digest"  # the GPU still refuses
    a = reconcile.decide(p, NODE, GPU, {"llama-8b": ckpt}, "c")
    assert isinstance(a, reconcile.Refuse) and "gate gpu-model:" in a.reason and "image-digest" not in a.reason


def test_an_unknown_gate_in_the_annotation_is_refused_naming_the_gates() -> None:
    p = pod("target-pod")
    p["metadata"]["annotations"]["warmstart.dev/skip-gates"] = "kernal"
    a = reconcile.decide(p, NODE, GPU, {"llama-8b": ready_checkpoint()}, "c")
    assert isinstance(a, reconcile.Refuse) and "kernal" in a.reason and "criu-version" in a.reason


def test_the_checkpoints_image_digest_fits_the_crd_schema() -> None:
    status = _crd_schema()["properties"]["status"]["properties"]
    assert status["imageID"]["type"] == "string"  # else the API server prunes what the agent writes


def test_the_agent_announces_a_restores_gates_and_refuses_with_the_annotation(tmp_path: Path) -> None:
    from warmstart import gates
    from warmstart.k8s.agent import _reason

    api = MemoryApi(GPU)
    agent = _agent(api, tmp_path)
    a = reconcile.Restore(name="llama-8b", namespace="warmstart", container_id="containerd://" + "0" * 64,
                          artifact="warmstart/llama-8b", notices=("warning: gate kernel bypassed: x", "note: y"))
    agent.restore(pod("target-pod"), a)  # no such container here: refused after the announcements
    assert [(e.type, e.reason, e.message) for e in api.events][:2] == [
        ("Warning", "RestoreWarning", "gate kernel bypassed: x"), ("Normal", "RestoreNote", "y")]
    assert api.events[-1].reason == "RestoreFailed"
    refused = gates.Refused([gates.Refusal("kernel", "kernel 6.11 here", "restore elsewhere")])
    assert 'annotation warmstart.dev/skip-gates: "kernel"' in _reason(refused) and "--skip-gate" not in _reason(
        refused)


# ---- the agent's caches (k8s/informer.py): pure logic on the objects a list and a watch hand over ----

def _obj(name: str, version: str, namespace: str = "warmstart", **rest: object) -> dict:
    return {"metadata": {"name": name, "namespace": namespace, "resourceVersion": version}, **rest}


def test_an_informer_keeps_what_the_list_and_the_watch_say_and_lists_again_on_410() -> None:
    from warmstart.k8s import informer

    changes: list[tuple[str, str]] = []
    lists = iter([{"metadata": {"resourceVersion": "1"}, "items": [_obj("a", "1")]},
                  {"metadata": {"resourceVersion": "5"}, "items": [_obj("b", "5")]}])
    watches = iter([
        [{"type": "MODIFIED", "object": _obj("a", "2")}, {"type": "ADDED", "object": _obj("c", "3")},
         {"type": "DELETED", "object": _obj("c", "4")},
         {"type": "ERROR", "object": {"code": 410, "message": "too old resource version"}}],
        [{"type": "MODIFIED", "object": _obj("b", "6")}],
    ])
    seen_versions: list[str | None] = []
    stop = __import__("threading").Event()

    def stream(lister, *args, resource_version=None, **kwargs):
        seen_versions.append(resource_version)
        batch = next(watches, None)
        if batch is None:
            stop.set()
            return iter(())
        return iter(batch)

    inf = informer.Informer("test", lambda *a, **k: next(lists), on_change=lambda t, o: changes.append(
        (t, o["metadata"]["name"])))
    inf.run(stream, lambda o: o, stop)
    assert seen_versions == ["1", "5", "6"]  # resumed from the list, from the relist after the 410, then the event
    assert {k: o["metadata"]["resourceVersion"] for k, o in inf.items.items()} == {"warmstart/b": "6"}
    assert changes == [("ADDED", "a"), ("MODIFIED", "a"), ("ADDED", "c"), ("DELETED", "c"), ("ADDED", "b"),
                       ("MODIFIED", "b")]


def test_a_checkpoint_turning_ready_brings_back_the_targets_on_this_node_waiting_for_it(tmp_path: Path) -> None:
    from warmstart.k8s import informer

    a = _agent(MemoryApi(GPU), tmp_path)
    target, other_ns, source = pod("target-pod"), pod("target-pod"), pod("source-pod")
    other_ns["metadata"]["namespace"] = "elsewhere"
    pods = a.caches["pods"] = informer.Informer("pods", lambda: None)
    pods.relist({"items": [target, other_ns, source]})
    submitted: list[dict] = []
    a._submit = submitted.append
    cr = ready_checkpoint()
    cr["metadata"]["namespace"] = "warmstart"
    a._checkpoint_changed("MODIFIED", {**cr, "status": {"phase": "Checkpointing"}})
    assert submitted == []
    a._checkpoint_changed("MODIFIED", cr)
    assert submitted == [target]
    submitted.clear()  # deleted: its source is checkpointed again, no target is woken for it
    a._checkpoint_changed("DELETED", cr)
    assert submitted == [source]
    checkpoints = a.caches["checkpoints"] = informer.Informer("checkpoints", lambda: None)
    checkpoints.relist({"items": [cr]})
    assert a.checkpoints("warmstart") == {"llama-8b": cr} and a.checkpoints("elsewhere") == {}


def test_an_informer_the_api_server_refuses_stops_asking_and_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    from kubernetes import client

    from warmstart.k8s import informer

    calls: list[int] = []

    def lister(*args, **kwargs):
        calls.append(1)
        raise client.ApiException(status=403, reason="Forbidden")

    inf = informer.Informer("checkpoints", lister)
    stop = __import__("threading").Event()
    inf.start(lambda *a, **k: iter(()), lambda o: o, stop, timeout_s=5)  # returns at once, not after timeout_s
    deadline = time.monotonic() + 5
    while not inf.forbidden.is_set() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert inf.forbidden.is_set() and not inf.synced.is_set() and calls == [1]  # asked once, not every 5 s
    assert "grant list and watch" in capsys.readouterr().out


def test_the_nodes_labels_are_read_at_most_every_ttl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from warmstart.k8s import agent as agent_mod

    api = MemoryApi(GPU)
    reads: list[str] = []
    real = api.read_node
    api.read_node = lambda name: reads.append(name) or real(name)
    a = _agent(api, tmp_path)
    assert a.node_labels() == GPU and a.node_labels() == GPU and reads == [NODE]
    api.node_labels = {"other": "label"}
    monkeypatch.setattr(agent_mod, "NODE_TTL_S", 0.0)
    assert a.node_labels() == {"other": "label"} and reads == [NODE, NODE]
