"""Shared fixtures. End-to-end tests run real CRIU on real processes; they need root and CRIU >= 4.2.

Where those are missing the tests skip with the reason, unless WARMSTART_REQUIRE_CRIU=1 (set by .ci/run),
where they fail: CI must never pass by skipping them.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WARMSTART = [sys.executable, "-m", "warmstart"]
# Raw images of compressed ones (image/codec.py) go here, not to /var/cache, in tests that set no home.
os.environ.setdefault("WARMSTART_IMAGE_CACHE", f"/tmp/warmstart-test-image-cache-{os.getpid()}")
# The artifact signing key of this test session (artifact/signing.py), made on first use.
os.environ.setdefault("WARMSTART_KEY_DIR", f"/tmp/warmstart-test-keys-{os.getpid()}")
# A fork server this host may run (forkserver.py) serves only the tests that start their own.
os.environ.setdefault("WARMSTART_FORKSERVER", "0")
# What this process made in /tmp: removed at the end of a test session (or of a bench that imports this).
MADE_HERE = [p for var, p in (("WARMSTART_IMAGE_CACHE", f"/tmp/warmstart-test-image-cache-{os.getpid()}"),
                              ("WARMSTART_KEY_DIR", f"/tmp/warmstart-test-keys-{os.getpid()}"))
             if os.environ[var] == p]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The session's signing keys and image cache go with it (a run left a private key and images in /tmp)."""
    for p in MADE_HERE:
        shutil.rmtree(p, ignore_errors=True)


COUNTER = REPO / "tests" / "workers" / "counter.py"
SLOW_QUIESCE = REPO / "tests" / "workers" / "slow_quiesce.py"
SAVED_STATE = REPO / "tests" / "workers" / "saved_state.py"


def _criu_problem() -> str | None:
    from warmstart.criu import binary as criu
    from warmstart.errors import WarmstartError

    try:
        criu.find.cache_clear()
        criu.find()
    except WarmstartError as e:
        return e.line()
    return None


@pytest.fixture(scope="session")
def need_criu() -> None:
    problem = _criu_problem()
    if problem:
        if os.environ.get("WARMSTART_REQUIRE_CRIU") == "1":
            pytest.fail(f"CRIU is required here: {problem}")
        pytest.skip(f"needs root and CRIU >= 4.2: {problem}")


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A private WARMSTART_HOME; every worker and replica left in it is killed afterwards."""
    h = tmp_path / "home"
    monkeypatch.setenv("WARMSTART_HOME", str(h))
    monkeypatch.setenv("WARMSTART_IMAGE_CACHE", str(tmp_path / "image-cache"))
    yield h
    cleanup(h)


def cleanup(h: Path) -> None:
    from warmstart import procs

    for rec_file in (h / "workers").glob("*/worker.json") if (h / "workers").exists() else []:
        rec = json.loads(rec_file.read_text())
        for pid, started in ((rec.get("holder_pid"), rec.get("holder_started")), (rec["pid"], rec["started"])):
            if pid:
                procs.terminate(pid, started, grace_s=1)


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*WARMSTART, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=REPO)


def one_error_line(r: subprocess.CompletedProcess, code: int, *words: str) -> str:
    """The command failed with `code` and said so in exactly one `error:` line containing every word."""
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, r.stderr
    for w in words:
        assert w in errors[0], errors[0]
    return errors[0]


# A plain HTTP worker holding `MB` MiB of random bytes (argv: port, MB): a pages image that large.
BALLAST_WORKER = """
import http.server, os, sys
blob = os.urandom(int(sys.argv[2]) << 20)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(str(sum(blob[::1 << 16])).encode())
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(port: int, path: str = "/", timeout: float = 10) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
        return r.read().decode()


def wait_http(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            http_get(port, timeout=2)
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing answers on port {port}")


def get_when_up(port: int, timeout: float = 30) -> str:
    """GET / once something answers on the port (in the calling thread's network namespace)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return http_get(port, timeout=2)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def copy_artifact(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def evict_pages(artifact: Path) -> None:
    """Drop an artifact's pages images (and the image cache) from the page cache, as after a reboot (restore then
    reads them ahead, and inflates compressed ones again)."""
    cache = Path(os.environ.get("WARMSTART_IMAGE_CACHE", "/nonexistent"))  # raw images of compressed ones
    for img in [*artifact.rglob("pages-*.img*"), *(cache.glob("*.img") if cache.is_dir() else [])]:
        evict_file(img)


def raw_pages(images: Path) -> list[bytes]:
    """The pages images' bytes as CRIU reads them (compressed ones inflated, sealed ones opened)."""
    from warmstart.artifact import encryption, store
    from warmstart.image import inflated, readahead

    m = store.load(images.parent)
    key = encryption.artifact_key(images.parent, m.encryption) if m.encryption else None
    view = inflated.Inflated(images, threads=2, keys={}, key=key, use_cache=False)
    try:
        return [p.read_bytes() for p in readahead.pages_images(view.path)]
    finally:
        view.remove()


def kept_image(artifact: Path) -> Path:
    """Where a restore that inflated the artifact's compressed pages image keeps it (image/codec.py)."""
    from warmstart.image import codec

    files = json.loads((artifact / "manifest.json").read_text())["files"]
    (key,) = [f["sha256"] for f in files if f["path"].endswith((".img.z", ".img.sealed"))
              and codec.raw_size(artifact / f["path"]) >= codec.MIN_BYTES]
    return Path(os.environ["WARMSTART_IMAGE_CACHE"]) / f"{key}.img"


def evict_file(path: Path) -> None:
    """Drop one file from the page cache. Written pages are flushed first: the kernel does not drop dirty ones,
    and CRIU's images are not fsync'd."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resign(artifact: Path) -> None:
    """Sign an artifact's manifest again after a test changed it on purpose (as its key's owner could)."""
    from warmstart.artifact import signing

    data = (artifact / "manifest.json").read_bytes()
    (artifact / signing.SIGNATURE_NAME).write_bytes(signing.sign(data))


@pytest.fixture()
def counter_artifact(need_criu, home: Path, tmp_path: Path) -> Path:
    """A checkpoint of the counter worker (a plain process), at tmp_path/art."""
    port = free_port()
    assert cli("run", "--name", "src", "--", sys.executable, str(COUNTER), str(port)).returncode == 0
    wait_http(port)
    r = cli("checkpoint", "src", "-o", str(tmp_path / "art"))
    assert r.returncode == 0, r.stderr
    return tmp_path / "art"
