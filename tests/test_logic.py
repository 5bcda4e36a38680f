"""Pure decisions: host compatibility, CRIU versions and logs, the seccomp program, artifact checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from warmstart import paths
from warmstart.artifact import store
from warmstart.artifact.manifest import CriuSettings, Manifest, WorkerIdentity
from warmstart.criu import binary as criu
from warmstart.criu import pagefill, seccomp
from warmstart.errors import ArtifactError, UsageError
from warmstart.host import HostInfo, check_compatible

HOST = HostInfo(arch="x86_64", kernel="6.18", cpu_model="EPYC", cpu_flags=["avx", "avx2", "sse4_2"],
                criu_version="4.2.1")


def test_same_host_is_compatible() -> None:
    assert check_compatible(HOST, HOST) == []


def test_other_arch_is_refused() -> None:
    problems = check_compatible(HOST, HOST.model_copy(update={"arch": "aarch64"}))
    assert len(problems) == 1 and "x86_64" in problems[0] and "aarch64" in problems[0]


def test_missing_cpu_feature_is_named() -> None:
    target = HOST.model_copy(update={"cpu_flags": ["avx", "sse4_2"], "cpu_model": "Old"})
    (problem,) = check_compatible(HOST, target)
    assert "avx2" in problem and "Old" in problem


def test_extra_cpu_features_on_target_are_fine() -> None:
    assert check_compatible(HOST, HOST.model_copy(update={"cpu_flags": [*HOST.cpu_flags, "avx512f"]})) == []


def test_older_criu_on_target_is_refused() -> None:
    (problem,) = check_compatible(HOST.model_copy(update={"criu_version": "4.3"}), HOST)
    assert "older" in problem


@pytest.mark.parametrize("text,expected",
                         [("Version: 4.2.1\nGitID: x", "4.2.1"), ("Version: 3.17\n", "3.17"), ("", None)])
def test_parse_criu_version(text: str, expected: str | None) -> None:
    assert criu.parse_version(text) == expected


def test_version_gate() -> None:
    assert criu.version_ok("4.2.1") and criu.version_ok("4.10") and not criu.version_ok("4.1.1")
    assert not criu.version_ok("3.17.1")


def test_explain_skips_benign_lines_and_names_io_uring() -> None:
    log = (
        "(00.01) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted\n"
        "(00.02) Error (criu/tun.c:87): tun: Unable to create tun: No such file or directory\n"
        "(00.20) Error (criu/files-ext.c:96): Can't dump file 9 of that type [0x0] (anon_inode:[io_uring])\n"
        "(00.30) Error (criu/cr-dump.c:2100): Dumping FAILED.\n"
    )
    problem, fix = criu.explain(log)
    assert "io_uring" in problem and "RLIMIT" not in problem and "tun" not in problem
    assert "warmstart run" in fix


def test_explain_unknown_error_keeps_criu_words() -> None:
    problem, _ = criu.explain("(0.1) Error (criu/x.c:1): something odd happened\n")
    assert problem == "something odd happened"


def test_dump_and_restore_options() -> None:
    d = criu.dump_args(42, Path("/i"), Path("/l"))
    # --link-remap only ever applies in /dev/shm (shm.used_by refuses such files elsewhere before the dump).
    assert d[:3] == ["dump", "--tree", "42"] and "--leave-running" in d and "--link-remap" in d
    assert "--action-script" not in d
    assert criu.dump_args(42, Path("/i"), Path("/l"), "/hook.sh")[-2:] == ["--action-script", "/hook.sh"]
    r = criu.restore_args(Path("/i"), Path("/w"), Path("/l"), Path("/p"))
    assert "--restore-detached" in r and "--tcp-close" in r and "--link-remap" not in r


@pytest.mark.parametrize(("setting", "replicas", "huge"), [("", 1, True), ("", 2, True), ("auto", 3, True),
                                                       ("1", 2, True), ("0", 1, False)])
def test_huge_pages_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, setting: str, replicas: int,
                            huge: bool) -> None:
    monkeypatch.setenv("WARMSTART_HOME", str(tmp_path))
    monkeypatch.setenv("WARMSTART_HUGE_PAGES", setting)
    assert criu.huge_pages(replicas) is huge  # several, with nothing learnt yet: huge pages first
    assert criu.restore_env(huge)["CRIU_PAGE_READ_THP"] == ("1" if huge else "0")


def test_replicas_page_size_learnt_from_this_hosts_restores(monkeypatch: pytest.MonkeyPatch,
                                                            tmp_path: Path) -> None:
    monkeypatch.setenv("WARMSTART_HOME", str(tmp_path))
    assert pagefill.choose(2) is True  # nothing learnt: huge pages
    pagefill.record(2, True, 3.0, 1.5)  # 2 s/GB in huge pages
    assert pagefill.choose(2) is False  # the other size has not been tried
    pagefill.record(2, False, 1.2, 1.5)  # 0.8 s/GB in 4 KiB pages
    choices = []
    for _ in range(6):
        choices.append(pagefill.choose(2))
        pagefill.record(2, choices[-1], 3.0 if choices[-1] else 1.2, 1.5)
    assert choices.count(False) == 5 and choices.count(True) == 1  # the faster, and the other once in six
    assert pagefill.choose(1) is True  # one replica: always huge pages
    assert oct((tmp_path / "host" / "pagefill.json").stat().st_mode & 0o777) == "0o600"
    (tmp_path / "host" / "pagefill.json").write_text("not json")
    assert pagefill.choose(2) is True  # a damaged record is forgotten, not fatal
    (tmp_path / "not-a-dir").write_text("")
    monkeypatch.setenv("WARMSTART_HOME", str(tmp_path / "not-a-dir"))
    pagefill.record(2, True, 1.0, 1.0)  # after a restore that worked: a home it cannot write is not an error
    assert pagefill.pick([1.0, 5.0, 1.0], [2.0], 0) is True and pagefill.pick([3.0], [2.0, 2.5], 5) is True


def test_seccomp_program_refuses_exactly_io_uring() -> None:
    prog = seccomp.program()
    # A tiny BPF interpreter over the program's three instruction kinds.
    def run(nr: int) -> int:
        pc, acc = 0, 0
        while True:
            code, jt, jf, k = prog[pc]
            if code == 0x20:
                acc = nr
                pc += 1
            elif code == 0x15:
                pc += 1 + (jt if acc == k else jf)
            else:
                return k
    for nr in seccomp.IO_URING_SYSCALLS:
        assert run(nr) == 0x00050000 | 38  # ERRNO(ENOSYS)
    for nr in (0, 1, 59, 202, 424, 428, 435):
        assert run(nr) == 0x7FFF0000  # ALLOW


@pytest.mark.parametrize("name", ["", "Upper", "-x", "a" * 64, "a/b", "a b"])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(UsageError):
        paths.check_name(name)


def _fake_artifact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("WARMSTART_HOME", str(tmp_path / "home"))
    staging = store.stage(tmp_path / "art")
    (staging.images / "pages-1.img").write_bytes(b"x" * 5000)
    (staging.images / "core-1.img").write_bytes(b"core")
    m = Manifest(warmstart_version="t", worker=WorkerIdentity(pid=1, command=["x"]), host=HOST,
                 criu=CriuSettings(version="4.2.1", dump_args=[]))
    m.files = store.checksum(staging)
    store.commit(staging, m)
    return tmp_path / "art"


def test_artifact_roundtrip_and_no_partial_left(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    art = _fake_artifact(tmp_path, monkeypatch)
    m = store.load(art)
    assert store.verify(art, m) == 5004
    assert store.verify(art, m) == 0  # remembered: untouched files are not hashed again
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("damage,words", [
    (lambda a: (a / "images/pages-1.img").write_bytes(b"y" * 5000), "does not match its checksum"),
    (lambda a: (a / "images/pages-1.img").write_bytes(b"x" * 10), "truncated"),
    (lambda a: (a / "images/core-1.img").unlink(), "missing"),
    (lambda a: (a / "images/extra.img").write_bytes(b"!"), "unexpected file"),
    (lambda a: (a / "manifest.json").write_text("{not json"), "corrupt"),
    (lambda a: (a / "manifest.json").unlink(), "not a warmstart artifact"),
])
def test_damaged_artifacts_are_refused_naming_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage,
                                                        words) -> None:
    art = _fake_artifact(tmp_path, monkeypatch)
    store.verify(art, store.load(art))  # cached as good first: damage must still be caught
    damage(art)
    with pytest.raises(ArtifactError) as e:
        store.verify(art, store.load(art))
    assert words in str(e.value)


def test_future_schema_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    art = _fake_artifact(tmp_path, monkeypatch)
    raw = json.loads((art / "manifest.json").read_text())
    raw["schema_version"] = 99
    (art / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match="schema version 99"):
        store.load(art)


def test_existing_output_is_refused(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    with pytest.raises(UsageError, match="already exists"):
        store.stage(tmp_path / "out")


@pytest.mark.parametrize(("mem_kb", "want_mb"), [(24 << 20, 16384), (128 << 20, 32768), (None, 16384)])
def test_the_image_cache_holds_a_quarter_of_memory_and_at_least_16_gib(tmp_path: Path, mem_kb: int | None,
                                                                       want_mb: int) -> None:
    from warmstart import config

    meminfo = tmp_path / "meminfo"
    if mem_kb is not None:
        meminfo.write_text(f"MemTotal:       {mem_kb} kB\nMemFree:        1 kB\n")
    assert config.default_image_cache_mb(meminfo) == want_mb
