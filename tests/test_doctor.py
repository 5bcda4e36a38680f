"""`warmstart doctor` on this host: every required check passes where CRIU works, and a missing CRIU is one
FAIL row and one error line (exit 3)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import cli, one_error_line


@pytest.mark.criu
def test_doctor_passes_where_checkpoints_work(need_criu, home: Path, tmp_path: Path) -> None:
    r = cli("doctor", "--artifacts", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Looks good" in r.stdout and "FAIL" not in r.stdout


def test_doctor_names_a_missing_criu_and_its_fix(home: Path) -> None:
    r = cli("doctor", env={"WARMSTART_CRIU": "/nonexistent/criu"})
    one_error_line(r, 3, "check(s) failed", "CRIU")
    assert "FAIL" in r.stdout and "scripts/setup.sh" in " ".join(r.stdout.split())


def _virtio(root: Path, name: str, device: str, features: str) -> None:
    d = root / name
    d.mkdir(parents=True)
    (d / "device").write_text(device + "\n")
    (d / "features").write_text(features + "\n")


def test_free_page_reporting_is_read_from_the_balloons_feature_bits(tmp_path: Path) -> None:
    """Bit 5 of a virtio balloon's (device 0x0005) features; other devices' bits and unreadable entries count
    for nothing."""
    from warmstart.doctor import free_page_reporting

    assert not free_page_reporting(tmp_path / "missing")
    _virtio(tmp_path, "virtio1", "0x0002", "0010011001")  # a block device with bit 5 set
    (tmp_path / "virtio9").mkdir()  # no device file
    assert not free_page_reporting(tmp_path)
    _virtio(tmp_path, "virtio0", "0x0005", "0110000000")  # stats and deflate-on-OOM, no reporting
    assert not free_page_reporting(tmp_path)
    _virtio(tmp_path, "virtio5", "0x0005", "0110010100")
    assert free_page_reporting(tmp_path)
