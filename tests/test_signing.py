"""Signed, private artifacts (artifact/signing.py, artifact/store.py): with real CRIU through the CLI, and the
key handling on its own."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

from conftest import cli, http_get, one_error_line


def _replicas() -> list[dict]:
    return [w for w in json.loads(cli("ps", "--json").stdout)["workers"] if w["kind"] == "replica"]


@pytest.mark.criu
@pytest.mark.slow
def test_an_artifact_is_signed_private_and_verified(counter_artifact: Path) -> None:
    assert (counter_artifact / "manifest.sig").is_file()
    for p in [counter_artifact, *counter_artifact.rglob("*")]:
        mode = stat.S_IMODE(p.lstat().st_mode)
        assert mode == (0o700 if p.is_dir() else 0o600), (p, oct(mode))
    r = cli("inspect", str(counter_artifact), "--verify")
    assert r.returncode == 0, r.stderr
    assert "signature valid, by trusted key" in " ".join(r.stdout.split())


@pytest.mark.criu
@pytest.mark.slow
def test_memory_rewritten_with_matching_checksums_is_refused(counter_artifact: Path) -> None:
    """The attack the checksums alone did not stop: new bytes in a pages image and its SHA-256 put in the manifest."""
    m = json.loads((counter_artifact / "manifest.json").read_text())
    entry = next(f for f in m["files"] if f["path"].startswith("images/pages-") and f["chunk_bytes"] == 0)
    pages = counter_artifact / entry["path"]
    data = bytearray(pages.read_bytes())
    data[100] ^= 0xFF
    pages.write_bytes(bytes(data))
    entry["sha256"] = hashlib.sha256(data).hexdigest()
    (counter_artifact / "manifest.json").write_text(json.dumps(m))
    one_error_line(cli("restore", str(counter_artifact)), 4, "manifest.json", "does not match its signature")
    assert _replicas() == []


@pytest.mark.criu
@pytest.mark.slow
def test_an_unsigned_artifact_needs_the_expert_flag(counter_artifact: Path) -> None:
    (counter_artifact / "manifest.sig").unlink()
    one_error_line(cli("restore", str(counter_artifact)), 4, "not signed", "--insecure-unsigned")
    assert _replicas() == []
    r = cli("restore", str(counter_artifact), "--insecure-unsigned", "--json")
    assert r.returncode == 0, r.stderr
    (rep,) = json.loads(r.stdout)["replicas"]
    assert http_get(rep["port"])


@pytest.mark.criu
@pytest.mark.slow
def test_another_hosts_key_is_trusted_only_when_named(counter_artifact: Path, tmp_path: Path) -> None:
    here = os.environ["WARMSTART_KEY_DIR"]
    elsewhere = {"WARMSTART_KEY_DIR": str(tmp_path / "other-node-keys")}
    one_error_line(cli("restore", str(counter_artifact), env=elsewhere), 4, "does not trust", "WARMSTART_TRUSTED_KEYS")
    shared = {"WARMSTART_TRUSTED_KEYS": f"{here}/artifact.pub", "WARMSTART_ENCRYPTION_KEY": f"{here}/images.key"}
    r = cli("restore", str(counter_artifact), "--json", env={**elsewhere, **shared})
    assert r.returncode == 0, r.stderr


def test_the_key_is_made_private_and_a_planted_one_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from warmstart.artifact import signing
    from warmstart.errors import EnvironmentProblem

    keys = tmp_path / "keys"
    monkeypatch.setenv("WARMSTART_KEY_DIR", str(keys))
    sig = signing.sign(b"manifest")
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    assert stat.S_IMODE((keys / "artifact.key").stat().st_mode) == 0o600
    assert json.loads(sig)["key"] in signing.trusted_keys()

    (keys / "artifact.key").chmod(0o644)  # readable by others: no longer a secret
    with pytest.raises(EnvironmentProblem, match="not a private file"):
        signing.signing_key()
    (keys / "artifact.key").unlink()
    (keys / "artifact.key").symlink_to(tmp_path / "planted")
    with pytest.raises(EnvironmentProblem, match="cannot read the signing key"):
        signing.signing_key()


def test_a_key_mounted_as_a_kubernetes_secret_signs_and_is_trusted(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A Secret volume's files are symlinks into a timestamped directory; the one configured path is resolved."""
    from warmstart.artifact import signing

    monkeypatch.setenv("WARMSTART_KEY_DIR", str(tmp_path / "own"))
    made = signing.signing_key()  # any host's key, as an administrator would put it in the Secret
    secret = tmp_path / "secret"
    (secret / "..2026_12_01").mkdir(parents=True)
    real = secret / "..2026_12_01" / "artifact.key"
    real.write_bytes((tmp_path / "own" / "artifact.key").read_bytes())
    real.chmod(0o400)
    (secret / "artifact.key").symlink_to(real)
    monkeypatch.setenv("WARMSTART_KEY_DIR", str(tmp_path / "node"))
    monkeypatch.setenv("WARMSTART_SIGNING_KEY", str(secret / "artifact.key"))
    sig = json.loads(signing.sign(b"m"))
    assert sig["key"] == signing.fingerprint(made.public_key()) and sig["key"] in signing.trusted_keys()
    assert not (tmp_path / "node").exists()  # no key of its own made beside the configured one
