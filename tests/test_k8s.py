"""Kubernetes: the Helm chart rendered by real Helm and validated against the Kubernetes schemas, the
Checkpoint CRD's schema, reconcile decisions on real pod JSON, and container discovery through real cgroups.

No API server runs here: the agent's loop against a live cluster is not exercised (docs/kubernetes.md).
The node data plane (restore into a placeholder's namespaces, dump from a container's) is tests/test_joinns.py.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from conftest import REPO
from warmstart import procs
from warmstart.k8s import containers, reconcile
from warmstart.k8s.resources import CheckpointSpec, Storage, condition

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


def test_container_processes_found_by_container_id() -> None:
    """A 'container' (own pid namespace, its init and a worker child) in a cgroup named like containerd's."""
    root = _pids_cgroup_root()
    cid = "ab" * 32
    cg = root / "kubepods.slice" / f"cri-containerd-{cid}.scope"
    cg.mkdir(parents=True, exist_ok=True)
    p = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c",
                          f"echo $$ > {cg}/cgroup.procs; sleep 60 & wait"], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        found: list[int] = []
        while len(found) < 2 and time.monotonic() < deadline:
            found = containers.pids_of(f"containerd://{cid}")
            time.sleep(0.05)
        init = containers.init_pid(f"containerd://{cid}")
        assert procs.nspid(init)[-1] == 1 and init in found
        assert containers.worker_pid(f"containerd://{cid}") in found
        with pytest.raises(Exception, match="no process of container"):
            containers.init_pid("containerd://" + "cd" * 32)
        with pytest.raises(Exception, match="unexpected container id"):
            containers.container_hex("docker:/x")
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


def test_agent_module_imports_with_its_extra() -> None:
    from warmstart.k8s import agent

    assert agent._MISSING is None
    assert re.match(r"^\w+$", agent.OPS._name)
