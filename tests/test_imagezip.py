"""Compressed pages images (image/codec.py): stored compressed at checkpoint, inflated for each restore."""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
from pathlib import Path

import pytest

from conftest import cli, evict_file
from warmstart.image import cache as image_cache
from warmstart.image import codec, inflated, keeper


def _pages(size: int, random_every: int = 4) -> bytes:
    """Pages that compress (a repeated pattern) with some that do not (random), like a worker's heap."""
    out = bytearray()
    for i in range(size // 4096):
        out += os.urandom(4096) if i % random_every == 0 else bytes([i % 251]) * 4096
    return bytes(out)


def _images(tmp_path: Path, big: bytes) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    (images / "pages-1.img").write_bytes(b"s" * 8192)  # small: stays as it is
    (images / "pages-2.img").write_bytes(big)
    (images / "core-2.img").write_bytes(b"core")
    return images


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("WARMSTART_IMAGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_large_pages_image_is_stored_compressed_and_inflates_exactly(tmp_path: Path, cache: Path) -> None:
    big = _pages(codec.MIN_BYTES + 3 * 4096)  # the last chunk is short
    images = _images(tmp_path, big)
    warnings: list[str] = []
    raw, stored = codec.compress(images, threads=2, warn=warnings.append)
    assert not warnings
    assert raw == len(big) and stored == (images / "pages-2.img.z").stat().st_size
    assert stored < 0.4 * raw
    assert not (images / "pages-2.img").exists() and (images / "pages-1.img").exists()
    assert codec.compressed(images) == [images / "pages-2.img.z"]

    view = inflated.Inflated(images, threads=3, keys={"pages-2.img.z": "1" * 64})
    try:
        assert (view.path / "pages-2.img").read_bytes() == big
        assert not (view.path / "pages-2.img").is_symlink()  # nothing cached: inflated
        assert (view.path / "pages-1.img").resolve() == images / "pages-1.img"  # the rest is linked
        assert (view.path / "core-2.img").read_bytes() == b"core"
        assert sorted(p.name for p in view.path.iterdir()) == ["core-2.img", "pages-1.img", "pages-2.img"]
    finally:
        view.remove()
    assert not view.path.exists()
    assert not cache.exists() or not list(cache.iterdir())  # not kept: CRIU may not have read it
    view.remove()  # idempotent


def test_an_image_a_restore_inflated_is_kept_in_the_cache_for_the_next(tmp_path: Path, cache: Path) -> None:
    big = _pages(codec.MIN_BYTES)
    images = _images(tmp_path, big)
    codec.compress(images, threads=2, warn=print)
    cache.mkdir(mode=0o700)
    stale = cache / f".{'4' * 64}-4999999.tmp"  # a copy that a killed restore (no such pid) left half done
    stale.write_bytes(b"half")
    first = inflated.Inflated(images, threads=2, keys={"pages-2.img.z": "4" * 64})
    assert not (first.path / "pages-2.img").is_symlink()  # nothing cached yet: inflated
    first.remove(keep=True)  # CRIU has read it
    assert not first.path.exists()
    assert sorted(p.name for p in cache.iterdir()) == ["4" * 64 + ".img"]  # the stale copy is gone too
    assert (cache / ("4" * 64 + ".img")).read_bytes() == big

    second = inflated.Inflated(images, threads=2, keys={"pages-2.img.z": "4" * 64})
    assert (second.path / "pages-2.img").resolve() == cache / ("4" * 64 + ".img")  # linked, not inflated
    second.remove(keep=True)  # nothing of its own to keep
    assert sorted(p.name for p in cache.iterdir()) == ["4" * 64 + ".img"]


def test_a_restore_about_to_exit_hands_the_copy_into_the_cache_to_a_process_of_its_own(tmp_path: Path,
                                                                                      cache: Path) -> None:
    big = _pages(codec.MIN_BYTES)
    images = _images(tmp_path, big)
    codec.compress(images, threads=2, warn=print)
    view = inflated.Inflated(images, threads=2, keys={"pages-2.img.z": "5" * 64})
    where = view.path.parent
    view.remove(keep=True, detach=True)  # returns once the keeper has the directory, before the copy
    assert not view.path.exists()
    taken = [d for d in where.glob(f"{keeper.PREFIX}*") if d.name.endswith(view.path.name.rsplit("-", 1)[-1])]
    inflated.remove_stale(where)  # another restore's clean-up leaves a live keeper's directory alone
    deadline = time.monotonic() + 30
    while not (cache / ("5" * 64 + ".img")).exists() or any(d.exists() for d in taken):
        assert time.monotonic() < deadline, "the keeper did not finish"
        time.sleep(0.05)
    assert (cache / ("5" * 64 + ".img")).read_bytes() == big


def test_a_keeper_that_cannot_take_the_directory_leaves_it_to_the_caller(tmp_path: Path) -> None:
    other = tmp_path / "not-an-inflated-view"
    other.mkdir()
    assert not keeper.hand_over(other, {})  # the keeper refuses it: the caller copies and removes it itself
    assert other.is_dir()


def test_the_checkpoints_raw_image_is_used_while_cached_and_inflated_again_once_not(tmp_path: Path,
                                                                                       cache: Path) -> None:
    big = _pages(codec.MIN_BYTES)
    images = _images(tmp_path, big)
    codec.compress(images, threads=2, warn=print, keep=tmp_path / "raw")
    assert (tmp_path / "raw" / "pages-2.img").read_bytes() == big
    image_cache.cache_raw(tmp_path / "raw" / "pages-2.img", "2" * 64)
    cached = cache / ("2" * 64 + ".img")
    ino = cached.stat().st_ino

    first = inflated.Inflated(images, threads=2, keys={"pages-2.img.z": "2" * 64})
    assert (first.path / "pages-2.img").resolve() == cached and cached.stat().st_ino == ino  # used as it is
    first.remove()

    evict_file(cached)  # as on a node that has not read it since a reboot
    again = inflated.Inflated(images, threads=2, keys={"pages-2.img.z": "2" * 64})
    # Inflated again rather than read: its compressed file is in memory, the raw image is not.
    assert not (again.path / "pages-2.img").is_symlink()
    assert (again.path / "pages-2.img").read_bytes() == big and cached.stat().st_ino == ino
    again.remove()


def test_a_cold_raw_image_is_linked_for_a_sealed_one_but_not_for_a_compressed_one_in_memory(tmp_path: Path,
                                                                                        cache: Path) -> None:
    big = _pages(codec.MIN_BYTES)
    sealed, compressed = tmp_path / "pages-2.img.sealed", tmp_path / "pages-2.img.z"
    sealed.write_bytes(big + bytes(4096))  # as large as its raw image, and then some (the tags)
    compressed.write_bytes(big[: len(big) // 2])  # half its raw size
    raw = tmp_path / "raw.img"
    raw.write_bytes(big)
    image_cache.cache_raw(raw, "7" * 64)
    cached = cache / ("7" * 64 + ".img")
    for f in (cached, sealed, compressed):
        evict_file(f)  # a node's disk after a reboot: nothing of them in the page cache
    # Both files cold: the sealed file needs as many bytes from the disk and then its decryption.
    assert image_cache.cached("7" * 64, len(big), sealed) == cached
    # The compressed file is in memory, its raw image on a cold disk: opening it reads nothing from the disk.
    compressed.read_bytes()
    assert image_cache.cached("7" * 64, len(big), compressed) is None
    cached.read_bytes()  # the raw image in memory too: linked
    assert image_cache.cached("7" * 64, len(big), compressed) == cached


def test_a_cache_others_can_write_to_is_not_used(tmp_path: Path, cache: Path) -> None:
    cache.mkdir(mode=0o777)
    cache.chmod(0o777)
    assert image_cache.cache_dir() is None
    images = _images(tmp_path, _pages(codec.MIN_BYTES))
    codec.compress(images, threads=2, warn=print)
    view = inflated.Inflated(images, threads=2, keys={"pages-2.img.z": "3" * 64})
    assert not (view.path / "pages-2.img").is_symlink() and not list(cache.iterdir())
    view.remove()


def test_the_cache_keeps_the_newest_images(tmp_path: Path, cache: Path) -> None:
    cache.mkdir(mode=0o700)
    for i in range(image_cache.CACHE_KEEP + 2):
        raw = tmp_path / f"raw-{i}"
        raw.write_bytes(b"x")
        os.utime(raw, (1000 + i, 1000 + i))
        image_cache.cache_raw(raw, f"{i:064x}")
    kept = sorted(f"{i:064x}.img" for i in range(2, image_cache.CACHE_KEEP + 2))
    assert sorted(p.name for p in cache.iterdir()) == kept


def test_the_cache_stays_within_its_size_and_is_shown_and_cleared(tmp_path: Path, cache: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WARMSTART_IMAGE_CACHE_MB", "1")
    cache.mkdir(mode=0o700)
    for i in range(3):
        raw = tmp_path / f"raw-{i}"
        raw.write_bytes(b"x" * (400 << 10))
        os.utime(raw, (1000 + i, 1000 + i))
        image_cache.cache_raw(raw, f"{i:064x}")
    assert sorted(p.name for p in cache.iterdir()) == [f"{1:064x}.img", f"{2:064x}.img"]  # 0.8 of 1 MiB
    r = cli("cache", "--json")
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    assert shown["limit_mb"] == 1 and [Path(e["path"]).name for e in shown["images"]] == [f"{2:064x}.img",
                                                                                            f"{1:064x}.img"]
    assert cli("cache", "images", "--clear").returncode == 0 and list(cache.iterdir()) == []


def test_only_a_checksum_names_a_cached_image(tmp_path: Path, cache: Path) -> None:
    raw = tmp_path / "raw"
    raw.write_bytes(b"x")
    image_cache.cache_raw(raw, "../escape")
    assert not raw.exists() and not (tmp_path / "escape.img").exists()
    images = _images(tmp_path, _pages(codec.MIN_BYTES))
    codec.compress(images, threads=2, warn=print)
    (tmp_path / "other.img").write_bytes(bytes(codec.raw_size(images / "pages-2.img.z")))
    view = inflated.Inflated(images, threads=2, keys={"pages-2.img.z": "../other"})
    assert not (view.path / "pages-2.img").is_symlink()  # inflated, not linked to a file outside the cache
    view.remove()


def test_an_image_that_does_not_compress_stays_raw(tmp_path: Path, cache: Path) -> None:
    big = os.urandom(codec.MIN_BYTES)
    images = _images(tmp_path, big)
    assert codec.compress(images, threads=2, warn=print) == (0, 0)
    assert (images / "pages-2.img").read_bytes() == big
    assert codec.compressed(images) == [] and not list(images.glob("*.tmp"))


def test_an_image_that_would_keep_more_than_half_stays_raw_decided_from_samples(
        tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 3 random pages of every 5: zlib keeps ~0.6, as it keeps 0.8 of bf16 weights. Compressing such an image
    # costs the checkpoint far more than the restore gains, so it stays raw, and only samples are compressed.
    big = bytes(b"".join(os.urandom(4096) if i % 5 < 3 else bytes(4096) for i in range(codec.MIN_BYTES // 4096)))
    images = _images(tmp_path, big)
    seen: list[int] = []
    real = codec.zlib.compress
    monkeypatch.setattr(codec.zlib, "compress", lambda data, level: seen.append(len(data)) or real(data, level))
    assert codec.compress(images, threads=2, warn=print) == (0, 0)
    assert (images / "pages-2.img").read_bytes() == big
    assert codec.compressed(images) == [] and not list(images.glob("*.tmp"))
    assert seen and max(seen) <= 4 * codec._SAMPLE


def test_random_chunks_are_stored_raw_within_a_compressed_image(tmp_path: Path, cache: Path) -> None:
    chunk = codec.CHUNK
    big = bytes(2 * chunk) + os.urandom(chunk) + bytes(7 * chunk)  # one chunk of ten does not compress
    images = _images(tmp_path, big)
    codec.compress(images, threads=2, warn=print)
    z = images / "pages-2.img.z"
    data = z.read_bytes()
    count = struct.unpack_from("<I", data, 20)[0]
    lengths = struct.unpack_from(f"<{count}I", data, 24)
    assert lengths[2] == chunk and all(n < chunk for i, n in enumerate(lengths) if i != 2)
    out = tmp_path / "raw.img"
    assert codec.inflate(z, out, threads=2) == len(big)
    assert out.read_bytes() == big


@pytest.mark.parametrize("damage", ["flipped", "truncated", "foreign"])
def test_a_damaged_compressed_image_is_refused_and_nothing_is_left(tmp_path: Path, cache: Path, damage: str) -> None:
    images = _images(tmp_path, _pages(codec.MIN_BYTES, random_every=1000))
    codec.compress(images, threads=2, warn=print)
    z = images / "pages-2.img.z"
    data = bytearray(z.read_bytes())
    if damage == "flipped":
        data[len(data) // 2] ^= 0xFF
    elif damage == "truncated":
        del data[-100:]
    else:
        data[:8] = b"NOTOURS!"
    z.write_bytes(bytes(data))
    before = set(inflated.memory_dir(0).iterdir())
    with pytest.raises(codec.ImageError, match="pages-2.img.z"):
        inflated.Inflated(images, threads=2, keys={"pages-2.img.z": "4" * 64})
    assert set(inflated.memory_dir(0).iterdir()) == before  # no half-made directory left behind
    assert not cache.exists() or not list(cache.iterdir())  # nor a half-inflated image


def test_a_failed_write_leaves_the_image_raw_with_a_warning(tmp_path: Path, cache: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    big = _pages(codec.MIN_BYTES)
    images = _images(tmp_path, big)

    def full(*a: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(codec.os, "pwrite", full)
    warnings: list[str] = []
    assert codec.compress(images, threads=2, warn=warnings.append) == (0, 0)
    assert len(warnings) == 1 and "pages-2.img stays uncompressed" in warnings[0] and "No space" in warnings[0]
    assert (images / "pages-2.img").read_bytes() == big and not list(images.glob("*.z*"))


def test_what_a_killed_restore_left_is_removed_by_the_next(tmp_path: Path, cache: Path) -> None:
    images = _images(tmp_path, _pages(codec.MIN_BYTES))
    codec.compress(images, threads=2, warn=print)
    where = inflated.memory_dir(codec.MIN_BYTES)
    dead = where / "warmstart-images-4999999-abc"  # no such pid
    mine = where / f"warmstart-images-{os.getpid()}-abc"  # a live restore's
    dead.mkdir()
    mine.mkdir()
    try:
        view = inflated.Inflated(images, threads=2, keys={})
        view.remove()
        assert not dead.exists() and mine.exists()
    finally:
        shutil.rmtree(dead, ignore_errors=True)
        shutil.rmtree(mine, ignore_errors=True)


def test_a_restore_waits_for_an_image_being_written_into_the_cache(tmp_path: Path, cache: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    monkeypatch.setattr(image_cache, "_WAIT_FROM", 1 << 20)  # as large as the images a keeper is waited for

    d = image_cache.cache_dir()
    assert d is not None
    key, data = "3" * 64, os.urandom(1 << 20)
    stored = tmp_path / "pages-2.img.sealed"  # the artifact's file of it, as large
    stored.write_bytes(data)
    marker = image_cache.fill_path(d, key)  # as the checkpoint marks it for its keeper (here: this process)
    marker.write_bytes(data)

    def finish() -> None:
        time.sleep(0.5)
        os.replace(marker, d / f"{key}.img")

    threading.Thread(target=finish).start()
    t0 = time.monotonic()
    assert image_cache.cached(key, len(data), stored) == d / f"{key}.img"
    assert time.monotonic() - t0 >= 0.4
    image_cache.fill_path(d, "6" * 64).write_bytes(data)  # never finished: an interrupted restore stops waiting

    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        image_cache.cached("6" * 64, len(data), stored, interrupted)
    dead = d / f".{'4' * 64}-999999999.tmp"  # a keeper that died: not waited for
    dead.write_bytes(b"x")
    t0 = time.monotonic()
    assert image_cache.cached("4" * 64, 1, stored) is None and time.monotonic() - t0 < 5


def test_a_small_image_being_written_into_the_cache_is_not_waited_for(tmp_path: Path, cache: Path) -> None:
    d = image_cache.cache_dir()
    assert d is not None
    stored = tmp_path / "pages-2.img.sealed"
    stored.write_bytes(os.urandom(1 << 20))
    image_cache.fill_path(d, "8" * 64).write_bytes(b"")  # this process's mark: a live keeper's
    t0 = time.monotonic()
    assert image_cache.cached("8" * 64, 1 << 20, stored) is None  # opened by the restore itself
    assert time.monotonic() - t0 < 1


def test_an_image_over_the_cache_budget_never_reaches_the_disk(tmp_path: Path, cache: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WARMSTART_IMAGE_CACHE_MB", "1")  # no image fits
    raw = tmp_path / "pages-2.img"
    raw.write_bytes(os.urandom(2 << 20))
    image_cache.copy_into_cache(raw, "5" * 64)
    keeper.fill_after_checkpoint(tmp_path / "no-artifact", {"pages-2.img.sealed": ("5" * 64, 2 << 20)})
    assert not list(cache.iterdir())  # not even a mark for a keeper


def _sealed_small(tmp_path: Path) -> tuple[Path, object, dict[str, bytes]]:
    """A directory of small sealed files, as an artifact's shm/ (or its small images) holds them."""
    import secrets

    from warmstart.artifact import encryption

    key = encryption.derive(secrets.token_bytes(32), secrets.token_bytes(16))
    d = tmp_path / "shm"
    d.mkdir()
    raw = {"psm_1": os.urandom(5000) + bytes(12 << 20), "core-7.img": b"core" * 100}
    for name, data in raw.items():
        (d / name).write_bytes(data)
    codec.seal(sorted(d.iterdir()), key, threads=2, mode="0")
    return d, key, raw


def test_small_sealed_files_are_kept_as_one_set_that_later_restores_copy(tmp_path: Path, cache: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    d, key, raw = _sealed_small(tmp_path)
    keys = {p.name: f"{i:064x}" for i, p in enumerate(sorted(d.iterdir()))}
    first = inflated.Inflated(d, threads=2, keys=keys, key=key, use_cache=False, set_below=None)
    assert {p.name: p.read_bytes() for p in first.path.iterdir()} == raw
    first.remove(keep=True)  # CRIU (or the replicas) read them
    (kept,) = cache.glob("*.set")
    assert {p.name: p.read_bytes() for p in kept.iterdir()} == raw
    assert {p.stat().st_mode & 0o777 for p in kept.iterdir()} == {0o600} and kept.stat().st_mode & 0o777 == 0o700
    assert (kept / "psm_1").stat().st_blocks * 512 <= 4 << 20  # the chunks of zeros stay holes

    def no_inflate(*_: object, **__: object) -> int:
        raise AssertionError("opened again although the set was cached")

    with monkeypatch.context() as m:
        m.setattr(inflated, "inflate", no_inflate)
        second = inflated.Inflated(d, threads=2, keys=keys, key=key, use_cache=False, set_below=None)
    assert {p.name: p.read_bytes() for p in second.path.iterdir()} == raw
    second.remove(keep=True)
    assert list(cache.glob("*.set")) == [kept]

    (kept / "core-7.img").write_bytes(b"cut")  # a set that does not hold each file whole is not used
    third = inflated.Inflated(d, threads=2, keys=keys, key=key, use_cache=False, set_below=None)
    assert (third.path / "core-7.img").read_bytes() == raw["core-7.img"]
    third.remove()
    other = {**keys, "core-7.img.sealed": "f" * 64}  # other checksums: another set
    fourth = inflated.Inflated(d, threads=2, keys=other, key=key, use_cache=False, set_below=None)
    fourth.remove(keep=True)
    assert len(list(cache.glob("*.set"))) == 2
    assert sorted(p.suffix for p, _ in image_cache.entries(cache)) == [".set", ".set"]
    assert image_cache.clear() and not list(cache.iterdir())
