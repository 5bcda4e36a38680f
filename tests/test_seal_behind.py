"""Sealing a pages image while CRIU writes it (image/behind.py, image/inplace.py's SEALED_MAGIC3): the format
and the threads on their own, on a file another thread grows, and a real CRIU dump through the CLI."""

from __future__ import annotations

import json
import os
import secrets
import struct
import sys
import time
from pathlib import Path

import pytest

from conftest import BALLAST_WORKER, cli, free_port, http_get, wait_http
from warmstart.artifact import encryption, store
from warmstart.errors import ImageError
from warmstart.image import behind, codec, inplace

TREE = store.TREE_CHUNK


def _key() -> encryption.ImageKey:
    return encryption.derive(secrets.token_bytes(32), secrets.token_bytes(16))


def _grow(path: Path, data: bytes, begun: behind.Behind) -> None:
    """Write `data` front to back as CRIU would, letting the threads seal a piece before the last part."""
    with open(path, "wb", buffering=0) as f:
        cut = 3 * TREE + 1
        for at in range(0, cut, 1 << 20):
            f.write(data[at:min(cut, at + (1 << 20))])
        end = time.monotonic() + 30
        while time.monotonic() < end and not any(x.handed for x in begun.files.values()):
            time.sleep(0.01)
        f.write(data[cut:])


def _grown(tmp_path: Path, data: bytes) -> tuple[inplace.InPlace, encryption.ImageKey]:
    key = _key()
    images = tmp_path / "images"
    images.mkdir(parents=True)
    begun = behind.Behind(images, key, threads=1, stop=lambda: None).start()
    _grow(images / "pages-1.img", data, begun)
    (f,) = begun.stop().values()
    return f, key


def test_an_image_sealed_while_it_grew_opens_to_what_was_written(tmp_path: Path) -> None:
    data = os.urandom(3 * TREE + (5 << 20) + 12345)
    f, key = _grown(tmp_path, data)
    assert f.sealed and (f.path.read_bytes()[:4096] != data[:4096])  # sealed during the writes, in place
    for at, n in ((0, 4096), (TREE - 100, 5000), (3 * TREE, 1 << 20), (len(data) - 7, 7)):
        assert f.read(n, at) == data[at:at + n]  # what the planner samples: the plaintext
    out = f.path.with_name(f.path.name + codec.SEALED_SUFFIX)
    digest = f.finish(out, threads=2, stop=lambda: None)
    n = out.stat().st_size
    assert digest == store._hash_all(out.parent, [(out.name, n, store.chunk_size_for(n))])[out.name]
    assert codec.inflate(out, tmp_path / "raw", threads=2, key=key) == len(data)
    assert (tmp_path / "raw").read_bytes() == data


def test_an_image_the_planner_would_compress_is_left_for_after_the_dump(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WARMSTART_DISK_MBPS", "20")  # a disk slow enough that compressing pays on 2 cores
    text = b"".join(b"line %d of a log that repeats itself\n" % i for i in range(200_000))
    compressible = (text * (-(-(3 * TREE + 4096) // len(text))))[:3 * TREE + 4096]
    f, _ = _grown(tmp_path / "a", compressible)
    assert f.handed and not f.sealed  # sampled, and left as CRIU wrote it: no pass to undo
    f.close()
    g, _ = _grown(tmp_path / "b", os.urandom(3 * TREE + 4096))
    assert g.sealed  # random bytes never compress: sealed during the writes
    g.close()


def test_unsealing_gives_back_what_was_written(tmp_path: Path) -> None:
    data = os.urandom(3 * TREE + 4096)
    f, _ = _grown(tmp_path, data)
    assert f.sealed
    f.unseal(threads=2)
    assert f.path.read_bytes() == data


def test_an_image_cut_at_a_chunk_with_a_trailer_to_match_is_refused(tmp_path: Path) -> None:
    chunk = codec.CHUNK
    data = os.urandom(codec.MIN_BYTES + 5000)
    src, key = tmp_path / "pages-1.img", _key()
    src.write_bytes(data)
    sealed = src.with_name(src.name + codec.SEALED_SUFFIX)
    inplace.seal(src, sealed, key, chunk, threads=2, stop=lambda: None)
    body = sealed.read_bytes()
    count = -(-len(data) // chunk)
    magic, _, _, _, prefix = inplace.TRAILER.unpack(body[-inplace.TRAILER.size:])
    keep = count - 1  # the last chunk dropped, the rest with a trailer that fits them: every tag is genuine
    tags = body[len(data):len(data) + 16 * keep]
    cut = body[:keep * chunk] + tags + struct.pack("<8sQII8s", magic, keep * chunk, chunk, keep, prefix)
    sealed.write_bytes(cut)
    with pytest.raises(ImageError, match="fails its authentication"):
        codec.inflate(sealed, tmp_path / "out", threads=2, key=key)


@pytest.mark.criu
@pytest.mark.slow
def test_a_dump_sealed_while_criu_wrote_it_restores(need_criu, home: Path, tmp_path: Path) -> None:
    worker = tmp_path / "ballast.py"
    worker.write_text(BALLAST_WORKER)
    port = free_port()
    assert cli("run", "--name", "ballast", "--", sys.executable, str(worker), str(port), "400").returncode == 0
    wait_http(port, timeout=60)
    want = http_get(port)
    behind_mb = {}
    for on in ("1", "0"):
        art = tmp_path / f"art{on}"
        r = cli("checkpoint", "ballast", "-o", str(art), "--leave-running", env={"WARMSTART_SEAL_BEHIND": on})
        assert r.returncode == 0, r.stderr
        m = store.load(art)
        behind_mb[on] = [int(t.reason.split()[0]) for t in m.transforms if t.transform == "seal_behind"]
    assert behind_mb["0"] == []
    (mb,) = behind_mb["1"]
    assert mb > 0  # at least one piece sealed while CRIU still wrote the image
    assert cli("stop", "ballast").returncode == 0
    r = cli("restore", str(tmp_path / "art1"), "--json")
    assert r.returncode == 0, r.stderr
    (rep,) = json.loads(r.stdout)["replicas"]
    assert http_get(rep["port"]) == want
    assert cli("stop", rep["name"]).returncode == 0
