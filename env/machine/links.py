"""What bus bandwidth the links between GPUs should give, and the verdict on a measurement.

nccl-tests normalises bus bandwidth (busbw) so that, for every collective, it can be held
against the per-direction bandwidth of the slowest link the data crosses. So the figure a
set of GPUs should reach is set by its slowest pair: NVLink (the chip's per-link rate times
the links), PCIe with peer-to-peer (generation times width), or PCIe without P2P, where NCCL
stages every transfer through host memory and reaches a smaller share of the link.
The shares (efficiencies) are what healthy boxes reach with NCCL at large messages; they are
deliberately a little conservative, so that PASS means "as good as this kind of link gets".
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

from env.machine.nvml import GpuInfo, Snapshot

# Per lane, per direction, after line encoding (GB/s = 1e9 B/s).
PCIE_LANE_GBPS = {1: 0.25, 2: 0.5, 3: 0.985, 4: 1.969, 5: 3.938, 6: 7.563}


@dataclass(frozen=True)
class NvlinkRate:
    generation: int
    link_gbps: float  # per link, per direction


# The NVLink generation and per-link rate are fixed by the chip, so key them by compute capability:
# NVML's own NVLink version numbering has changed between drivers.
NVLINK_BY_COMPUTE_CAPABILITY = {
    (6, 0): NvlinkRate(1, 20.0),  # P100
    (7, 0): NvlinkRate(2, 25.0),  # V100
    (8, 0): NvlinkRate(3, 25.0),  # A100
    (8, 6): NvlinkRate(3, 14.0625),  # GA102 (RTX 3090, A6000, A40): the bridge runs NVLink 3 lanes slower
    (9, 0): NvlinkRate(4, 25.0),  # H100, H200
    (10, 0): NvlinkRate(5, 50.0),  # B200
}


@dataclass(frozen=True)
class LinkKind:
    label: str
    efficiency: float  # share of the raw per-direction rate that large-message busbw reaches on a healthy box


LINK_KINDS = {
    "nvlink": LinkKind("NVLink", 0.80),
    "pcie_p2p": LinkKind("PCIe with P2P", 0.70),
    "pcie_host": LinkKind("PCIe without P2P (through host memory)", 0.30),
}


@dataclass(frozen=True)
class NetworkLink:
    """The network between nodes: a ring across nodes crosses it, so it sets their busbw (per NIC per node)."""

    label: str
    gbit_per_s: float  # line rate per direction
    efficiency: float  # share of it that large-message all-reduce busbw reaches with NCCL

    @property
    def busbw_gbps(self) -> float:
        return self.gbit_per_s / 8 * self.efficiency


# NCCL over TCP sockets (Ethernet without RoCE) reaches less of a fast link than over InfiniBand's RDMA; a node
# with k NICs (one per GPU, rail-optimised) reaches about k times these. Measure yours with make slurm-nccl-test.
NETWORK_LINKS = {
    "eth10": NetworkLink("10 GbE, NCCL over TCP sockets", 10, 0.80),
    "eth25": NetworkLink("25 GbE, NCCL over TCP sockets", 25, 0.75),
    "eth100": NetworkLink("100 GbE, NCCL over TCP sockets", 100, 0.50),
    "ib-hdr": NetworkLink("InfiniBand HDR 200 Gb/s, one NIC per node", 200, 0.90),
    "ib-ndr": NetworkLink("InfiniBand NDR 400 Gb/s, one NIC per node", 400, 0.90),
}

# Measured busbw as a share of the expected figure -> verdict; the first band reached wins.
VERDICT_BANDS = ((0.75, "PASS"), (0.40, "WARN"), (0.0, "FAIL"))


@dataclass
class PairLink:
    a: int
    b: int
    kind: str  # a LINK_KINDS key
    raw_gbps: float
    expected_gbps: float
    detail: str  # e.g. "4 NVLink 3 links" or "PCIe gen4 x16"


@dataclass
class Expectation:
    """The busbw a set of GPUs should reach; `busbw_gbps` is None, with `why_not` set, when it cannot be told."""

    busbw_gbps: float | None
    link: str = ""  # the slowest pair's link, in words
    why_not: str = ""


@dataclass
class Verdict:
    status: str  # PASS | WARN | FAIL
    reason: str
    expected_busbw: float | None = None
    measured_busbw: float | None = None

    @property
    def exit_code(self) -> int:
        return 1 if self.status == "FAIL" else 0


def nvlink_rate(gpu: GpuInfo) -> NvlinkRate | None:
    return NVLINK_BY_COMPUTE_CAPABILITY.get(tuple(gpu.compute_capability))


def pcie_raw_gbps(gpu: GpuInfo) -> float | None:
    """What the slot can carry per direction: the link's maximum, since an idle link downshifts."""
    if gpu.pcie_gen_max not in PCIE_LANE_GBPS or not gpu.pcie_width_max:
        return None
    return PCIE_LANE_GBPS[gpu.pcie_gen_max] * gpu.pcie_width_max


def pair_link(snapshot: Snapshot, a: int, b: int, p2p_mode: str) -> PairLink | None:
    """The link NCCL will use between GPUs a and b (NVML indices); None when NVML did not say enough.

    `p2p_mode` is how NCCL may use P2P: "on", "nvlink-only" (NCCL_P2P_LEVEL=NVL) or "off"
    (NCCL_P2P_DISABLE=1); env.machine.p2p.p2p_mode reads it from the environment.
    """
    pair = snapshot.pair(a, b)
    gpu_a, gpu_b = snapshot.gpu(a), snapshot.gpu(b)
    if pair is None or gpu_a is None or gpu_b is None:
        return None
    if pair.nvlink_links and p2p_mode != "off":
        rate = nvlink_rate(gpu_a)
        if rate is None:
            return None
        raw = rate.link_gbps * pair.nvlink_links
        return _link(a, b, "nvlink", raw, f"{pair.nvlink_links} NVLink {rate.generation} links")
    raws = [pcie_raw_gbps(gpu_a), pcie_raw_gbps(gpu_b)]
    if None in raws:
        return None
    slower = gpu_a if raws[0] <= raws[1] else gpu_b
    detail = f"PCIe gen{slower.pcie_gen_max} x{slower.pcie_width_max}"
    nvml_p2p = pair.p2p_read == "OK" and pair.p2p_write == "OK"
    kind = "pcie_p2p" if nvml_p2p and p2p_mode == "on" else "pcie_host"
    return _link(a, b, kind, min(raws), detail)


def expected_busbw(snapshot: Snapshot, gpu_indices: list[int], p2p_mode: str) -> Expectation:
    """The slowest pair among `gpu_indices` sets what a ring over all of them can reach."""
    if not snapshot.ok:
        return Expectation(None, why_not=f"links unknown ({snapshot.error})")
    if len(gpu_indices) < 2:
        return Expectation(None, why_not="one GPU: no link is crossed")
    links = [pair_link(snapshot, a, b, p2p_mode) for a, b in combinations(gpu_indices, 2)]
    if any(link is None for link in links):
        return Expectation(None, why_not="NVML did not report enough about the links (PCIe generation/width)")
    slowest = min(links, key=lambda link: link.expected_gbps)
    label = f"{LINK_KINDS[slowest.kind].label}, {slowest.detail}, GPU{slowest.a}-GPU{slowest.b}"
    return Expectation(slowest.expected_gbps, link=label)


def judge(*, wrong: int, measured_busbw: float | None, expectation: Expectation, min_busbw: float | None) -> Verdict:
    """Wrong data always fails; then MIN_BUSBW if given; then the measurement against the links."""
    if wrong > 0:
        return Verdict("FAIL", f"{wrong} wrong element(s): the collectives returned wrong data", None, measured_busbw)
    if min_busbw is not None:
        if measured_busbw is None:
            return Verdict("FAIL", "no large-message busbw was measured to hold against --min-busbw", min_busbw)
        ok = measured_busbw >= min_busbw
        relation = "at or above" if ok else "below"
        reason = f"large-message busbw {measured_busbw:.2f} GB/s is {relation} --min-busbw {min_busbw:g} GB/s"
        return Verdict("PASS" if ok else "FAIL", reason, min_busbw, measured_busbw)
    if expectation.busbw_gbps is None or measured_busbw is None:
        why = expectation.why_not or "no large-message busbw was measured"
        return Verdict("PASS", f"0 wrong elements; bandwidth not judged: {why}", None, measured_busbw)
    expected = expectation.busbw_gbps
    share = measured_busbw / expected
    status = next(name for floor, name in VERDICT_BANDS if share >= floor)
    reason = (
        f"large-message busbw {measured_busbw:.2f} GB/s is {share:.0%} of the {expected:.1f} GB/s expected"
        f" for {expectation.link}"
    )
    return Verdict(status, reason, expected, measured_busbw)


def _link(a: int, b: int, kind: str, raw: float, detail: str) -> PairLink:
    return PairLink(a, b, kind, raw, raw * LINK_KINDS[kind].efficiency, detail)
