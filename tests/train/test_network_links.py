"""Links between nodes: the LINK values for Ethernet and InfiniBand, and a multi-node nccl-test record in bench.

The manifest's record of the socket interfaces is tested in tests/env/records/test_manifest.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from env.machine.links import NETWORK_LINKS
from train.bench import BenchError
from train.bench.bandwidth import LINK_ASSUMPTIONS, assumed_bandwidth, bandwidth_from_nccl_json, resolve_bandwidth
from train.bench.comm import CommPlan, add_prediction

INTER_NODE = ("eth10", "eth25", "eth100", "ib-hdr", "ib-ndr")


@pytest.mark.parametrize("name", INTER_NODE)
def test_each_network_link_is_a_link_value_below_its_line_rate(name: str) -> None:
    bandwidth = assumed_bandwidth(name)
    assert not bandwidth.measured and f"--link {name}" in bandwidth.source
    assert 0 < bandwidth.busbw_gbps < NETWORK_LINKS[name].gbit_per_s / 8  # GB/s, a share of the line rate


def test_faster_networks_predict_faster_steps_and_all_are_slower_than_pcie_p2p() -> None:
    busbw = [LINK_ASSUMPTIONS[name][1] for name in INTER_NODE]
    assert busbw == sorted(busbw) and len(set(busbw)) == len(busbw)
    plan = CommPlan.for_run(10_000_000, "ddp", "fp32", "none", accum=1)
    seconds = [plan.seconds(2, value) for value in busbw]
    assert seconds == sorted(seconds, reverse=True)
    assert LINK_ASSUMPTIONS["eth100"][1] < LINK_ASSUMPTIONS["pcie4-p2p"][1]


def test_an_unknown_link_names_the_network_ones() -> None:
    with pytest.raises(BenchError, match="ib-ndr"):
        assumed_bandwidth("ib-xdr")


def _record(path: Path, world: int, nodes: int | None, busbw: float) -> Path:
    record = {"world_size": world, "ops": {"all_reduce": {"large_busbw": busbw, "peak_busbw": busbw * 1.1}}}
    if nodes is not None:
        record["nodes"] = nodes
    path.write_text(json.dumps(record))
    return path


def test_a_multi_node_record_gives_the_measured_inter_node_busbw_to_the_prediction(tmp_path: Path) -> None:
    path = _record(tmp_path / "two-nodes.json", world=16, nodes=2, busbw=11.5)
    bandwidth = resolve_bandwidth(str(path), "", "cuda", 8)  # a measurement wins over the links and any LINK
    assert bandwidth.measured and bandwidth.busbw_gbps == 11.5
    assert "16 ranks on 2 nodes: inter-node" in bandwidth.source
    one_node = bandwidth_from_nccl_json(_record(tmp_path / "one-node.json", world=8, nodes=1, busbw=11.5))
    assert "inter-node" not in one_node.source
    older = bandwidth_from_nccl_json(_record(tmp_path / "older.json", world=8, nodes=None, busbw=11.5))
    assert "inter-node" not in older.source  # records written before "nodes" existed: one node

    rows = [{"gpus": 1, "step_ms": 100.0, "samples_per_sec": 320.0}, {"gpus": 2, "step_ms": 0.0, "samples_per_sec": 0}]
    plan = CommPlan.for_run(50_000_000, "ddp", "fp32", "none", accum=1)
    add_prediction(rows, plan, bandwidth.busbw_gbps)
    comm_s = 2 * (2 - 1) / 2 * 50_000_000 * 4 / 11.5e9  # ring all-reduce of fp32 gradients at that busbw
    assert rows[1]["pred_comm_ms"] == pytest.approx(comm_s * 1000)
    assert rows[1]["pred_speedup"] == pytest.approx(2 * 100.0 / (100.0 + comm_s * 1000))
