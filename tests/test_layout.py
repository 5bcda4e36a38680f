"""The source tree's shape, enforced: layering of packages, what code inside a worker may import, function
size, and ruff and mypy --strict clean (as configured in pyproject.toml) over src/."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "warmstart"

# Higher layers may import lower ones, never the reverse; within a layer only the front doors and the host
# primitives import each other (and the stage pairs in STAGE_EDGES). Code that runs inside the worker (its own rule
# below) may be imported by anyone: it is standard library only.
LAYERS = [
    {"__init__", "__main__", "entry", "forkserver", "forkloop", "cli", "api", "demo", "doctor", "cuda_checkpoint",
     "k8s"},  # front doors
    {"pipeline"},
    {"quiesce", "gpu", "criu", "image", "replica", "weights"},  # stages
    {"artifact"},  # the artifact's model and store
    {"config", "errors", "linux", "procs", "host", "paths", "registry", "gates"},  # host primitives
]
IN_WORKER = {"worker", "gpumem", "reference"}
STAGE_EDGES = {("replica", "criu")}  # a replica is restored by CRIU
# What code running inside the user's worker process may import of warmstart.
WORKER_MAY_IMPORT = ("warmstart.worker", "warmstart.gpumem", "warmstart.weights.client", "warmstart.weights.layout",
                     "warmstart.linux", "warmstart.errors", "warmstart.reference")


def _modules() -> list[tuple[Path, str]]:
    return [(p, p.relative_to(SRC).parts[0].removesuffix(".py")) for p in sorted(SRC.rglob("*.py"))]


def _imports(path: Path) -> set[str]:
    """The warmstart modules a file imports (`from warmstart import x` names warmstart.x)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "warmstart":
            out |= {f"{node.module}.{a.name}" for a in node.names}  # a submodule or a name in one
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "warmstart"}
    return {m for m in out if m != "warmstart.__version__"}


def _layer(top: str) -> int | None:
    return next((i for i, layer in enumerate(LAYERS) if top in layer), None)


def test_every_package_has_a_place() -> None:
    for _, top in _modules():
        assert _layer(top) is not None or top in IN_WORKER, f"{top} is in no layer of test_layout.LAYERS"


def test_packages_import_only_downwards() -> None:
    bad = []
    for path, top in _modules():
        if top in IN_WORKER:
            continue
        for mod in _imports(path):
            other = mod.split(".")[1]
            mine, theirs = _layer(top), _layer(other)
            if other == top or other in IN_WORKER or (top, other) in STAGE_EDGES:
                continue
            assert mine is not None
            same_ok = mine in (0, len(LAYERS) - 1)  # front doors call each other; primitives build on each other
            if theirs is None or theirs < mine or (theirs == mine and not same_ok):
                bad.append(f"{path.relative_to(ROOT)} imports {mod}")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_code_inside_the_worker_imports_nothing_of_the_host_side() -> None:
    bad = [f"{path.relative_to(ROOT)} imports {mod}" for path, top in _modules() if top in IN_WORKER
           for mod in _imports(path) if not mod.startswith(WORKER_MAY_IMPORT)]
    assert not bad, "\n".join(bad)


def test_no_function_a_reader_must_scroll() -> None:
    long = []
    for path, _ in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > 50:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {lines} lines")
    assert not long, "\n".join(long)


@pytest.mark.parametrize("tool", [["ruff", "check", "src"], ["mypy"]], ids=["ruff", "mypy-strict"])
def test_static_checks_are_clean(tool: list[str]) -> None:
    r = subprocess.run([sys.executable, "-m", *tool], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
