"""`warmstart forkserver` (forkserver.py, forkloop.py): a real server process and real `warmstart` commands,
each run through it and run alone, compared."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import REPO, WARMSTART, cli
from warmstart import forkserver


class Server:
    def __init__(self, sock: Path, log: Path, proc: subprocess.Popen[bytes]) -> None:
        self.sock, self.log, self.proc = sock, log, proc

    def forked(self) -> list[str]:
        return [ln for ln in self.log.read_text().splitlines() if " for client " in ln]


@pytest.fixture()
def server(tmp_path: Path, home: Path) -> Iterator[Server]:
    sock, log = tmp_path / "fs" / "s.sock", tmp_path / "fs.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([*WARMSTART, "forkserver", "--socket", str(sock)], stdout=f, stderr=f, cwd=REPO)
    deadline = time.monotonic() + 60
    while not sock.exists():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    yield Server(sock, log, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert not sock.exists()  # removed on the way out


def both(server: Server, *args: str, cwd: Path = REPO) -> tuple[subprocess.CompletedProcess[str], ...]:
    """The command through the server, then alone; the server must have forked it."""
    before = len(server.forked())
    runs = []
    for via in (str(server.sock), "0"):
        runs.append(subprocess.run([*WARMSTART, *args], capture_output=True, text=True, timeout=120, cwd=cwd,
                                   env={**os.environ, forkserver.ENV: via}))
    assert len(server.forked()) == before + 1, server.log.read_text()
    return tuple(runs)


def test_a_command_through_the_server_prints_and_exits_as_it_would_alone(server: Server, tmp_path: Path) -> None:
    via, alone = both(server, "ps", "--json")
    assert via.returncode == alone.returncode == 0
    assert via.stdout == alone.stdout and '"workers": []' in via.stdout
    # Its environment, working directory and exit code are the client's: a relative artifact, resolved there.
    (tmp_path / "elsewhere").mkdir()
    via, alone = both(server, "restore", "no-such-artifact", cwd=tmp_path / "elsewhere")
    assert via.returncode == alone.returncode == 4
    assert via.stderr == alone.stderr and str(tmp_path / "elsewhere" / "no-such-artifact") in via.stderr


def never_ready(server: Server, name: str, **popen: object) -> tuple[subprocess.Popen[str], int]:
    """`warmstart run --wait` of an engine worker that never serves (it waits until stopped), through the
    server; the client and the forked command's pid."""
    cmd = [*WARMSTART, "run", "--name", name, "--engine", "vllm", "--wait", "--timeout", "60", "--",
           "python3", "-c", "import time; time.sleep(100)"]
    before = len(server.forked())
    env = {**os.environ, forkserver.ENV: str(server.sock)}
    # A suite started in the background by a shell inherits SIGINT ignored, and an ignored SIGINT stays ignored
    # through the server (as it should): the client gets Ctrl-C's default back.
    p: subprocess.Popen[str] = subprocess.Popen(cmd, text=True, cwd=REPO, env=env, **popen,  # type: ignore[call-overload]
                                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while len(server.forked()) == before:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return p, int(server.forked()[-1].split("pid ")[1].split()[0])


def test_an_interrupted_command_is_cancelled_and_says_so(server: Server) -> None:
    p, _ = never_ready(server, "never", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(1)
    p.send_signal(signal.SIGINT)
    _, stderr = p.communicate(timeout=60)
    assert p.returncode == 130 and "interrupted by SIGINT" in stderr and "Traceback" not in stderr, stderr
    assert "never" not in cli("ps").stdout  # what it had started was undone


def test_a_client_that_goes_away_gets_its_command_cancelled(server: Server) -> None:
    p, child = never_ready(server, "orphan", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)
    p.kill()
    p.wait()
    deadline = time.monotonic() + 30
    while Path(f"/proc/{child}").exists() and "Z" not in Path(f"/proc/{child}/stat").read_text().split()[2]:
        assert time.monotonic() < deadline, "the forked command went on without its client"
        time.sleep(0.05)
    assert "orphan" not in cli("ps").stdout  # cancelled: the worker it had started is stopped


def test_a_command_killed_by_a_signal_ends_its_client_by_that_signal(server: Server) -> None:
    p, child = never_ready(server, "killed", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.kill(child, signal.SIGKILL)
    assert p.wait(30) == -signal.SIGKILL  # as the shell would see the command itself killed
    cli("stop", "killed")


def test_a_second_server_on_the_same_socket_is_refused(server: Server) -> None:
    r = cli("forkserver", "--socket", str(server.sock), timeout=60)
    assert r.returncode == 3 and "already serves" in r.stderr, r.stderr
    via, _ = both(server, "ps", "--json")  # the first still serves
    assert via.returncode == 0


def test_changed_code_runs_the_command_here(server: Server) -> None:
    src = Path(forkserver.__file__)
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # as an edit of the checkout would
    try:
        before = len(server.forked())
        r = subprocess.run([*WARMSTART, "ps", "--json"], capture_output=True, text=True, timeout=120, cwd=REPO,
                           env={**os.environ, forkserver.ENV: str(server.sock)})
        assert r.returncode == 0 and '"workers"' in r.stdout
        assert len(server.forked()) == before  # run by the client itself
        assert "runs other code" in server.log.read_text()
    finally:
        os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_the_server_will_not_listen_through_a_symlink(tmp_path: Path, home: Path) -> None:
    (tmp_path / "fs").mkdir(mode=0o700)
    (tmp_path / "fs" / "s.sock").symlink_to(tmp_path / "elsewhere")
    r = cli("forkserver", "--socket", str(tmp_path / "fs" / "s.sock"), timeout=60)
    assert r.returncode != 0 and "is not a socket" in r.stderr, r.stderr
    assert not (tmp_path / "elsewhere").exists()
