"""SGLang's server (`python -m sglang.launch_server`).

Quiesce, on a GPU server started with `--enable-memory-saver`, releases the KV cache's GPU memory
(`/release_memory_occupation` with tag kv_cache; weights and CUDA graphs stay) so the CUDA checkpoint does
not carry it; resume takes it back. SGLang names its ZMQ unix sockets with temporary files, so the server runs
with TMPDIR set to a directory that each replica gets empty and its own.
"""

from __future__ import annotations

from pathlib import Path

from warmstart.quiesce.http import Engine, Quiesced, call, socket_dir


class Sglang(Engine):
    name = "sglang"
    default_port = 30000

    def env(self, worker_dir: Path) -> dict[str, str]:
        tmp = socket_dir(worker_dir, "tmp")
        return {"TMPDIR": str(tmp)}

    def private_dirs(self, env: dict[str, str]) -> list[str]:
        return [env["TMPDIR"]] if env.get("TMPDIR") else []

    def uses_gpu_release(self, command: list[str]) -> bool:
        return "--enable-memory-saver" in command

    def quiesce(self, port: int, command: list[str], on_gpu: bool, timeout_s: float) -> Quiesced:
        if not (on_gpu and self.uses_gpu_release(command)):
            return Quiesced()
        call(port, "POST", "/release_memory_occupation", {"tags": ["kv_cache"]}, timeout_s=timeout_s)
        return Quiesced(kv_released=True)

    def resume(self, port: int, done: Quiesced, timeout_s: float) -> None:
        if done.kv_released:
            call(port, "POST", "/resume_memory_occupation", {"tags": ["kv_cache"]}, timeout_s=timeout_s)
