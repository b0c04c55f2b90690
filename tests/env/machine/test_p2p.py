"""The P2P decision on recorded NVML snapshots: disable only when a pair cannot do P2P, the user always wins."""

from __future__ import annotations

import copy

import pytest
import torch

from env.machine.nvml import GpuInfo, PairInfo, Snapshot
from env.machine.p2p import (
    DISABLE_VAR,
    LEVEL_VAR,
    apply_p2p_decision,
    copy_intact,
    decide_p2p,
    p2p_mode,
    pcie_link_state,
    torch_copy_check,
    visible_gpu_indices,
)
from tests.helpers.nvml import box


def copies_always(intact: bool, calls: list[tuple[int, int]] | None = None):
    def verify(src: int, dst: int) -> bool:
        if calls is not None:
            calls.append((src, dst))
        return intact

    return verify


def test_3x4090_pcie_disables_p2p_and_says_why():
    decision = decide_p2p(box("box_3x4090_pcie"), {}, None)
    assert decision.disable is True
    assert decision.source == "measured"
    assert "CHIPSET_NOT_SUPPORTED" in decision.reason and f"{DISABLE_VAR}=1" in decision.reason
    assert len(decision.pairs) == 3 and not any(p["usable"] for p in decision.pairs)
    environ: dict[str, str] = {}
    assert apply_p2p_decision(decision, environ) == {DISABLE_VAR: "1"}
    assert environ == {DISABLE_VAR: "1"}


def test_pairs_nvml_rejects_are_never_copied():
    calls: list[tuple[int, int]] = []
    decide_p2p(box("box_3x4090_pcie"), {}, copies_always(True, calls))
    assert calls == []  # a copy over a pair NVML rejects can hang the box


@pytest.mark.parametrize("name", ["box_8xh100_nvlink", "box_2x3090_nvlink"])
def test_nvlink_boxes_keep_p2p(name: str):
    snapshot = box(name)
    calls: list[tuple[int, int]] = []
    decision = decide_p2p(snapshot, {}, copies_always(True, calls))
    assert decision.disable is False and decision.source == "measured"
    assert "copies verified" in decision.reason
    assert all(p["copy"] == "verified" and p["topology"] == "NVLINK" for p in decision.pairs)
    assert len(calls) == 2 * len(snapshot.pairs)  # both directions of every pair
    environ: dict[str, str] = {}
    assert apply_p2p_decision(decision, environ) == {}
    assert environ == {}


def test_mixed_4090_and_3090_disables_p2p():
    # Different architectures on different root ports: NVML reports no P2P, and NCCL_P2P_DISABLE is
    # global, so with no pair able to use P2P there is nothing to lose by turning it off.
    decision = decide_p2p(box("box_mixed"), {}, copies_always(True))
    assert decision.disable is True
    assert "NOT_SUPPORTED" in decision.reason
    assert decision.pairs[0]["copy"].startswith("skipped")


def test_a_copy_that_delivers_zeros_disables_p2p_even_when_nvml_says_ok():
    def zeros_between_devices(src: int, dst: int) -> bool:
        return copy_intact(torch.zeros_like, "cpu", count=1024)

    decision = decide_p2p(box("box_2x3090_nvlink"), {}, zeros_between_devices)
    assert decision.disable is True
    assert "wrong bytes" in decision.reason
    assert decision.pairs[0]["copy"].startswith("FAILED")


def test_a_copy_that_raises_counts_as_broken():
    def raising(src: int, dst: int) -> bool:
        raise RuntimeError("CUDA error: peer access is not supported between these two devices")

    assert decide_p2p(box("box_2x3090_nvlink"), {}, raising).disable is True


def test_copy_intact_compares_every_element():
    assert copy_intact(lambda t: t.clone(), "cpu", count=4096)

    def one_wrong(tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        out[-1] += 1
        return out

    assert not copy_intact(one_wrong, "cpu", count=4096)


@pytest.mark.parametrize(
    ("fixture", "value", "disable"), [("box_3x4090_pcie", "0", False), ("box_8xh100_nvlink", "1", True)]
)
def test_the_users_own_setting_wins_and_is_reported(fixture: str, value: str, disable: bool):
    environ = {DISABLE_VAR: value}
    calls: list[tuple[int, int]] = []
    decision = decide_p2p(box(fixture), environ, copies_always(False, calls))
    assert decision.source == "user" and decision.disable is disable
    assert f"{DISABLE_VAR}={value}" in decision.reason
    assert calls == [] and decision.pairs  # the facts are still reported
    assert apply_p2p_decision(decision, environ) == {}
    assert environ == {DISABLE_VAR: value}


def test_missing_nvml_is_one_line_and_no_decision():
    snapshot = Snapshot(error="NVML unavailable: NVML Shared Library Not Found")
    decision = decide_p2p(snapshot, {}, copies_always(True))
    assert decision.disable is None and decision.source == "no-gpu"
    assert "NVML Shared Library Not Found" in decision.reason and "\n" not in decision.reason
    environ: dict[str, str] = {}
    assert apply_p2p_decision(decision, environ) == {} and environ == {}


def test_one_visible_gpu_needs_no_p2p():
    decision = decide_p2p(box("box_3x4090_pcie"), {"CUDA_VISIBLE_DEVICES": "2"}, None)
    assert decision.disable is None and decision.source == "single-gpu"


def test_visible_devices_narrow_and_reorder_the_gpus():
    snapshot = box("box_3x4090_pcie")
    assert visible_gpu_indices(snapshot, {}) == [0, 1, 2]
    assert visible_gpu_indices(snapshot, {"CUDA_VISIBLE_DEVICES": "2,0"}) == [2, 0]
    assert visible_gpu_indices(snapshot, {"CUDA_VISIBLE_DEVICES": snapshot.gpus[1].uuid[:12]}) == [1]
    assert visible_gpu_indices(snapshot, {"CUDA_VISIBLE_DEVICES": "1,7,2"}) == [1]  # CUDA stops at a bad entry
    assert visible_gpu_indices(snapshot, {"CUDA_VISIBLE_DEVICES": "-1"}) == []


def test_copy_check_gets_cuda_ordinals_of_the_visible_gpus():
    calls: list[tuple[int, int]] = []
    decide_p2p(box("box_8xh100_nvlink"), {"CUDA_VISIBLE_DEVICES": "6,7"}, copies_always(True, calls))
    assert sorted(calls) == [(0, 1), (1, 0)]


def four_3090s_two_bridges() -> Snapshot:
    """Two NVLink-bridged 3090 pairs (0-1, 2-3) whose PCIe pairs cannot do P2P."""
    pair = box("box_2x3090_nvlink")
    gpus = [copy.deepcopy(pair.gpus[i % 2]) for i in range(4)]
    for index, gpu in enumerate(gpus):
        gpu.index, gpu.uuid = index, f"GPU-{index}"
    pairs = [
        PairInfo(a, b, "OK", "OK", "NVLINK", 4)
        if (a, b) in ((0, 1), (2, 3))
        else PairInfo(a, b, "CHIPSET_NOT_SUPPORTED", "CHIPSET_NOT_SUPPORTED", "NODE")
        for a in range(4)
        for b in range(a + 1, 4)
    ]
    return Snapshot(pair.driver_version, pair.cuda_driver_version, gpus, pairs)


def test_nvlink_pairs_beside_broken_pcie_pairs_keep_p2p_on_nvlink_only():
    decision = decide_p2p(four_3090s_two_bridges(), {}, copies_always(True))
    assert decision.disable is False and decision.level == "NVL"
    environ: dict[str, str] = {}
    assert apply_p2p_decision(decision, environ) == {LEVEL_VAR: "NVL"}
    assert p2p_mode(environ) == "nvlink-only"
    users_level = {LEVEL_VAR: "SYS"}
    apply_p2p_decision(decision, users_level)
    assert users_level == {LEVEL_VAR: "SYS"}


def test_a_broken_nvlink_pair_disables_p2p_altogether():
    def nvlink_pair_01_broken(src: int, dst: int) -> bool:
        return {src, dst} != {0, 1}

    assert decide_p2p(four_3090s_two_bridges(), {}, nvlink_pair_01_broken).disable is True


@pytest.mark.parametrize(
    ("gen", "width", "util", "state"),
    [
        ((4, 4), (16, 16), 90, "full"),
        ((1, 4), (16, 16), 0, "idle"),
        ((1, 4), (16, 16), None, "idle"),
        ((2, 4), (16, 16), 95, "degraded"),
        ((4, 4), (8, 16), 0, "degraded"),
        ((None, 4), (16, 16), 0, "unknown"),
    ],
)
def test_pcie_link_state_tells_idle_from_degraded(gen, width, util, state):
    gpu = GpuInfo(
        index=0,
        name="x",
        pcie_gen_current=gen[0],
        pcie_gen_max=gen[1],
        pcie_width_current=width[0],
        pcie_width_max=width[1],
        utilization_pct=util,
    )
    assert pcie_link_state(gpu) == state


def test_p2p_mode_follows_the_environment():
    assert p2p_mode({}) == "on"
    assert p2p_mode({DISABLE_VAR: "0"}) == "on"
    assert p2p_mode({DISABLE_VAR: "1"}) == "off"
    assert p2p_mode({LEVEL_VAR: "nvl"}) == "nvlink-only"


def test_decision_round_trips_for_the_workers():
    decision = decide_p2p(box("box_3x4090_pcie"), {}, None)
    assert type(decision).from_dict(decision.to_dict()) == decision


@pytest.mark.cuda
def test_real_peer_copy_arrives_intact():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    assert torch_copy_check(0, 1) and torch_copy_check(1, 0)
