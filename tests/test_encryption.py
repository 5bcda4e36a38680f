"""Encryption at rest (artifact/encryption.py, image/codec.py's sealed files): with real CRIU through the CLI, and
the sealed format and key handling on their own."""

from __future__ import annotations

import json
import os
import secrets
import stat
import sys
from pathlib import Path

import pytest

from conftest import BALLAST_WORKER, COUNTER, cli, free_port, http_get, one_error_line, wait_http


def _holds(artifact: Path, needle: bytes) -> list[str]:
    """The artifact's files whose bytes contain `needle`, as `grep -a` would find them."""
    return [str(p.relative_to(artifact)) for p in artifact.rglob("*") if p.is_file() and needle in p.read_bytes()]


def _checkpoint_with_secret(tmp_path: Path, name: str, env: dict[str, str]) -> tuple[Path, bytes, int]:
    secret = f"sk-test-{secrets.token_hex(12)}"
    port = free_port()
    r = cli("run", "--name", name, "--", sys.executable, str(COUNTER), str(port), env={**env, "API_KEY": secret})
    assert r.returncode == 0, r.stderr
    wait_http(port)
    art = tmp_path / name
    r = cli("checkpoint", name, "-o", str(art), "--leave-running", env=env)
    assert r.returncode == 0, r.stderr
    return art, secret.encode(), port


@pytest.mark.criu
@pytest.mark.slow
def test_the_workers_memory_is_not_in_the_artifact_in_the_clear(need_criu, home: Path, tmp_path: Path) -> None:
    art, secret, _ = _checkpoint_with_secret(tmp_path, "sealed", {})
    assert _holds(art, secret) == []
    assert all(p.name.endswith(".sealed") for p in (art / "images").iterdir())
    assert "encrypted aes-256-gcm" in " ".join(cli("inspect", str(art)).stdout.split())
    r = cli("restore", str(art), "--json")
    assert r.returncode == 0, r.stderr
    (rep,) = json.loads(r.stdout)["replicas"]
    assert http_get(rep["port"])
    # The same worker with encryption off: the test sees the secret where it is, so its check above can fail.
    clear, secret, _ = _checkpoint_with_secret(tmp_path, "clear", {"WARMSTART_ENCRYPT": "0"})
    assert _holds(clear, secret), "the secret should be in an unencrypted image"
    assert "encrypted no" in " ".join(cli("inspect", str(clear)).stdout.split())


@pytest.mark.criu
@pytest.mark.slow
def test_a_host_without_the_key_refuses_before_anything_starts(counter_artifact: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.key"
    other.write_text(secrets.token_hex(32))
    other.chmod(0o600)
    r = cli("restore", str(counter_artifact), env={"WARMSTART_ENCRYPTION_KEY": str(other)})
    one_error_line(r, 4, "is encrypted with key", "WARMSTART_DECRYPTION_KEYS")
    assert not [w for w in json.loads(cli("ps", "--json").stdout)["workers"] if w["kind"] == "replica"]
    # Rotation: a new key seals new artifacts; the old one, named as a decryption key, still opens this one.
    old = Path(os.environ["WARMSTART_KEY_DIR"]) / "images.key"
    r = cli("restore", str(counter_artifact), "--json",
            env={"WARMSTART_ENCRYPTION_KEY": str(other), "WARMSTART_DECRYPTION_KEYS": str(old)})
    assert r.returncode == 0, r.stderr


def _sealed(tmp_path: Path, data: bytes, name: str = "pages-1.img") -> tuple[Path, object]:
    from warmstart.artifact import encryption
    from warmstart.image import codec

    key = encryption.derive(secrets.token_bytes(32), secrets.token_bytes(16))
    src = tmp_path / name
    src.write_bytes(data)
    codec.seal([src], key, threads=2, mode="1")
    assert not src.exists()
    return tmp_path / (name + codec.SEALED_SUFFIX), key


def test_a_sealed_file_round_trips_and_keeps_its_holes(tmp_path: Path) -> None:
    from warmstart.image import codec

    data = os.urandom(3 << 20) + bytes(9 << 20) + os.urandom(5000)  # data, a run of zeros, a short last chunk
    sealed, key = _sealed(tmp_path, data)
    assert sealed.stat().st_size < len(data) // 2  # the zeros compressed away before sealing
    out = tmp_path / "out"
    assert codec.inflate(sealed, out, threads=2, key=key) == len(data)  # type: ignore[arg-type]
    assert out.read_bytes() == data
    assert out.stat().st_blocks * 512 < len(data) - (4 << 20)  # the zero chunk stayed a hole
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_a_mostly_zero_chunk_keeps_only_its_data_pages(tmp_path: Path) -> None:
    from warmstart.image import codec

    data = bytearray(8 << 20)  # as a vLLM worker's /dev/shm segment: a few pages written in MBs of zeros
    for at in range(0, len(data), 1 << 20):
        data[at + 100:at + 200] = os.urandom(100)
    sealed, key = _sealed(tmp_path, bytes(data))
    out = tmp_path / "out"
    codec.inflate(sealed, out, threads=2, key=key)  # type: ignore[arg-type]
    assert out.read_bytes() == data
    assert out.stat().st_blocks * 512 <= 16 * 4096  # its 8 data pages (and what the file system adds), not 8 MiB


def test_a_sparse_segment_seals_its_holes_without_reading_them(tmp_path: Path) -> None:
    from warmstart.artifact import encryption
    from warmstart.image import codec

    seg = tmp_path / "psm_1"
    with open(seg, "wb") as f:  # 4 KiB of data, then 12 MiB of hole, then 4 KiB of data
        f.write(os.urandom(4096))
        f.seek((12 << 20) + 4096)
        f.write(os.urandom(4096))
    data = seg.read_bytes()
    fd = os.open(seg, os.O_RDONLY)
    try:
        assert not codec._in_hole(fd, 0, 4 << 20) and codec._in_hole(fd, 4 << 20, 4 << 20)
        assert not codec._in_hole(fd, 12 << 20, 4 << 20)
    finally:
        os.close(fd)
    key = encryption.derive(secrets.token_bytes(32), secrets.token_bytes(16))
    codec.seal([seg], key, threads=2, mode="0")
    out = tmp_path / "out"
    codec.inflate(tmp_path / "psm_1.sealed", out, threads=2, key=key)
    assert out.read_bytes() == data and out.stat().st_blocks * 512 <= 64 << 10


# one piece (copied); sealed in place: one piece, a tree with a short last piece, a tree whose tags start a piece
@pytest.mark.parametrize("size", [5 << 20, 100 << 20, (200 << 20) + 12345, 256 << 20])
def test_the_checksum_taken_while_sealing_is_the_one_checksum_computes(tmp_path: Path, size: int) -> None:
    from warmstart.artifact import encryption, store
    from warmstart.image import codec

    key = encryption.derive(secrets.token_bytes(32), secrets.token_bytes(16))
    src = tmp_path / "pages-1.img"
    data = os.urandom(size)
    src.write_bytes(data)
    packed = codec.seal([src], key, threads=2, mode="0")  # nothing compressed: the threads write the chunks
    sealed = tmp_path / ("pages-1.img" + codec.SEALED_SUFFIX)
    n = sealed.stat().st_size
    assert (n == size + 16 * -(-size // codec.CHUNK) + 32) == (size >= codec.MIN_BYTES)  # in place: tags, trailer
    want = store._hash_all(tmp_path, [(sealed.name, n, store.chunk_size_for(n))])[sealed.name]
    assert packed.digests == {sealed: want}
    assert codec.inflate(sealed, tmp_path / "out", threads=2, key=key) == size
    assert (tmp_path / "out").read_bytes() == data


@pytest.mark.parametrize("harm", ["flip a byte", "swap two chunks", "rename", "another key"])
def test_a_sealed_file_that_was_altered_is_refused(tmp_path: Path, harm: str) -> None:
    from warmstart.artifact import encryption
    from warmstart.errors import ImageError
    from warmstart.image import codec

    chunk = codec.CHUNK
    sealed, key = _sealed(tmp_path, os.urandom(chunk) + os.urandom(chunk))  # two chunks, both stored raw
    body = bytearray(sealed.read_bytes())
    head = len(body) - 2 * (chunk + 16)
    if harm == "flip a byte":
        body[head + 1000] ^= 1
    elif harm == "swap two chunks":
        first = body[head:head + chunk + 16]
        body[head:head + chunk + 16] = body[head + chunk + 16:]
        body[head + chunk + 16:] = first
    elif harm == "rename":
        sealed = sealed.rename(tmp_path / "pages-2.img.sealed")
    else:
        key = encryption.derive(secrets.token_bytes(32), secrets.token_bytes(16))
    if harm in ("flip a byte", "swap two chunks"):
        sealed.write_bytes(bytes(body))
    with pytest.raises(ImageError, match="fails its authentication"):
        codec.inflate(sealed, tmp_path / "out", threads=2, key=key)  # type: ignore[arg-type]


@pytest.mark.parametrize("harm", ["flip a byte", "flip a tag", "swap two chunks", "trailer", "cut short"])
def test_an_image_sealed_in_place_that_was_altered_is_refused(tmp_path: Path, harm: str) -> None:
    from warmstart.errors import ImageError
    from warmstart.image import codec, inplace

    chunk = codec.CHUNK
    data = os.urandom(codec.MIN_BYTES + 5000)
    sealed, key = _sealed(tmp_path, data)
    body = bytearray(sealed.read_bytes())
    assert len(body) == len(data) + 16 * 9 + inplace.TRAILER.size and data[:4096] not in body
    if harm == "flip a byte":
        body[chunk + 7] ^= 1
    elif harm == "flip a tag":
        body[len(data) + 20] ^= 1
    elif harm == "swap two chunks":
        body[:chunk], body[chunk:2 * chunk] = body[chunk:2 * chunk], body[:chunk]
    elif harm == "trailer":
        body[-20] ^= 1  # the raw size: the trailer no longer fits the file
    else:
        del body[len(data) - 5000:len(data) + 16 * 8]  # the last chunk and its tag gone
    sealed.write_bytes(bytes(body))
    with pytest.raises(ImageError, match="fails its authentication|does not fit|not a warmstart"):
        codec.inflate(sealed, tmp_path / "out", threads=2, key=key)  # type: ignore[arg-type]


def test_the_key_is_made_private_and_a_planted_or_bad_one_is_refused(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from warmstart.artifact import encryption
    from warmstart.errors import EnvironmentProblem

    keys = tmp_path / "keys"
    monkeypatch.setenv("WARMSTART_KEY_DIR", str(keys))
    monkeypatch.delenv("WARMSTART_ENCRYPTION_KEY", raising=False)
    first = encryption.master_key()
    assert encryption.master_key() == first and len(first) == 32
    assert stat.S_IMODE((keys / "images.key").stat().st_mode) == 0o600
    (keys / "images.key").chmod(0o644)
    with pytest.raises(EnvironmentProblem, match="not a private file"):
        encryption.master_key()
    (keys / "images.key").unlink()
    (keys / "images.key").symlink_to(tmp_path / "planted")
    with pytest.raises(EnvironmentProblem, match="cannot read the encryption key"):
        encryption.master_key()
    bad = tmp_path / "bad.key"
    bad.write_text("not hex")
    bad.chmod(0o600)
    monkeypatch.setenv("WARMSTART_ENCRYPTION_KEY", str(bad))
    with pytest.raises(EnvironmentProblem, match="64 hex digits"):
        encryption.master_key()


@pytest.mark.criu
@pytest.mark.slow
def test_a_large_image_is_sealed_where_it_lies_and_reaches_the_cache_after_the_checkpoint(
        need_criu, home: Path, tmp_path: Path) -> None:
    import time

    from warmstart.artifact import store
    from warmstart.image import codec, inplace

    worker = tmp_path / "ballast.py"
    worker.write_text(BALLAST_WORKER)
    port = free_port()
    assert cli("run", "--name", "ballast", "--", sys.executable, str(worker), str(port), "48").returncode == 0
    wait_http(port)
    want = http_get(port)
    art = tmp_path / "art"
    r = cli("checkpoint", "ballast", "-o", str(art))
    assert r.returncode == 0, r.stderr
    big = [f for f in store.load(art).files if f.path.startswith("images/pages-") and f.size > codec.MIN_BYTES]
    assert len(big) == 1
    with open(art / big[0].path, "rb") as fh:
        got = inplace.read_trailer(fh.fileno(), big[0].path)
    assert got is not None and big[0].size == got[1] + 16 * got[3] + inplace.TRAILER.size  # no copy: in place
    cached = Path(os.environ["WARMSTART_IMAGE_CACHE"]) / f"{big[0].sha256}.img"
    end = time.monotonic() + 60
    while not cached.exists() and time.monotonic() < end:  # the keeper the checkpoint started opens it there
        time.sleep(0.05)
    assert cached.stat().st_size == got[1]
    assert not list(cached.parent.glob(".*.tmp"))
    before = cached.stat().st_mtime_ns
    r = cli("restore", str(art), "--json")
    assert r.returncode == 0, r.stderr
    (rep,) = json.loads(r.stdout)["replicas"]
    assert http_get(rep["port"]) == want
    assert cached.stat().st_mtime_ns > before  # the restore linked the cached image (cache.cached touches it)
