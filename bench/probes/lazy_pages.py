"""What CRIU's lazy pages (userfaultfd) would give a warm restore on this host, on a plain worker: 1400 MiB of
private memory with data in every page, each request reading one page in 33 (about what one vLLM completion
touches: bench/probes/touched_by_request.py). The worker is dumped once, then restored (page cache warm) by
plain CRIU, by CRIU with warmstart's page-read settings (criu/binary.py's restore_env: threads, huge pages), and
lazily (`criu lazy-pages` serving the pages, `criu restore --lazy-pages`), alternating.

    python3 bench/probes/lazy_pages.py [--rounds 2] [--work /var/tmp/warmstart-lazy]

Per restore: CRIU's restore, the first request's reply (from the restore's start), and for lazy restores when
the lazy-pages daemon had every page in. Needs root and a CRIU with uffd (`criu check --feature uffd-noncoop`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from warmstart.criu import binary as criu

WORKER = """
import socket, sys
n = 1400 << 20
buf = bytearray(n)
chunk = bytes(range(256)) * 4096
for off in range(0, n, len(chunk)):
    buf[off:off + len(chunk)] = chunk
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(sys.argv[1])))
srv.listen(8)
while True:
    c, _ = srv.accept()
    c.recv(8)
    c.send(str(sum(buf[off] for off in range(0, n, 4096 * 33))).encode())
    c.close()
"""
OPTS = ["--tcp-established", "--shell-job", "--restore-detached"]


def ask(port: int, deadline_s: float = 30) -> str:
    end = time.monotonic() + deadline_s
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=deadline_s) as c:
                c.send(b"go")
                return c.recv(64).decode()
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.005)


def kill(pid: int) -> None:
    subprocess.run(["kill", "-9", str(pid)], check=False)
    while Path(f"/proc/{pid}").exists():
        time.sleep(0.05)


def restore(how: str, img: Path, work: Path, port: int, pid: int, want: str) -> dict[str, float]:
    path = criu.find().path
    env = {**os.environ, **(criu.restore_env() if how == "warmstart" else {})}
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    daemon = None
    if how == "lazy":
        daemon = subprocess.Popen([path, "lazy-pages", "-D", str(img), "--work-dir", str(work), "-o", "lazy.log"],
                                  stderr=subprocess.DEVNULL)
        while not (work / "lazy-pages.socket").exists():
            time.sleep(0.005)
    t0 = time.monotonic()
    extra = ["--lazy-pages"] if how == "lazy" else []
    r = subprocess.run([path, "restore", "-D", str(img), "--work-dir", str(work), "-o", "restore.log", *extra, *OPTS],
                       env=env, stderr=subprocess.DEVNULL)
    t1 = time.monotonic()
    if r.returncode:
        raise RuntimeError(f"{how}: criu restore exited {r.returncode} (log: {work / 'restore.log'})")
    got = ask(port)
    t2 = time.monotonic()
    out = {"criu_s": t1 - t0, "first_reply_s": t2 - t0}
    if daemon:
        daemon.wait(60)
        out["all_pages_in_s"] = time.monotonic() - t0
    if got != want:
        raise RuntimeError(f"{how}: the worker answered {got!r}, not {want!r}")
    kill(pid)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/var/tmp/warmstart-lazy"))
    ap.add_argument("--port", type=int, default=47031)
    args = ap.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    img = args.work / "img"
    img.mkdir(parents=True)
    worker = subprocess.Popen([sys.executable, "-c", WORKER, str(args.port)], start_new_session=True,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    want = ask(args.port, 60)
    subprocess.run([criu.find().path, "dump", "-t", str(worker.pid), "-D", str(img), "-o", "dump.log",
                    "--tcp-established", "--shell-job"], check=True, stderr=subprocess.DEVNULL)
    worker.wait()
    for p in img.iterdir():  # the page cache warm, as for a restore from this node's cache
        p.read_bytes()
    print("| restore | CRIU s | first reply s | all pages in s |\n|---|---|---|---|")
    for _ in range(args.rounds):
        for how in ("plain", "warmstart", "lazy"):
            r = restore(how, img, args.work / "work", args.port, worker.pid, want)
            print(f"| {how} | {r['criu_s']:.3f} | {r['first_reply_s']:.3f} | {r.get('all_pages_in_s', 0):.3f} |",
                  flush=True)
    shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
