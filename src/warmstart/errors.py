"""Every failure a user can cause, one type each; the message names the problem, `fix` names the remedy.

Exit codes (documented in docs/cli.md):
  1  unexpected internal error (a bug: run with --debug and report it)
  2  usage error (bad flags, unknown worker name)
  3  environment: missing or too-old tool, no permission, missing kernel feature
  4  artifact: missing, corrupt, tampered, or incompatible with this host
  5  worker: not running, not responding, failed to quiesce or resume, died
  6  checkpoint or restore step failed (CRIU, CUDA, namespaces)
"""

from __future__ import annotations


class WarmstartError(Exception):
    exit_code = 1

    def __init__(self, problem: str, fix: str = "") -> None:
        super().__init__(problem)
        self.problem = problem
        self.fix = fix

    def line(self) -> str:
        return f"{self.problem} — {self.fix}" if self.fix else self.problem


class UsageError(WarmstartError):
    exit_code = 2


class EnvironmentProblem(WarmstartError):
    exit_code = 3


class ArtifactError(WarmstartError):
    exit_code = 4


class IncompatibleArtifact(ArtifactError):
    pass


class WorkerError(WarmstartError):
    exit_code = 5


class QuiesceTimeout(WorkerError):
    pass


class StepFailed(WarmstartError):
    exit_code = 6
