"""The `warmstart` command: parse, call one engine function, render. No logic lives here."""

from __future__ import annotations

import json
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from warmstart import config
from warmstart import forkserver as forkserver_protocol
from warmstart.errors import EnvironmentProblem, UsageError, WarmstartError
from warmstart.gates import GATES, WARNING
from warmstart.pipeline.steps import Progress, quiet

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from warmstart.artifact.manifest import Manifest
    from warmstart.pipeline.restore import RestoreResult

# Plain help (rich_markup_mode=None): typer's rich help shows a flag as `--wait <bool>`, as if it took a value.
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Checkpoint warm inference workers and restore them, many times, in seconds.")


class _Lazy:
    """rich's Console, made on first use: a command that prints JSON, as `restore --json` does, never imports
    rich (~35 ms of its start)."""

    def __init__(self, stderr: bool) -> None:
        self._stderr = stderr
        self._console: Console | None = None

    def __getattr__(self, name: str) -> Any:
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=self._stderr)
        return getattr(self._console, name)


out = _Lazy(stderr=False)
err = _Lazy(stderr=True)


def _table(**kw: Any) -> Table:
    from rich.table import Table

    return Table(**kw)
_state = {"debug": False}


def _progress(json_out: bool) -> Progress:
    """Step-by-step progress on stderr, so stdout stays clean for --json."""
    if json_out:
        return quiet
    return lambda msg: err.print(f"[dim]… {msg}[/dim]", highlight=False)


def _restore_progress(json_out: bool) -> Progress:
    """A restore's progress, whose warnings (a gate bypassed) reach stderr even with --json."""
    shown = _progress(json_out)

    def progress(msg: str) -> None:
        if msg.startswith(WARNING):
            err.print(f"[yellow]warning:[/yellow] {msg.removeprefix(WARNING)}", highlight=False, soft_wrap=True)
        else:
            shown(msg)
    return progress


def _emit(data: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(data, default=str, indent=2) + "\n")


def _print_version(asked: bool) -> None:
    if asked:
        from warmstart import __version__

        out.print(f"warmstart {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks and internal detail on errors."),
          version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print warmstart's version and exit.")) -> None:
    _state["debug"] = debug


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
             options_metavar="[OPTIONS] -- CMD [ARGS]...")
def run(
    ctx: typer.Context,
    name: str | None = typer.Option(None, "--name", "-n", help="Name for the worker (default: the program's name)."),
    engine: str = typer.Option("plain", help="plain (any command), vllm or sglang: how warmstart checks, "
                               "quiesces and resumes it (docs/engines/)."),
    wait: bool = typer.Option(False, "--wait", help="Wait until the worker is warm (an engine serves a completion, "
                              "an SDK worker reports ready)."),
    timeout: float = typer.Option(300.0, min=0.1, help="Seconds --wait waits."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Start a worker under management: `warmstart run --name W [--engine vllm] -- python -m ...`."""
    from warmstart import api

    rec = api.run(name, list(ctx.args), engine=engine, wait=wait, timeout_s=timeout)
    port = rec.port if wait else None
    if json_out:
        _emit({"name": rec.name, "pid": rec.pid, "log": rec.log, "port": port})
    else:
        out.print(f"started [bold]{rec.name}[/bold] (pid {rec.pid}); log: {rec.log}"
                  + (f"; ready on port {port}" if port else ""))


@app.command()
def checkpoint(
    name: str | None = typer.Argument(None, help="A worker started with `warmstart run`."),
    pid: int | None = typer.Option(None, "--pid", help="Checkpoint any process tree by its root pid instead."),
    output: Path = typer.Option(..., "--output", "-o", help="Artifact directory to create."),
    leave_running: bool = typer.Option(False, "--leave-running", help="Keep the worker serving afterwards."),
    timeout: float = typer.Option(30.0, min=0.1,
                                  help="Seconds to wait for the worker to quiesce (and for the GPU lock)."),
    no_quiesce: bool = typer.Option(False, "--no-quiesce",
                                    help="Do not ask an SDK worker to quiesce: its KV cache stays in the image."),
    insecure_unsigned: bool = typer.Option(False, "--insecure-unsigned",
                                           help="Do not sign the artifact (restores then need --insecure-unsigned)."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Quiesce a worker, dump it with CRIU, and write a signed, verified artifact."""
    from warmstart import api

    if (name is None) == (pid is None):
        raise UsageError("name a worker or pass --pid, not both", "see `warmstart checkpoint --help`")
    worker: str | int = name if name is not None else pid  # type: ignore[assignment]
    result = api.checkpoint(worker, output, leave_running=leave_running, timeout_s=timeout,
                            quiesce=not no_quiesce, progress=_progress(json_out), insecure_unsigned=insecure_unsigned)
    m = result.manifest
    if json_out:
        _emit({"artifact": str(result.artifact), "checkpoint_s": round(result.seconds, 3),
               "image_bytes": m.image_bytes, "steps": m.step_seconds(),
               **({"paused_s": round(result.paused_s, 3)} if result.paused_s is not None else {})})
        return
    steps = ", ".join(f"{k} {v:.2f}s" for k, v in m.step_seconds().items())
    out.print(f"checkpoint written to [bold]{result.artifact}[/bold]: {m.image_bytes / 1e6:.1f} MB "
              f"in {result.seconds:.2f} s ({steps})")
    if result.paused_s is not None:
        out.print(f"the worker was paused for {result.paused_s:.2f} s")


@app.command()
def restore(
    artifact: Path = typer.Argument(..., help="Artifact directory written by `warmstart checkpoint`."),
    name: str | None = typer.Option(None, "--name", "-n", help="Replica name (with --replicas K: NAME-0 ...)."),
    replicas: int = typer.Option(1, "--replicas", "-k", min=1, help="How many replicas to restore side by side."),
    port: int | None = typer.Option(None, "--port", "-p", min=1, max=65535,
                                    help="Host port of replica 0 (then P+1, ...); default: free ports."),
    timeout: float = typer.Option(120.0, min=0.1,
                                  help="Seconds before an unfinished restore is abandoned and cleaned up."),
    gpu: str | None = typer.Option(None, "--gpu", help="GPU index or UUID to restore onto "
                                      "(default: the one it was on, else the first of its model with room)."),
    into: int | None = typer.Option(None, "--into", help="Restore into the namespaces of this running process "
                                       "(a placeholder container's first process) instead of new ones."),
    insecure_unsigned: bool = typer.Option(False, "--insecure-unsigned",
                                           help="Accept an artifact no trusted key signed (experts only: it runs "
                                           "as root)."),
    skip_gate: list[str] = typer.Option([], "--skip-gate", metavar="GATE",
                                        help="Bypass a pre-restore gate (repeatable; experts only: the restored "
                                        f"process may crash): {', '.join(GATES)}."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Restore an artifact into fresh namespaces, once or as several replicas (or into a placeholder's)."""
    from warmstart import api

    if into is not None:
        if replicas != 1 or port is not None:
            raise UsageError("--into restores one replica, reached in the target's own network",
                             "drop --replicas and --port, or drop --into")
        result = api.restore_into(artifact, into, name=name, timeout_s=timeout, gpu=gpu,
                                  progress=_restore_progress(json_out), insecure_unsigned=insecure_unsigned,
                                  skip_gates=skip_gate)
    else:
        result = api.restore(artifact, name=name, replicas=replicas, port=port, timeout_s=timeout, gpu=gpu,
                             progress=_restore_progress(json_out), insecure_unsigned=insecure_unsigned,
                             skip_gates=skip_gate, detach_cache_copy=True)  # this process exits next
    _render_restore(result, json_out)


def _render_restore(result: RestoreResult, json_out: bool) -> None:
    if result.late_interrupt:
        err.print(f"[yellow]warning:[/yellow] interrupted by {result.late_interrupt} after every replica was up: "
                  "they stay up (`warmstart stop NAME` stops one)", highlight=False, soft_wrap=True)
    if json_out:
        _emit({"artifact": str(result.artifact), "verify_s": round(result.verify_s, 3),
               "inflate_s": round(result.inflate_s, 3),
               "restore_s": round(result.seconds, 3),
               "replicas": [{"name": r.name, "replica": r.replica, "port": r.port, "pid": r.pid,
                             "criu_s": round(r.criu_s, 3), "cuda_s": round(r.cuda_s, 3),
                             "ready_s": round(r.ready_s, 3)} for r in result.replicas]})
        return
    t = _table(title=f"restored {result.artifact}")
    for col in ("replica", "name", "port", "pid", "CRIU s", "CUDA s", "ready s"):
        t.add_column(col)
    for r in result.replicas:
        t.add_row(str(r.replica), r.name, str(r.port or "-"), str(r.pid), f"{r.criu_s:.3f}", f"{r.cuda_s:.3f}",
                  f"{r.ready_s:.3f}")
    out.print(t)


weights_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                          help="The weight service: weights resident, mapped by workers.")
app.add_typer(weights_app, name="weights")


@weights_app.command("serve")
def weights_serve(
    socket_path: str = typer.Option("/run/warmstart/weights.sock", "--socket", help="Unix socket to serve on."),
    device: str = typer.Option("cpu", "--device", help="cpu, or cuda:N: where the weights are kept."),
) -> None:
    """Run the weight service for this node (one per GPU; foreground)."""
    from warmstart.weights import service

    if device != "cpu" and not device.startswith("cuda:"):
        raise UsageError(f"unknown device {device!r}", "use cpu or cuda:N")
    service.serve(socket_path, device)


@weights_app.command("status")
def weights_status(
    socket_path: str = typer.Option("/run/warmstart/weights.sock", "--socket", help="The service's socket."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """What a weight service holds."""
    from warmstart.weights import client as weights

    try:
        answer, _ = weights.request(socket_path, {"op": "status"}, timeout_s=10)
    except ConnectionError as e:
        raise EnvironmentProblem(str(e).split(": start")[0], "start it with `warmstart weights serve`") from None
    if json_out:
        _emit(answer)
        return
    out.print(f"weight service on {socket_path} ({answer['device']}): {len(answer['sets'])} set(s)")
    for ws in answer["sets"]:
        out.print(f"  {ws['hash'][:16]}  {ws['bytes'] / 1e9:.2f} GB  loaded in {ws['load_s']:.2f} s  "
                  f"served {ws['served']}x  {len(ws['files'])} file(s)")


@app.command()
def agent(
    node: str = typer.Option(..., "--node", envvar="NODE_NAME", help="This node's name (the pods it acts on)."),
    claim: str = typer.Option(..., "--claim", help="The artifact PersistentVolumeClaim (recorded in Checkpoints)."),
    artifacts: Path = typer.Option(Path("/var/lib/warmstart/artifacts"), "--artifacts",
                                   help="Where that volume is mounted, here and in the pods."),
    metrics_port: int = typer.Option(9400, "--metrics-port", min=1, max=65535, help="Prometheus metrics port."),
    kubeconfig: str | None = typer.Option(None, "--kubeconfig", envvar="KUBECONFIG",
                                          help="Run outside a pod, against the cluster this file names."),
) -> None:
    """The Kubernetes node agent (run by the Helm chart's DaemonSet): checkpoints sources, restores targets."""
    from warmstart.k8s import agent as node_agent

    node_agent.main(node, claim, artifacts, metrics_port, kubeconfig)


@app.command()
def forkserver(
    socket_path: Path = typer.Option(forkserver_protocol.DEFAULT_SOCKET, "--socket", envvar=forkserver_protocol.ENV,
                                     help="Where to listen; `warmstart` commands with the same setting use it."),
) -> None:
    """Serve this user's `warmstart` commands from one process that has imported warmstart already: each
    command is a fork of it and starts in milliseconds, not Python's 0.3-0.4 s (docs/cli.md). Runs until
    SIGTERM or Ctrl-C."""
    if not socket_path.is_absolute():
        raise UsageError(f"the fork server's socket must be an absolute path, not {str(socket_path)!r}",
                         "pass --socket /run/warmstart/forkserver.sock (WARMSTART_FORKSERVER=0 means no server)")
    forkserver_protocol.serve(socket_path)


@app.command(hidden=True, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def placeholder(ctx: typer.Context) -> None:
    """First process of a Kubernetes warmstart container: `-- CMD` in a source, nothing in a restore target."""
    from warmstart.k8s import placeholder as ph

    raise typer.Exit(ph.run(list(ctx.args) or None))


def _signature(artifact: Path, verify: bool, insecure_unsigned: bool) -> str:
    """What inspect says of the signature; with verify, a wrong or missing one is an error."""
    from warmstart.artifact import signing

    if verify:
        fp = signing.check(artifact, insecure_unsigned)
        return f"valid, by trusted key {fp}" if fp else "none (accepted: --insecure-unsigned)"
    try:
        fp = signing.signer(artifact)
    except WarmstartError as e:
        return f"[red]not accepted here[/red]: {e.problem}"
    return f"valid, by trusted key {fp}" if fp else "[red]none[/red] (restore refuses it without --insecure-unsigned)"


def _print_image(m: Manifest) -> None:
    """What inspect says of the image: what is outside it, and what the checkpoint did to it."""
    from warmstart.artifact.manifest import SAVED_DIR
    from warmstart.image import workingset

    saved = sum(f.size for f in m.files if f.path.startswith(SAVED_DIR + "/"))
    if saved:
        out.print(f"  saved     {saved / 1e6:.1f} MB of it saved by the worker outside CRIU's image ({SAVED_DIR}/, "
                  "not encrypted)")
    if m.zero_bytes_dropped:
        out.print(f"  zeros     {m.zero_bytes_dropped / 1e6:.1f} MB of zero pages left out of it (restored as zeros)")
    if m.compressed_raw_bytes:
        out.print(f"  packed    {m.compressed_raw_bytes / 1e6:.1f} MB of pages stored compressed in "
                  f"{m.compressed_bytes / 1e6:.1f} MB (inflated into memory for each restore)")
    for t in m.transforms:
        out.print(f"  {t.transform:<9} {'applied' if t.applied else 'skipped'}{' for ' + t.image if t.image else ''}: "
                  f"{t.reason}", highlight=False)
    if m.working_set:
        ws = workingset.total_bytes(m.working_set)
        out.print(f"  libraries {ws / 1e6:.1f} MB of {len(m.working_set)} mapped files, read ahead on a cold restore")
    if m.rootfs:
        r = m.rootfs
        out.print(f"  rootfs    {r.files} entries ({r.bytes / 1e6:.1f} MB) and {len(r.deleted)} deletions its "
                  f"container wrote over its image; excluded: {', '.join(r.excluded) or 'nothing'}", highlight=False)


@app.command()
def inspect(
    artifact: Path = typer.Argument(..., help="Artifact directory."),
    verify: bool = typer.Option(False, "--verify", help="Also check its signature and every file's checksum."),
    insecure_unsigned: bool = typer.Option(False, "--insecure-unsigned", help="With --verify: accept it unsigned."),
    json_out: bool = typer.Option(False, "--json", help="Print the whole manifest as JSON."),
) -> None:
    """Show what an artifact holds and where it came from."""
    from warmstart.artifact import store

    signed = _signature(artifact, verify, insecure_unsigned)
    m = store.load(artifact)
    if verify:
        store.verify(artifact, m, use_cache=False)
    if json_out:
        out.print_json(m.model_dump_json())
        return
    w = m.worker
    out.print(f"[bold]{artifact}[/bold]  (schema {m.schema_version}, warmstart {m.warmstart_version})")
    out.print(f"  signature {signed}")
    e = m.encryption
    out.print(f"  encrypted {e.algorithm}, key {e.key}" if e else
              "  encrypted no: process memory stored in the clear (WARMSTART_ENCRYPT=0)")
    out.print(f"  created   {m.created:%Y-%m-%d %H:%M:%S %Z}")
    out.print(f"  worker    {w.name or '-'} pid {w.pid}, engine {w.engine}, SDK {'yes' if w.sdk else 'no'}")
    out.print(f"  command   {' '.join(w.command)}")
    if w.model:
        out.print(f"  model     {w.model}")
    out.print(f"  ports     {', '.join(map(str, w.listen_ports)) or '-'}")
    out.print(f"  host      {m.host.arch}, {m.host.cpu_model}, kernel {m.host.kernel}, CRIU {m.criu.version}")
    for g in m.gpus:
        out.print(f"  GPU       {g.gpu_name} {g.gpu_uuid} (pid {g.pid}, {g.memory_bytes / 1e6:.0f} MB)")
    out.print(f"  image     {m.image_bytes / 1e6:.1f} MB in {len(m.files)} files"
              + (" (checksums verified)" if verify else ""))
    _print_image(m)
    out.print("  steps     " + ", ".join(f"{k} {v:.3f}s" for k, v in m.step_seconds().items()))


@app.command()
def ps(json_out: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """List managed workers and restored replicas."""
    from warmstart import api

    recs = api.workers()
    if json_out:
        _emit({"workers": [{**r.model_dump(), "alive": r.alive(), "state": r.state()} for r in recs]})
        return
    t = _table()
    for col in ("name", "kind", "pid", "port", "state", "artifact / command"):
        t.add_column(col)
    for r in recs:
        t.add_row(r.name, r.kind, str(r.pid), str(r.port or "-"), r.state(),
                  r.artifact or " ".join(r.command))
    out.print(t)


@app.command()
def stop(name: str = typer.Argument(..., help="Worker or replica name (see `warmstart ps`).")) -> None:
    """Stop a worker or replica (SIGTERM, then SIGKILL) and forget it."""
    from warmstart import api

    api.stop(name)
    out.print(f"stopped {name}")


@app.command()
def doctor(
    artifacts: Path | None = typer.Option(None, "--artifacts", help="Also check free space where artifacts go."),
) -> None:
    """Check this host for what checkpoint and restore need (CRIU, kernel, GPU driver, free space)."""
    from warmstart import doctor as doc

    rows = doc.checks(artifacts)
    t = _table(title="warmstart doctor")
    for col in ("check", "", "found", "fix"):
        t.add_column(col)
    for r in rows:
        mark = "[green]ok[/green]" if r.ok else ("[red]FAIL[/red]" if r.required else "[yellow]warn[/yellow]")
        t.add_row(r.name, mark, r.detail, "" if r.ok else r.fix)
    out.print(t)
    bad = doc.failed(rows)
    if bad:
        raise EnvironmentProblem(f"{len(bad)} check(s) failed: {', '.join(r.name for r in bad)}",
                                 "apply the fix on each FAIL line above, then run `warmstart doctor` again")


_CACHES = ("all", "images", "models")


@app.command()
def cache(which: str = typer.Argument("all", metavar="images|models|all",
                                      help="Which cache: the raw images, the reference worker's models, or both."),
          clear: bool = typer.Option(False, "--clear", help="Empty it (restores inflate again; the reference "
                                     "worker builds its model again; models in use stay)."),
          json_out: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """Show (or clear) this node's caches: raw images that let restores skip inflating, and the reference
    worker's models."""
    if which not in _CACHES:
        raise UsageError(f"no cache named {which!r}", "name images, models or all (the default)")
    shown = [c for c in ("images", "models") if which in ("all", c)]
    if clear:
        for c in shown:
            out.print(_clear_images() if c == "images" else _clear_models(), highlight=False, soft_wrap=True)
        return
    if json_out:
        _emit({k: v for c in shown for k, v in (_images_json() if c == "images" else _models_json()).items()})
        return
    t = _table(title="warmstart cache", caption="limits: WARMSTART_IMAGE_CACHE_MB, WARMSTART_MODEL_CACHE_MB")
    t.add_column("cache")
    t.add_column("directory / entry", overflow="fold")
    t.add_column("size", justify="right")
    t.add_column("last used")
    t.add_column("limit / state")
    for c in shown:
        (_images_rows if c == "images" else _models_rows)(t)
    out.print(t)


def _when(t: float | None) -> str:
    import time

    return time.strftime("%m-%d %H:%M", time.localtime(t)) if t else "-"


def _mtime(p: Path) -> float | None:
    try:
        return p.stat().st_mtime
    except OSError:
        return None


def _images_rows(t: Table) -> None:
    from warmstart.image import cache as image_cache

    d = image_cache.cache_dir()
    rows = image_cache.entries(d) if d else []
    limit = config.current().image_cache_mb
    t.add_row("[bold]images[/bold]", str(d or "no usable cache (WARMSTART_IMAGE_CACHE)"),
              f"{sum(n for _, n in rows) / 1e6:.1f} MB", "", f"{limit} MiB, {image_cache.CACHE_KEEP} images and sets")
    for p, n in rows:
        t.add_row("", p.name, f"{n / 1e6:.1f} MB", _when(_mtime(p)), "")


def _models_rows(t: Table) -> None:
    from warmstart.reference import modelcache

    rows = modelcache.entries()
    t.add_row("[bold]models[/bold]", str(modelcache.root()), f"{sum(e.bytes for e in rows) / 1e6:.1f} MB", "",
              f"{config.current().model_cache_mb} MiB")
    for e in rows:
        t.add_row("", e.path.name, f"{e.bytes / 1e6:.1f} MB", _when(e.used), "in use" if e.in_use else "")


def _images_json() -> dict[str, Any]:
    from warmstart.image import cache as image_cache

    d = image_cache.cache_dir()
    rows = image_cache.entries(d) if d else []
    return {"dir": str(d) if d else None, "limit_mb": config.current().image_cache_mb,
            "images": [{"path": str(p), "bytes": n} for p, n in rows]}


def _models_json() -> dict[str, Any]:
    from warmstart.reference import modelcache

    return {"models": {"dir": str(modelcache.root()), "limit_mb": config.current().model_cache_mb,
                       "models": [{"path": str(e.path), "bytes": e.bytes, "used": e.used, "in_use": e.in_use}
                                  for e in modelcache.entries()]}}


def _clear_images() -> str:
    from warmstart.image import cache as image_cache

    d = image_cache.cache_dir()
    removed = image_cache.clear()
    kept = len(image_cache.entries(d)) if d else 0
    in_use = f"; kept {kept} a restore is reading" if kept else ""
    return f"removed {len(removed)} cached image(s) from {d or 'no usable cache'}{in_use}"


def _clear_models() -> str:
    from warmstart.reference import modelcache

    removed, kept = modelcache.clear()
    in_use = f"; kept {len(kept)} in use: {', '.join(p.name for p in kept)}" if kept else ""
    return f"removed {len(removed)} model(s) from {modelcache.root()}{in_use}"


@app.command()
def gc(json_out: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """Remove what killed checkpoints and restores left behind (partial artifacts, inflated images, locks)."""
    from warmstart import api

    removed = api.gc()
    if json_out:
        _emit({"removed": [str(p) for p in removed]})
        return
    for p in removed:
        out.print(f"removed {p}")
    out.print(f"{len(removed)} left-over director{'y' if len(removed) == 1 else 'ies'} removed")


@app.command()
def demo(
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    replicas: int = typer.Option(1, "--replicas", "-k", min=1, help="Replicas to restore."),
    keep: bool = typer.Option(False, "--keep", help="Keep the artifact and leave the replicas running."),
) -> None:
    """Cold-start the reference worker, checkpoint it, restore it, and compare."""
    from warmstart import demo as demo_mod

    r = demo_mod.run(replicas=replicas, keep=keep, progress=_progress(json_out))
    if json_out:
        _emit(r.as_dict())
        return
    t = _table(title="warmstart demo: reference worker")
    t.add_column("step")
    t.add_column("result", justify="right")
    t.add_row("cold start to first completion", f"{r.cold_start_s:.2f} s")
    t.add_row("checkpoint (quiesce + dump + checksums)", f"{r.checkpoint_s:.2f} s")
    t.add_row("image size", f"{r.image_bytes / 1e6:.1f} MB")
    for i, (ready, first) in enumerate(zip(r.restore_ready_s_each, r.first_completion_s_each, strict=True)):
        t.add_row(f"restore replica {i} to ready", f"{ready:.2f} s")
        t.add_row(f"restore replica {i} to first completion", f"{first:.2f} s")
    t.add_row("speed-up (cold start / restore)", f"{r.cold_start_s / r.restore_ready_s:.1f}x")
    t.add_row("completions identical", "yes" if r.identical else "[red]NO[/red]")
    out.print(t)
    if not r.identical:
        raise typer.Exit(1)


@app.command("cuda-checkpoint", add_help_option=False,
             context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def cuda_checkpoint_cmd(ctx: typer.Context) -> None:
    """NVIDIA cuda-checkpoint's flags (--toggle, --action, --get-state ...): see `warmstart cuda-checkpoint -h`."""
    from warmstart import cuda_checkpoint

    raise typer.Exit(cuda_checkpoint.main(list(ctx.args)))


def _click_kind(e: BaseException) -> str | None:
    """Which of click's exceptions this is, by class name: typer >= 0.20 raises those of its own copy of click
    (typer._click), older ones click's, and both must end the same way."""
    names = {c.__name__ for c in type(e).__mro__}
    return next((k for k in ("Exit", "Abort", "NoArgsIsHelpError", "ClickException") if k in names), None)


def _exit_code(e: BaseException, debug: bool) -> int:
    """The one line a failure prints, and its exit code (docs/cli.md)."""
    if isinstance(e, WarmstartError):
        if debug:
            traceback.print_exc()
        err.print(f"[red]error:[/red] {e.line()}", highlight=False, soft_wrap=True)
        return e.exit_code
    kind = _click_kind(e)
    if kind == "Exit":
        return int(getattr(e, "exit_code", 0))
    if kind == "Abort" or isinstance(e, KeyboardInterrupt):
        err.print("[red]error:[/red] interrupted")
        return 130
    if kind == "NoArgsIsHelpError":
        ctx = getattr(e, "ctx", None)
        if ctx is not None:
            print(ctx.get_help())
        return 2
    if kind == "ClickException":
        message = getattr(e, "format_message", lambda: str(e))()
        err.print(f"[red]error:[/red] {message} — see `warmstart --help`", highlight=False, soft_wrap=True)
        return 2
    if isinstance(e, SystemExit):
        raise e
    if debug:
        traceback.print_exc()
    err.print(f"[red]internal error:[/red] {type(e).__name__}: {e} — rerun with --debug and report it",
              highlight=False, soft_wrap=True)
    return 1


def main(argv: list[str] | None = None) -> None:
    if argv is None and Path(sys.argv[0]).name == "cuda-checkpoint":
        from warmstart import cuda_checkpoint  # installed or linked under NVIDIA's tool's name

        sys.exit(cuda_checkpoint.main(sys.argv[1:]))
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args or config.debug_requested()
    ctrl_c: list[int] = []

    def on_ctrl_c(sig: int, frame: Any) -> None:
        ctrl_c.append(sig)
        signal.default_int_handler(sig, frame)

    watch = (threading.current_thread() is threading.main_thread()
             and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    if watch:
        signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        # Without standalone mode, click returns a typer.Exit's code instead of raising it, and typer turns a
        # KeyboardInterrupt outside a pipeline into a silent 130.
        rc = typer.main.get_command(app).main(args=args, prog_name="warmstart", standalone_mode=False)
    except BaseException as e:  # noqa: BLE001 - every failure ends in one line and a documented code
        sys.exit(_exit_code(e, debug))
    finally:
        if watch:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    if rc == 130 and ctrl_c:
        err.print("[red]error:[/red] interrupted")
    if isinstance(rc, int) and rc:
        sys.exit(rc)
