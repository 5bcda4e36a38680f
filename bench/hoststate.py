"""What the host's page cache holds right now, recorded by the benchmarks beside their figures."""

from __future__ import annotations

from pathlib import Path


def dirty_mb(meminfo: Path = Path("/proc/meminfo")) -> int:
    """The page cache's dirty and writeback pages now, in MB: what a dump would wait behind."""
    fields = dict(line.split(":", 1) for line in meminfo.read_text().splitlines())
    return sum(int(fields[k].split()[0]) for k in ("Dirty", "Writeback")) // 1024
