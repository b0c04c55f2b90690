"""Where the prediction's bus bandwidth comes from: a `make nccl-test` record, NVML's link facts, or a named
assumption (--link)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from env.common.cli import load_json
from env.machine.links import LINK_KINDS, NETWORK_LINKS, PCIE_LANE_GBPS, expected_busbw
from env.machine.nvml import read_snapshot
from env.machine.p2p import apply_p2p_decision, decide_p2p, p2p_mode, visible_gpu_indices
from train.bench import BenchError


@dataclass(frozen=True)
class Bandwidth:
    busbw_gbps: float
    source: str  # in words, printed under the table
    measured: bool


def _pcie_busbw(generation: int, kind: str) -> float:
    """What NCCL reaches on a x16 link of this generation, by env/machine/links.py's shares."""
    return PCIE_LANE_GBPS[generation] * 16 * LINK_KINDS[kind].efficiency


# Named assumptions for --link: large-message all-reduce busbw in GB/s.
LINK_ASSUMPTIONS: dict[str, tuple[str, float]] = {
    "pcie4-host": ("PCIe 4.0 x16 without P2P (through host memory)", _pcie_busbw(4, "pcie_host")),
    "pcie4-p2p": ("PCIe 4.0 x16 with P2P", _pcie_busbw(4, "pcie_p2p")),
    "pcie5-host": ("PCIe 5.0 x16 without P2P (through host memory)", _pcie_busbw(5, "pcie_host")),
    "pcie5-p2p": ("PCIe 5.0 x16 with P2P", _pcie_busbw(5, "pcie_p2p")),
    "nvlink4": ("NVLink 4, 18 links (H100/H200 SXM)", 18 * 25.0 * LINK_KINDS["nvlink"].efficiency),
    "cpu-gloo": ("gloo between processes on one host (rough)", 2.0),
    # Between nodes (env/machine/links.py): the ring's slowest hop once the job spans nodes.
    **{name: (link.label, link.busbw_gbps) for name, link in NETWORK_LINKS.items()},
}
# Without a measurement or NVML's link facts: the reference box's link on GPUs, gloo on the CPU.
DEFAULT_LINK = {"cuda": "pcie4-host", "cpu": "cpu-gloo"}


def assumed_bandwidth(link: str) -> Bandwidth:
    if link not in LINK_ASSUMPTIONS:
        raise BenchError(f"--link {link} is not one of {', '.join(LINK_ASSUMPTIONS)}; or measure it with --nccl-json")
    label, busbw = LINK_ASSUMPTIONS[link]
    return Bandwidth(busbw, f"ASSUMED {busbw:.1f} GB/s for {label} (--link {link}; measure it with --nccl-json)", False)


def bandwidth_from_nccl_json(path: Path) -> Bandwidth:
    """The large-message all_reduce busbw of a make nccl-test JSON record."""
    fix = f"rerun make nccl-test GPUS=2 (or more) OPS=all_reduce JSON={path}"
    record = load_json(path, "--nccl-json", fix, BenchError)
    ops = record.get("ops") if isinstance(record, dict) else None
    op = ops.get("all_reduce") if isinstance(ops, dict) else None
    op = op if isinstance(op, dict) else {}
    busbw = op.get("large_busbw") or op.get("peak_busbw")
    if not isinstance(busbw, (int, float)) or isinstance(busbw, bool) or not math.isfinite(busbw) or busbw <= 0:
        raise BenchError(
            f"--nccl-json {path} holds no all_reduce bus bandwidth (a 1-rank run crosses no link, or it is not "
            f"a make nccl-test record); {fix}"
        )
    world = record.get("world_size", "?")
    nodes = record.get("nodes", 1)
    # Across nodes the network is the ring's slowest hop: that busbw is what a job spanning those nodes gets.
    where = f"{world} ranks on {nodes} nodes: inter-node" if isinstance(nodes, int) and nodes > 1 else f"{world} ranks"
    return Bandwidth(float(busbw), f"MEASURED {busbw:.1f} GB/s all_reduce busbw ({where}) from {path}", True)


def bandwidth_from_links(gpu_count: int) -> Bandwidth | None:
    """What NVML's link facts say a ring over the first gpu_count GPUs should reach; None when unknown."""

    snapshot = read_snapshot()
    if not snapshot.ok:
        return None
    environ = dict(os.environ)
    apply_p2p_decision(decide_p2p(snapshot, environ, None), environ)
    gpus = visible_gpu_indices(snapshot, environ)[:gpu_count]
    expectation = expected_busbw(snapshot, gpus, p2p_mode(environ))
    if expectation.busbw_gbps is None:
        return None
    return Bandwidth(
        expectation.busbw_gbps,
        f"EXPECTED {expectation.busbw_gbps:.1f} GB/s for {expectation.link} (NVML facts, env/machine/links.py; "
        "measure it with --nccl-json)",
        False,
    )


def resolve_bandwidth(nccl_json: str, link: str, device_type: str, max_count: int) -> Bandwidth:
    if nccl_json:
        return bandwidth_from_nccl_json(Path(nccl_json))
    if link:
        return assumed_bandwidth(link)
    from_links = bandwidth_from_links(max_count) if device_type == "cuda" and max_count > 1 else None
    return from_links or assumed_bandwidth(DEFAULT_LINK[device_type])
