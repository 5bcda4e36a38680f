"""The pre-restore gates: each compares one fact recorded where an artifact was made with the same fact where
it is restored, and refuses with one line that names the gate, the difference and the fix.

An expert may bypass a gate by name (`warmstart restore --skip-gate NAME`, or the restore-target pod's
annotation warmstart.dev/skip-gates). A bypassed gate that would have refused is announced as a warning, never
dropped: the restore then goes on, and the restored process may crash, at once or at some later instruction.
A gate with its fact missing on either side cannot be evaluated: it never refuses, and says so in a note.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

from warmstart.errors import IncompatibleArtifact, UsageError

GATES: dict[str, str] = {  # name -> what it compares (docs/kubernetes.md has the same table)
    "cpu-arch": "the CPU architecture",
    "cpu-features": "the CPU features a process may have picked code paths for: none may be missing here",
    "kernel": "the kernel's major.minor version",
    "criu-version": "CRIU's major.minor version: not older here",
    "driver": "the NVIDIA driver's version: not older here",
    "gpu-model": "the model of each checkpointed GPU",
    "gpu-count": "how many GPUs the worker used: at least as many here",
    "image-digest": "the container image's digest (Kubernetes only)",
}

CLI_BYPASS = "--skip-gate {gate}"
WARNING = "warning: "
NOTE = "note: "


@dataclass(frozen=True)
class Refusal:
    gate: str
    problem: str  # the difference, naming both sides
    fix: str

    def line(self, bypass: str = CLI_BYPASS) -> str:
        """bypass: how the caller's user skips a gate, with {gate} for its name."""
        return (f"gate {self.gate}: {self.problem} — {self.fix}; an expert may bypass it with "
                f"{bypass.format(gate=self.gate)} (the restored process may crash)")

    def bypassed(self) -> str:
        return f"{WARNING}gate {self.gate} bypassed: {self.problem}; the restored process may crash"


@dataclass(frozen=True)
class Unknown:
    """A gate that cannot be evaluated, and why."""

    gate: str
    why: str

    def line(self) -> str:
        return f"{NOTE}gate {self.gate} not evaluated: {self.why}"


Result = Refusal | Unknown | None  # None: the gate passed


@dataclass(frozen=True)
class Verdict:
    refused: tuple[Refusal, ...]
    bypassed: tuple[Refusal, ...]
    unknown: tuple[Unknown, ...]

    def notices(self) -> list[str]:
        """The lines to announce even when nothing refuses: each gate not evaluated, each bypassed."""
        return [u.line() for u in self.unknown] + [r.bypassed() for r in self.bypassed]


class Refused(IncompatibleArtifact):
    """One or more gates refused: each is one line of `line()`."""

    def __init__(self, refusals: Iterable[Refusal], context: str = "") -> None:
        self.refusals = tuple(refusals)
        self.context = context
        super().__init__(context + "; ".join(f"gate {r.gate}: {r.problem}" for r in self.refusals),
                         "; ".join(r.fix for r in self.refusals))

    def line(self, bypass: str = CLI_BYPASS) -> str:
        return self.context + "; ".join(r.line(bypass) for r in self.refusals)


def parse_skip(names: Iterable[str]) -> frozenset[str]:
    """Gate names, each one or several comma-separated; an unknown one is a usage error naming the valid ones."""
    out = frozenset(n.strip() for name in names for n in name.split(",") if n.strip())
    unknown = sorted(out - GATES.keys())
    if unknown:
        raise UsageError(f"no gate named {', '.join(unknown)}", f"the gates are: {', '.join(GATES)}")
    return out


def judge(results: Iterable[Result], skip: Collection[str]) -> Verdict:
    done = [r for r in results if r is not None]
    refusals = [r for r in done if isinstance(r, Refusal)]
    return Verdict(refused=tuple(r for r in refusals if r.gate not in skip),
                   bypassed=tuple(r for r in refusals if r.gate in skip),
                   unknown=tuple(r for r in done if isinstance(r, Unknown)))


def enforce(results: Iterable[Result], skip: Collection[str], report: Callable[[str], None],
            context: str = "") -> None:
    """Report what was not evaluated or was bypassed, then raise Refused for what refuses."""
    verdict = judge(results, skip)
    for line in verdict.notices():
        report(line)
    if verdict.refused:
        raise Refused(verdict.refused, context)


def version_tuple(v: str) -> tuple[int, ...]:
    """"4.2.1" -> (4, 2, 1): the one parser of dotted versions (CRIU, the NVIDIA driver, the kernel)."""
    return tuple(int(p) for p in v.split(".") if p.isdigit())


def _kernel_release(release: str) -> tuple[int, ...]:
    """"6.8.0-45-generic" -> (6, 8): a release's major.minor."""
    return version_tuple(release.split("-", 1)[0])[:2]


# ---- the gates, each over the recorded fact and the one here ----

def cpu_arch(recorded: str, here: str) -> Result:
    if recorded == here:
        return None
    return Refusal("cpu-arch", f"CPU architecture differs: image {recorded}, this host {here}",
                   f"restore on a {recorded} host, or checkpoint on this one")


def cpu_features(recorded_model: str, recorded: Collection[str], here_model: str, here: Collection[str]) -> Result:
    missing = sorted(set(recorded) - set(here))
    if not missing:
        return None
    return Refusal("cpu-features", f"this host's CPU ({here_model}) lacks features the image's CPU "
                   f"({recorded_model}) had: {', '.join(missing)}",
                   "restore on a host whose CPU has them, or checkpoint on this one")


def kernel(recorded: str, here: str) -> Result:
    if not recorded or not here:
        return Unknown("kernel", "the kernel release is not known on both sides")
    if _kernel_release(recorded) == _kernel_release(here):
        return None
    # CRIU's images carry kernel state (namespaces, sockets, mounts, vDSO, seccomp) in the shape of the kernel
    # that made them; the same major.minor is the line below which restores are known to work.
    return Refusal("kernel", f"kernel {here} here, the image was made on {recorded} (CRIU images depend on "
                   "the kernel's features)", "restore on a host with the same kernel major.minor, or checkpoint "
                   "on this one")


def criu_version(recorded: str, here: str) -> Result:
    if not recorded or not here:
        return Unknown("criu-version", "the artifact records no CRIU version" if not recorded
                       else "CRIU's version here is unknown")
    if version_tuple(here)[:2] >= version_tuple(recorded)[:2]:
        return None
    return Refusal("criu-version", f"CRIU here ({here}) is older than the one that made the image ({recorded})",
                   f"install CRIU {recorded} or newer here")


def driver(recorded: str | None, here: str | None) -> Result:
    if not recorded or not here:
        return Unknown("driver", "the NVIDIA driver's version is not known on both sides")
    if version_tuple(here) >= version_tuple(recorded):
        return None
    return Refusal("driver", f"artifact was checkpointed with NVIDIA driver {recorded}; this host has {here}, "
                   "which is older", f"restore on a node with driver >= {recorded}, or upgrade this one")


def gpu_model(recorded: str, here: Collection[str], where: str = "this host has",
              fix: str = "restore on a node with the same GPU model") -> Result:
    """here: the models of the GPUs that could take it; where: what has them ("GPU 1 is")."""
    if not recorded:
        return Unknown("gpu-model", "the checkpoint records no GPU model")
    if recorded in here:
        return None
    return Refusal("gpu-model", f"artifact was checkpointed on {recorded}; {where} "
                   f"{', '.join(sorted(set(here))) or 'none'}", fix)


def gpu_count(recorded: int, here: int, model: str) -> Result:
    if here >= recorded:
        return None
    have = "no GPU" if here == 0 else f"{here} GPU(s)"
    return Refusal("gpu-count", f"artifact needs {recorded} GPU(s) ({model}); this host has {have}",
                   f"restore on a node with at least {recorded} {model}")


def _digest(image_id: str) -> str:
    """"registry/repo@sha256:…" or "sha256:…" -> "sha256:…": the runtimes name one image either way."""
    return image_id.rpartition("@")[2]


def image_digest(recorded: str, here: str) -> Result:
    if not recorded or not here:
        return Unknown("image-digest", "the Checkpoint records no image digest" if not recorded
                       else "the pod's container status has no imageID yet")
    if _digest(recorded) == _digest(here):
        return None
    return Refusal("image-digest", f"the pod's image is {_digest(here)}, the checkpoint's {_digest(recorded)}",
                   "run the placeholder from the source's image (pin it by digest: IMAGE@sha256:…), or checkpoint "
                   "again")
