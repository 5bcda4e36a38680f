"""The reference worker's model cache: bounded by WARMSTART_MODEL_CACHE_MB (the least recently used models go when
one is made, never the one made nor one a live process uses), shown and cleared by `warmstart cache` beside the
raw-image cache, in one table. Processes holding models are real ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import cli, one_error_line
from warmstart.reference import modelcache

MiB = 1 << 20


@pytest.fixture()
def caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private model cache (WARMSTART_CACHE) and raw-image cache; returns the models' directory."""
    monkeypatch.setenv("WARMSTART_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("WARMSTART_IMAGE_CACHE", str(tmp_path / "images"))
    monkeypatch.delenv("WARMSTART_MODEL_CACHE_MB", raising=False)
    (tmp_path / "cache" / "models").mkdir(parents=True)
    return tmp_path / "cache" / "models"


def _model(models: Path, name: str, mib: int, used: float) -> Path:
    """A model directory as model.build leaves one: config.json and weights, last used at `used`."""
    d = models / f"reference-{name}"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"\0" * (mib * MiB))
    os.utime(d, (used, used))
    return d


@pytest.fixture()
def holder() -> Iterator[list[subprocess.Popen[str]]]:
    """Start processes that hold a file open (a worker serving a model); killed afterwards."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for p in started:
        p.kill()
        p.wait()


def _hold(started: list[subprocess.Popen[str]], path: Path) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-c", "import sys, time; f = open(sys.argv[1]); print('open', flush=True); "
                          "time.sleep(300)", str(path)], stdout=subprocess.PIPE, text=True)
    started.append(p)
    assert p.stdout is not None and p.stdout.readline() == "open\n"
    return p


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.mark.slow
def test_a_new_model_pushes_out_the_least_recently_used_but_never_one_in_use(caches: Path, holder: list) -> None:
    old = _model(caches, "old", 4, 1000)
    held = _model(caches, "held", 4, 2000)
    recent = _model(caches, "recent", 4, 3000)
    _hold(holder, held / "model.safetensors")
    killed_build = caches / f".reference-x-float32.tmp-{_dead_pid()}"
    killed_build.mkdir()
    live_build = caches / f".reference-y-float32.tmp-{holder[0].pid}"
    live_build.mkdir()
    # The tiny reference model is 12.1 MiB: with it and `recent`, `held` would not fit in 20 MiB; it is in use.
    r = subprocess.run([sys.executable, "-c", "from warmstart.reference import model; print(model.ensure())"],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "WARMSTART_MODEL_CACHE_MB": "20"})
    assert r.returncode == 0, r.stderr
    made = Path(r.stdout.strip())
    assert made.parent == caches and (made / "model.safetensors").is_file()
    assert sorted(p.name for p in caches.iterdir()) == sorted([made.name, held.name, recent.name, live_build.name])
    assert not old.exists() and not killed_build.exists()
    # Asked again, the same model comes back (now the most recently used) and nothing more is built or removed.
    os.utime(made, (1500, 1500))
    r = subprocess.run([sys.executable, "-c", "from warmstart.reference import model; print(model.ensure())"],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "WARMSTART_MODEL_CACHE_MB": "1"})
    assert r.returncode == 0 and r.stdout.strip() == str(made), r.stderr
    assert [e.path for e in modelcache.entries()] == [made, recent, held]


def test_a_model_too_large_for_the_limit_stays_when_it_is_the_one_made(caches: Path) -> None:
    new = _model(caches, "new", 3, 3000)
    other = _model(caches, "other", 1, 2000)
    assert modelcache.prune(keep=new, limit=1) == [other]
    assert [e.path for e in modelcache.entries()] == [new]


def test_cache_shows_both_caches_in_one_table_and_clears_what_is_named(caches: Path, tmp_path: Path,
                                                                       holder: list) -> None:
    images = tmp_path / "images"
    images.mkdir(mode=0o700)
    image = images / f"{'a' * 64}.img"
    image.write_bytes(b"x" * MiB)
    idle = _model(caches, "idle", 1, 1000)
    held = _model(caches, "held", 2, 2000)
    _hold(holder, held / "model.safetensors")

    r = cli("cache", env={"COLUMNS": "200", "WARMSTART_MODEL_CACHE_MB": "64"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("warmstart cache") == 1 and r.stdout.count("┏") == 1  # one table
    assert str(images) in r.stdout and image.name in r.stdout and "16384 MiB, 8 images" in r.stdout
    assert str(caches) in r.stdout and idle.name in r.stdout and "64 MiB" in r.stdout
    (held_line,) = [ln for ln in r.stdout.splitlines() if held.name in ln]
    assert "in use" in held_line and "2.1 MB" in held_line

    shown = json.loads(cli("cache", "--json").stdout)
    assert [Path(i["path"]) for i in shown["images"]] == [image]  # the image cache's keys, as before
    models = shown["models"]
    assert models["dir"] == str(caches) and models["limit_mb"] == modelcache.DEFAULT_MB
    assert [(m["path"], m["bytes"] > 2 * MiB, m["in_use"]) for m in models["models"]] == [
        (str(held), True, True), (str(idle), False, False)]
    assert "images" not in json.loads(cli("cache", "models", "--json").stdout)

    r = cli("cache", "models", "--clear")
    assert r.returncode == 0, r.stderr
    assert "removed 1 model(s)" in r.stdout and f"kept 1 in use: {held.name}" in r.stdout
    assert not idle.exists() and held.exists() and image.exists()  # only the cache named
    r = cli("cache", "--clear")
    assert r.returncode == 0 and "removed 1 cached image(s)" in r.stdout, r.stderr
    assert not image.exists() and held.exists()


def test_a_bad_cache_name_or_limit_is_one_line(caches: Path, tmp_path: Path) -> None:
    one_error_line(cli("cache", "everything"), 2, "everything", "images, models or all")
    bad = {"WARMSTART_MODEL_CACHE_MB": "lots"}
    one_error_line(cli("cache", env=bad), 2, "WARMSTART_MODEL_CACHE_MB", "'lots'")
    r = cli("run", "--name", "never", "--", "sleep", "60", env={**bad, "WARMSTART_HOME": str(tmp_path / "home")})
    one_error_line(r, 2, "WARMSTART_MODEL_CACHE_MB")
    assert not (tmp_path / "home" / "workers" / "never").exists()
    # The reference worker, started by hand, reads the limit itself: one line before it builds anything.
    r = subprocess.run([sys.executable, "-m", "warmstart.reference.server", "--port", "0"], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "WARMSTART_MODEL_CACHE_MB": "0"})
    one_error_line(r, 2, "WARMSTART_MODEL_CACHE_MB", "'0'")
    assert list(caches.iterdir()) == []


def _small_disk_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keys: str) -> Path:
    """An image cache on a 10 MiB disk with a 5 MiB reserve (free space is what its images leave), filled by
    checkpoints with one 2 MiB image per key, in that order (the first the least recently used)."""
    from warmstart.image import cache

    d = tmp_path / "images"
    monkeypatch.setattr(cache, "_free", lambda _: 10 * MiB - sum(p.stat().st_size for p in d.glob("*.img")))
    monkeypatch.setattr(cache, "_reserve", lambda _: 5 * MiB)
    for i, key in enumerate(keys):
        raw = tmp_path / f"raw-{key}"
        raw.write_bytes(b"\1" * (2 * MiB))
        cache.cache_raw(raw, key * 64)
        os.utime(d / f"{key * 64}.img", (1000 + i, 1000 + i))
    return d


def test_the_image_cache_leaves_its_disk_a_reserve_the_oldest_images_going_first(caches: Path, tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from warmstart.image import cache

    d = _small_disk_cache(tmp_path, monkeypatch, "abc")
    assert sorted(p.name[0] for p in d.glob("*.img")) == ["b", "c"]  # a third would leave 4 MiB free
    big = tmp_path / "inflated"
    big.write_bytes(b"\1" * (2 * MiB))
    cache.copy_into_cache(big, "d" * 64)  # a restore's copy: the least recently used image makes room for it
    assert sorted(p.name[0] for p in d.glob("*.img")) == ["c", "d"]
    huge = tmp_path / "huge"
    huge.write_bytes(b"\1" * (6 * MiB))
    cache.copy_into_cache(huge, "e" * 64)  # would not fit even in an empty cache: nothing removed for it
    assert sorted(p.name[0] for p in d.glob("*.img")) == ["c", "d"]


def test_an_image_a_restore_holds_is_not_evicted(caches: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from warmstart.image import cache

    d = _small_disk_cache(tmp_path, monkeypatch, "ab")
    held = cache.hold(d / f"{'a' * 64}.img")  # the oldest, linked by a restore whose CRIU has not opened it yet
    try:
        new = tmp_path / "inflated"
        new.write_bytes(b"\1" * (2 * MiB))
        cache.copy_into_cache(new, "c" * 64)
        assert sorted(p.name[0] for p in d.glob("*.img")) == ["a", "c"]  # b went instead of the held a
        assert [p.name[0] for p in cache.clear()] == ["c"]  # clearing, too, leaves a held image
    finally:
        os.close(held)
    assert [p.name[0] for p in cache.clear()] == ["a"]
    gone = d / f"{'a' * 64}.img"
    with pytest.raises(FileNotFoundError):
        cache.hold(gone)


def test_images_enter_the_image_cache_readable_by_their_owner_alone(caches: Path, tmp_path: Path) -> None:
    from warmstart.image import cache

    os.umask(0o022)  # CRIU's images and a plain copy come out 0644 under the usual umask
    raw = tmp_path / "pages-1.img"
    raw.write_bytes(b"\1" * MiB)
    raw.chmod(0o644)
    cache.cache_raw(raw, "a" * 64)
    inflated = tmp_path / "inflated"
    inflated.write_bytes(b"\2" * MiB)
    inflated.chmod(0o644)
    cache.copy_into_cache(inflated, "b" * 64)
    modes = {p.name[0]: p.stat().st_mode & 0o777 for p in (tmp_path / "images").iterdir()}
    assert modes == {"a": 0o600, "b": 0o600}
    assert (tmp_path / "images" / f"{'b' * 64}.img").read_bytes() == b"\2" * MiB
