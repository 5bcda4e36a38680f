"""Adapters for inference engines warmstart did not write: one module per engine."""

from __future__ import annotations

from warmstart.errors import UsageError
from warmstart.quiesce.http import Engine
from warmstart.quiesce.sglang import Sglang
from warmstart.quiesce.vllm import Vllm

ADAPTERS: dict[str, type[Engine]] = {"vllm": Vllm, "sglang": Sglang}
# Engines that need no adapter: any command ("plain") and workers that speak the SDK's protocol.
BUILTIN = ("plain", "reference")


def check(name: str) -> None:
    """Refuse an engine name `warmstart run --engine` does not know."""
    if name not in ADAPTERS and name not in BUILTIN:
        raise UsageError(f"unknown engine {name!r}", f"use one of: {', '.join([*BUILTIN, *ADAPTERS])}")


def for_engine(name: str | None) -> Engine | None:
    """The adapter for an engine name; None for a plain command or an SDK worker (which reports any name)."""
    cls = ADAPTERS.get(name or "")
    return cls() if cls else None
