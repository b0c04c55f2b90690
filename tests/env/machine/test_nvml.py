"""read_snapshot turns NVML's answers into a Snapshot: driven here by a fake pynvml module."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field

import pytest

from env.machine.nvml import Snapshot, read_snapshot


class NotSupported(Exception):
    pass


@dataclass
class FakeGpu:
    name: str
    bus: str
    cc: tuple[int, int] = (8, 9)
    ecc: bool | None = None
    links: list[tuple[int, str]] = field(default_factory=list)  # (remote type, remote bus id) per active link


def fake_nvml(gpus: list[FakeGpu], p2p_ok: bool) -> types.ModuleType:
    nv = types.ModuleType("pynvml")
    ns = types.SimpleNamespace

    def unsupported(*_args):
        raise NotSupported

    nv.nvmlInit = lambda: None
    nv.nvmlShutdown = lambda: None
    nv.nvmlSystemGetDriverVersion = lambda: "550.54.14"
    nv.nvmlSystemGetCudaDriverVersion = lambda: 12040
    nv.nvmlDeviceGetCount = lambda: len(gpus)
    nv.nvmlDeviceGetHandleByIndex = lambda i: gpus[i]
    nv.nvmlDeviceGetName = lambda g: g.name.encode()
    nv.nvmlDeviceGetUUID = lambda g: f"GPU-{g.bus}"
    nv.nvmlDeviceGetMemoryInfo = lambda g: ns(total=24 * 2**30)
    nv.nvmlDeviceGetCudaComputeCapability = lambda g: g.cc
    nv.nvmlDeviceGetTemperature = lambda g, sensor: 41
    nv.nvmlDeviceGetPowerManagementLimit = lambda g: 450_000
    nv.nvmlDeviceGetEccMode = lambda g: (int(g.ecc), int(g.ecc)) if g.ecc is not None else unsupported()
    nv.nvmlDeviceGetPciInfo = lambda g: ns(busId=g.bus.encode())
    nv.nvmlDeviceGetUtilizationRates = lambda g: ns(gpu=0)
    nv.nvmlDeviceGetCurrPcieLinkGeneration = lambda g: 1
    nv.nvmlDeviceGetMaxPcieLinkGeneration = lambda g: 4
    nv.nvmlDeviceGetCurrPcieLinkWidth = lambda g: 16
    nv.nvmlDeviceGetMaxPcieLinkWidth = lambda g: 16
    nv.nvmlDeviceGetCpuAffinity = lambda g, words: [0b1111]
    nv.nvmlDeviceGetNvLinkState = lambda g, link: 1 if link < len(g.links) else unsupported()
    nv.nvmlDeviceGetNvLinkVersion = lambda g, link: 4
    nv.nvmlDeviceGetNvLinkRemoteDeviceType = lambda g, link: g.links[link][0]
    nv.nvmlDeviceGetNvLinkRemotePciInfo = lambda g, link: ns(busId=g.links[link][1].encode())
    nv.nvmlDeviceGetP2PStatus = lambda a, b, cap: 0 if p2p_ok else 5
    nv.nvmlDeviceGetTopologyCommonAncestor = lambda a, b: 30
    return nv


def snapshot_of(monkeypatch: pytest.MonkeyPatch, gpus: list[FakeGpu], p2p_ok: bool) -> Snapshot:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(gpus, p2p_ok))
    return read_snapshot()


def test_a_bridged_pair_is_nvlink_and_a_consumer_card_has_no_ecc(monkeypatch) -> None:
    a = FakeGpu("NVIDIA GeForce RTX 3090", "00000000:01:00.0", (8, 6), links=[(0, "00000000:02:00.0")] * 4)
    b = FakeGpu("NVIDIA GeForce RTX 3090", "00000000:02:00.0", (8, 6), links=[(0, "00000000:01:00.0")] * 4)
    snap = snapshot_of(monkeypatch, [a, b], p2p_ok=True)
    assert snap.ok and snap.driver_version == "550.54.14" and snap.cuda_driver_version == 12040
    assert snap.gpus[0].compute_capability == (8, 6) and snap.gpus[0].ecc_enabled is None
    assert snap.gpus[0].power_limit_w == 450 and snap.gpus[0].cpu_affinity == [0, 1, 2, 3]
    pair = snap.pair(0, 1)
    assert (pair.topology, pair.nvlink_links, pair.p2p_read) == ("NVLINK", 4, "OK")
    assert Snapshot.from_dict(snap.to_dict()) == snap


def test_gpus_on_nvswitches_are_nvlink_pairs(monkeypatch) -> None:
    sxm = [FakeGpu("NVIDIA H100 80GB HBM3", f"00000000:{i:02x}:00.0", (9, 0), True, [(2, "")] * 18) for i in range(3)]
    snap = snapshot_of(monkeypatch, sxm, p2p_ok=True)
    assert all(p.topology == "NVLINK" and p.nvlink_links == 18 for p in snap.pairs) and len(snap.pairs) == 3
    assert snap.gpus[0].ecc_enabled is True and snap.gpus[0].nvlink_version == 4


def test_pcie_cards_report_their_common_ancestor_and_p2p_status(monkeypatch) -> None:
    cards = [FakeGpu("NVIDIA GeForce RTX 4090", f"00000000:{i:02x}:00.0") for i in (1, 2)]
    pair = snapshot_of(monkeypatch, cards, p2p_ok=False).pair(0, 1)
    assert (pair.topology, pair.nvlink_links, pair.p2p_read, pair.p2p_write) == (
        "PHB",
        0,
        "NOT_SUPPORTED",
        "NOT_SUPPORTED",
    )


def test_no_nvml_library_is_a_snapshot_with_an_error_not_a_crash(monkeypatch) -> None:
    broken = types.ModuleType("pynvml")

    def fail() -> None:
        raise OSError("NVML Shared Library Not Found")

    broken.nvmlInit = fail
    monkeypatch.setitem(sys.modules, "pynvml", broken)
    snap = read_snapshot()
    assert not snap.ok and "NVML unavailable" in snap.error and snap.gpus == []
