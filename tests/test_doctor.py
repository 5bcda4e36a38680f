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
