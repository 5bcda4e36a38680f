"""Image transforms decided per image from what they cost and save on the host (image/plan.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import cli
from warmstart.image import plan

# 1.4 GB that zlib keeps a quarter of, at 200 MB/s a core, inflating at 600 MB/s a core (the vLLM CPU image's
# shape), on a disk of 1.5 GB/s.
VLLM_LIKE = plan.Samples(raw=1_400_000_000, stored=350_000_000, zlib_mbps=200, inflate_mbps=600)


def test_two_cores_store_it_raw_and_sixteen_compress_it() -> None:
    two = plan.compression("pages-1.img", VLLM_LIKE, plan.Host(threads=2, disk_mbps=1500), sealing=True)
    assert not two.applied and "2 cores" in two.reason and "disk 1500 MB/s" in two.reason
    sixteen = plan.compression("pages-1.img", VLLM_LIKE, plan.Host(threads=16, disk_mbps=1500), sealing=True)
    assert sixteen.applied and sixteen.image == "pages-1.img"


def test_without_a_sealing_pass_compression_would_cost_the_checkpoint_a_pass() -> None:
    got = plan.compression("pages-1.img", VLLM_LIKE, plan.Host(threads=16, disk_mbps=1500), sealing=False)
    assert not got.applied and "the checkpoint +" in got.reason


def test_what_does_not_shrink_is_never_compressed() -> None:
    weights = plan.Samples(raw=16_000_000_000, stored=13_000_000_000, zlib_mbps=24, inflate_mbps=300)
    assert not plan.compression("pages-1.img", weights, plan.Host(threads=16, disk_mbps=1500), sealing=True).applied


@pytest.mark.parametrize("zeros, later, applied", [(0.6, True, True), (0.3, True, False), (0.6, False, False)])
def test_zero_pages_are_cut_out_where_they_are_half_the_image(tmp_path: Path, zeros: float, later: bool,
                                                              applied: bool) -> None:
    pages = 4096
    n_zero = int(pages * zeros)
    (tmp_path / "pages-1.img").write_bytes(bytes(n_zero * 4096) + os.urandom((pages - n_zero) * 4096))
    got = plan.zero_pages(tmp_path, later_pass=later)
    assert got.applied == applied and f"{zeros:.0%} zeros" in got.reason


@pytest.mark.criu
@pytest.mark.slow
def test_the_manifest_says_what_was_decided_and_inspect_shows_it(counter_artifact: Path) -> None:
    m = json.loads((counter_artifact / "manifest.json").read_text())
    zero = [t for t in m["transforms"] if t["transform"] == "zero_pages"]
    assert len(zero) == 1 and "zeros" in zero[0]["reason"]
    shown = cli("inspect", str(counter_artifact)).stdout
    assert "zero_pages" in shown and ("applied" in shown or "skipped" in shown)


def test_where_no_ratio_could_pay_the_image_is_not_sampled() -> None:
    two, sixteen = plan.Host(threads=2, disk_mbps=1500), plan.Host(threads=16, disk_mbps=1500)
    skip = plan.cannot_pay("pages-1.img", VLLM_LIKE.raw, VLLM_LIKE.zlib_mbps, VLLM_LIKE.inflate_mbps, two, True)
    assert skip is not None and not skip.applied and "not sampled" in skip.reason and "2 cores" in skip.reason
    assert plan.cannot_pay("pages-1.img", VLLM_LIKE.raw, VLLM_LIKE.zlib_mbps, VLLM_LIKE.inflate_mbps, sixteen,
                           True) is None  # sixteen cores: the ratio decides (it compresses: above)
