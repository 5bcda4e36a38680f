"""End to end with real CRIU, real processes and the real reference worker, through the CLI."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from conftest import COUNTER, REPO, SAVED_STATE, cli, evict_pages, free_port, http_get, kept_image, raw_pages, wait_http
from warmstart import demo
from warmstart.criu import binary as criu
from warmstart.image import codec, readahead

pytestmark = [pytest.mark.criu, pytest.mark.slow]

# Both transforms on whatever this host says they cost (image/plan.py would skip them on a 2-core machine).
ALWAYS = {"WARMSTART_COMPRESS": "1", "WARMSTART_ZERO_PAGES": "1"}


def _ps(home: Path) -> list[dict]:
    r = cli("ps", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["workers"]


def test_plain_process_keeps_its_state_across_restore(need_criu, home: Path, tmp_path: Path) -> None:
    port = free_port()
    r = cli("run", "--name", "counter", "--", sys.executable, str(COUNTER), str(port))
    assert r.returncode == 0, r.stderr
    wait_http(port)
    time.sleep(0.3)
    n_before, boot, pid = http_get(port).split()
    r = cli("checkpoint", "counter", "-o", str(tmp_path / "art"), "--leave-running", "--json")
    assert r.returncode == 0, r.stderr
    done = json.loads(r.stdout)
    assert 0 < done["paused_s"] < done["checkpoint_s"]  # serving again before its artifact was finished
    time.sleep(0.5)  # the source keeps counting: a restore must not show its later state
    n_source = int(http_get(port).split()[0])

    r = cli("restore", str(tmp_path / "art"), "--name", "counter-copy", "--json")
    assert r.returncode == 0, r.stderr
    (rep,) = json.loads(r.stdout)["replicas"]
    n_after, boot_after, pid_after = http_get(rep["port"]).split()
    assert boot_after == boot and pid_after == pid  # the same process, same pid inside its namespace
    assert int(n_before) <= int(n_after) < n_source  # continued from the checkpoint, not started over
    time.sleep(0.2)
    assert int(http_get(rep["port"]).split()[0]) > int(n_after)  # and its thread still runs


@pytest.mark.parametrize("read", [{"WARMSTART_READ_THREADS": "1", "WARMSTART_HUGE_PAGES": "0"},
                                  {"WARMSTART_READ_THREADS": "4", "WARMSTART_HUGE_PAGES": "1"}],
                         ids=["one-thread", "threads-huge-pages"])
def test_memory_restored_exactly_from_a_cold_image(need_criu, home: Path, tmp_path: Path, read: dict) -> None:
    """CRIU's page reads (threaded and in huge pages with scripts/criu/parallel-page-reads.patch), from an image
    evicted from the page cache so that restore's readahead runs beside them. Runs of written zeros are taken
    out of the image and come back as zeros; zeros written over a private file mapping stay in it."""
    port = free_port()
    r = cli("run", "--name", "mem", "--", sys.executable, str(REPO / "tests" / "workers" / "memory.py"), str(port),
            "96", str(tmp_path / "mapped.bin"))
    assert r.returncode == 0, r.stderr
    wait_http(port, timeout=120)
    want, now = http_get(port).split()
    assert want == now
    r = cli("checkpoint", "mem", "-o", str(tmp_path / "art"), "--json", env=ALWAYS)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["zero_bytes_dropped"] >= 20 * (512 << 10)  # the worker's runs of zeros, at least
    assert "of zero pages left out" in cli("inspect", str(tmp_path / "art")).stdout
    evict_pages(tmp_path / "art")
    kept_image(tmp_path / "art").unlink()  # as on a node that did not make the artifact
    assert readahead.resident_fraction(readahead.pages_images(tmp_path / "art" / "images")) < 0.5  # so it is read ahead
    before = set(Path("/dev/shm").glob("warmstart-images-*"))
    r = cli("restore", str(tmp_path / "art"), "--name", "mem-copy", "--json", env=read)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["inflate_s"] > 0  # the image is stored compressed and was not cached
    # The inflated image goes once CRIU has read it, after the keeper it was handed to (image/keeper.py) has
    # copied it into the cache (other programs may make segments there meanwhile).
    deadline = time.monotonic() + 30
    while not set(Path("/dev/shm").glob("warmstart-images-*")) <= before:
        assert time.monotonic() < deadline, "the inflated image stayed in /dev/shm"
        time.sleep(0.05)
    (rep,) = json.loads(r.stdout)["replicas"]
    assert http_get(rep["port"]).split() == [want, want]
    kept = kept_image(tmp_path / "art")  # the inflated image, kept for the next restore on this node
    ino = kept.stat().st_ino
    r = cli("restore", str(tmp_path / "art"), "--name", "mem-copy2", "--json")
    assert r.returncode == 0, r.stderr
    assert kept.stat().st_ino == ino  # linked by this restore, not inflated and copied again
    assert http_get(json.loads(r.stdout)["replicas"][0]["port"]).split() == [want, want]
    # CI (WARMSTART_REQUIRE_CRIU=1) runs the CRIU scripts/setup.sh built, which must carry the patch.
    patched = os.environ.get("WARMSTART_REQUIRE_CRIU") == "1" or criu.find().threaded_reads
    if read["WARMSTART_READ_THREADS"] != "1" and patched:
        assert "Read pages with 4 threads" in (home / "workers" / "mem-copy" / "restore.log").read_text()


def test_reference_worker_identical_and_three_replicas(need_criu, home: Path, tmp_path: Path) -> None:
    port = free_port()
    r = cli("run", "--name", "ref", "--wait", "--", sys.executable, "-m", "warmstart.reference.server",
            "--port", str(port), "--kv-cache-mb", "64")
    assert r.returncode == 0, r.stderr
    before = demo.complete(port)
    r = cli("checkpoint", "ref", "-o", str(tmp_path / "art"), "--json", env=ALWAYS)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["image_bytes"] > 0
    assert all(w["name"] != "ref" for w in _ps(home))  # without --leave-running the source is gone
    # The worker's heap is stored compressed; each restore below inflates it.
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert 0 < manifest["compressed_bytes"] < manifest["compressed_raw_bytes"]
    assert [p for p in codec.packed(tmp_path / "art" / "images") if p.name.startswith("pages-")]
    assert "stored compressed" in cli("inspect", str(tmp_path / "art")).stdout

    r = cli("restore", str(tmp_path / "art"), "--replicas", "3", "--name", "rep", "--json")
    assert r.returncode == 0, r.stderr
    reps = json.loads(r.stdout)["replicas"]
    assert [x["name"] for x in reps] == ["rep-0", "rep-1", "rep-2"]
    assert len({x["port"] for x in reps}) == 3
    for x in reps:
        assert demo.complete(x["port"]) == before
        assert json.loads(http_get(x["port"], "/health"))["replica"] == x["replica"]
    # The same artifact restores again while the first three run.
    r = cli("restore", str(tmp_path / "art"), "--name", "again", "--json")
    assert r.returncode == 0, r.stderr
    assert demo.complete(json.loads(r.stdout)["replicas"][0]["port"]) == before

    assert cli("stop", "rep-1").returncode == 0
    alive = {w["name"]: w["alive"] for w in _ps(home)}
    assert "rep-1" not in alive and alive["rep-0"] and alive["rep-2"]

    # A replica is checkpointed in turn (quiesced through its own control directory), and its artifact names
    # the log and control directory the worker itself uses, its source's: the next replica comes up from it.
    r = cli("checkpoint", "again", "-o", str(tmp_path / "again"))
    assert r.returncode == 0, r.stderr
    worker = json.loads((tmp_path / "again" / "manifest.json").read_text())["worker"]
    assert (worker["log_path"], worker["control_dir"]) == (manifest["worker"]["log_path"],
                                                           manifest["worker"]["control_dir"])
    r = cli("restore", str(tmp_path / "again"), "--name", "third", "--json")
    assert r.returncode == 0, r.stderr
    assert demo.complete(json.loads(r.stdout)["replicas"][0]["port"]) == before


def test_demo_json(need_criu, home: Path) -> None:
    r = cli("demo", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    for key in ("cold_start_s", "checkpoint_s", "restore_ready_s", "image_bytes", "identical"):
        assert key in d
    assert d["identical"] is True and d["image_bytes"] > 0
    assert _ps(home) == []  # the demo cleans up after itself


def test_state_saved_outside_the_image_comes_back(need_criu, home: Path, tmp_path: Path) -> None:
    """What an SDK worker saves in the checkpoint's directory (as kept GPU regions do) is in the artifact,
    checksummed and not in CRIU's image; the source reads it back after --leave-running, every replica on restore."""
    port = free_port()
    r = cli("run", "--name", "st", "--wait", "--", sys.executable, str(SAVED_STATE), str(port))
    assert r.returncode == 0, r.stderr
    digest, head, where = http_get(port).split()
    assert where == "memory"
    art = tmp_path / "art"
    r = cli("checkpoint", "st", "-o", str(art), "--leave-running", "--json")
    assert r.returncode == 0, r.stderr
    saved = art / "saved" / "state.bin"
    assert saved.stat().st_size == 8 << 20
    assert "saved/state.bin" in [f["path"] for f in json.loads((art / "manifest.json").read_text())["files"]]
    assert not any(bytes.fromhex(head) in data for data in raw_pages(art / "images"))
    now, now_head, read_from = http_get(port).split()
    # The source read it back as soon as CRIU had its image, from the directory that then became the artifact.
    assert [now, now_head] == [digest, head] and Path(read_from).name == "saved" and not Path(read_from).exists()
    shown = cli("inspect", str(art)).stdout
    assert "saved     8.4 MB" in shown and "read ahead on a cold restore" in shown, shown

    r = cli("restore", str(art), "--replicas", "2", "--json")
    assert r.returncode == 0, r.stderr
    for rep in json.loads(r.stdout)["replicas"]:
        assert http_get(rep["port"]).split() == [digest, head, str(saved.parent)]

    with open(saved, "r+b") as f:  # same size, one byte different
        f.seek(4 << 20)
        b = f.read(1)
        f.seek(4 << 20)
        f.write(bytes([b[0] ^ 1]))
    r = cli("restore", str(art), "--name", "st-bad")
    assert r.returncode != 0 and "does not match its checksum" in r.stderr, r.stderr
