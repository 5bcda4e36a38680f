"""vLLM's OpenAI-compatible server (`python -m vllm.entrypoints.openai.api_server` or `vllm serve`).

Quiesce pauses the scheduler once in-flight requests finish (sleep level 0: nothing in memory changes) and, on
a GPU server started with `--enable-sleep-mode`, discards the KV cache's physical memory (weights stay), so
the CUDA checkpoint does not carry it. Resume wakes the KV cache and the scheduler. Both need the server's
development endpoints (VLLM_SERVER_DEV_MODE=1), which `warmstart run --engine vllm` sets.
"""

from __future__ import annotations

from pathlib import Path

from warmstart.errors import WorkerError
from warmstart.quiesce.http import Engine, Quiesced, call, socket_dir

RPC_ENV = "VLLM_RPC_BASE_PATH"


class Vllm(Engine):
    name = "vllm"
    default_port = 8000

    def env(self, worker_dir: Path) -> dict[str, str]:
        rpc = socket_dir(worker_dir, "rpc")
        # The API server and engine core talk over ZMQ unix sockets created in this directory; each replica
        # gets its own empty one, so that replicas re-create the same socket names without colliding.
        return {"VLLM_SERVER_DEV_MODE": "1", RPC_ENV: str(rpc)}

    def private_dirs(self, env: dict[str, str]) -> list[str]:
        return [env[RPC_ENV]] if env.get(RPC_ENV) else []

    def uses_gpu_release(self, command: list[str]) -> bool:
        return "--enable-sleep-mode" in command

    def quiesce(self, port: int, command: list[str], on_gpu: bool, timeout_s: float) -> Quiesced:
        try:
            call(port, "POST", "/sleep?level=0&mode=wait", timeout_s=timeout_s)
        except WorkerError as e:
            raise WorkerError(f"vLLM did not pause: {e.problem}", "start it with `warmstart run --engine vllm` "
                              "(which enables the pause endpoints)") from None
        if not (on_gpu and self.uses_gpu_release(command)):
            return Quiesced()
        try:
            call(port, "POST", "/release_kv_cache_memory", timeout_s=timeout_s)
        except WorkerError:
            self.resume(port, Quiesced(), timeout_s)
            raise
        return Quiesced(kv_released=True)

    def resume(self, port: int, done: Quiesced, timeout_s: float) -> None:
        tags = "tags=kv_cache&tags=scheduling" if done.kv_released else "tags=scheduling"
        call(port, "POST", f"/wake_up?{tags}", timeout_s=timeout_s)

