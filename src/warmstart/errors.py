"""Every failure a user can cause, one type each; the message names the problem, `fix` names the remedy.

Exit codes (documented in docs/cli.md):
  1  unexpected internal error (a bug: run with --debug and report it)
  2  usage error (bad flags, unknown worker name)
  3  environment: missing or too-old tool, no permission, missing kernel feature
  4  artifact: missing, corrupt, tampered, or incompatible with this host
  5  worker: not running, not responding, failed to quiesce or resume, died
  6  checkpoint or restore step failed (CRIU, CUDA, namespaces)
130  interrupted (SIGINT, SIGTERM, SIGHUP or a caller's cancel): what was started is undone
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


class EngineHTTPError(WorkerError):
    """An engine's HTTP API answered with an error, or not at all."""


class Interrupted(WarmstartError):
    exit_code = 130


class ImageError(ValueError):
    """An image file that is damaged or not what it should be. Not shown as it is: its caller turns it into an
    ArtifactError (a restore) or a warning (a checkpoint's optional transform)."""
