"""The worker side of warmstart: a stdlib-only SDK any worker can use to quiesce and resume."""

from warmstart.worker.sdk import Controller, ResumeSettings, attach

__all__ = ["Controller", "ResumeSettings", "attach"]
