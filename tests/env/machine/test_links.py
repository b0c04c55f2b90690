"""The links between GPUs (env/machine/links.py): the bus bandwidth a box should reach, and nccl-test's verdict."""

from __future__ import annotations

import pytest

from env.machine.links import (
    LINK_KINDS,
    NVLINK_BY_COMPUTE_CAPABILITY,
    PCIE_LANE_GBPS,
    Expectation,
    expected_busbw,
    judge,
)
from env.machine.nvml import Snapshot
from tests.helpers.nvml import box


def test_nvlink_expectation_is_generation_rate_times_links():
    h100 = expected_busbw(box("box_8xh100_nvlink"), list(range(8)), "on")
    rate = NVLINK_BY_COMPUTE_CAPABILITY[(9, 0)].link_gbps
    assert h100.busbw_gbps == pytest.approx(18 * rate * LINK_KINDS["nvlink"].efficiency)
    assert "NVLink" in h100.link
    rtx3090 = expected_busbw(box("box_2x3090_nvlink"), [0, 1], "on")
    assert rtx3090.busbw_gbps == pytest.approx(4 * NVLINK_BY_COMPUTE_CAPABILITY[(8, 6)].link_gbps * 0.8)


def test_pcie_expectation_is_gen_times_width_with_a_lower_floor_without_p2p():
    snapshot = box("box_3x4090_pcie")
    for pair in snapshot.pairs:  # as if the board allowed P2P
        pair.p2p_read = pair.p2p_write = "OK"
    raw = PCIE_LANE_GBPS[4] * 16
    with_p2p = expected_busbw(snapshot, [0, 1, 2], "on")
    without = expected_busbw(snapshot, [0, 1, 2], "off")
    assert with_p2p.busbw_gbps == pytest.approx(raw * LINK_KINDS["pcie_p2p"].efficiency)
    assert without.busbw_gbps == pytest.approx(raw * LINK_KINDS["pcie_host"].efficiency)
    assert without.busbw_gbps < with_p2p.busbw_gbps
    # NVML's own "no P2P" means host memory even when P2P is not switched off
    assert expected_busbw(box("box_3x4090_pcie"), [0, 1, 2], "on").busbw_gbps == pytest.approx(without.busbw_gbps)


def test_nccl_p2p_disable_takes_nvlink_away_too():
    on = expected_busbw(box("box_2x3090_nvlink"), [0, 1], "on")
    off = expected_busbw(box("box_2x3090_nvlink"), [0, 1], "off")
    assert off.busbw_gbps < on.busbw_gbps and "without P2P" in off.link


def test_unknown_links_are_not_judged():
    assert expected_busbw(Snapshot(error="NVML unavailable"), [0, 1], "on").busbw_gbps is None
    assert expected_busbw(box("box_2x3090_nvlink"), [0], "on").busbw_gbps is None


@pytest.mark.parametrize(("share", "status"), [(1.1, "PASS"), (0.8, "PASS"), (0.5, "WARN"), (0.2, "FAIL")])
def test_verdict_bands(share: float, status: str):
    expectation = Expectation(100.0, link="NVLink")
    verdict = judge(wrong=0, measured_busbw=100.0 * share, expectation=expectation, min_busbw=None)
    assert verdict.status == status and verdict.expected_busbw == 100.0
    assert "100.0 GB/s expected" in verdict.reason and "NVLink" in verdict.reason
    assert verdict.exit_code == (1 if status == "FAIL" else 0)


def test_min_busbw_overrides_the_links():
    expectation = Expectation(100.0, link="NVLink")
    assert judge(wrong=0, measured_busbw=20.0, expectation=expectation, min_busbw=15.0).status == "PASS"
    failed = judge(wrong=0, measured_busbw=90.0, expectation=expectation, min_busbw=95.0)
    assert failed.status == "FAIL" and "--min-busbw" in failed.reason
    assert judge(wrong=0, measured_busbw=1.0, expectation=Expectation(None, why_not="gloo"), min_busbw=2.0).exit_code


def test_any_wrong_element_fails_whatever_the_bandwidth():
    verdict = judge(wrong=1, measured_busbw=1000.0, expectation=Expectation(100.0, link="x"), min_busbw=1.0)
    assert verdict.status == "FAIL" and "wrong" in verdict.reason


def test_without_an_expectation_correctness_decides():
    verdict = judge(wrong=0, measured_busbw=0.01, expectation=Expectation(None, why_not="no GPU"), min_busbw=None)
    assert verdict.status == "PASS" and "not judged: no GPU" in verdict.reason
