"""Facts about the GPUs, read once through NVML (nvidia-ml-py) into plain dataclasses.

Every decision the rig makes from NVML (P2P, PCIe health, driver checks) works on a
`Snapshot`, never on live NVML handles. A snapshot round-trips through JSON, so tests
replay recorded answers from real boxes (tests/fixtures/nvml/*.json) and a run's
manifest records exactly what was seen. This module imports neither torch nor train.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# NVML's topology levels, nearest first (nvmlGpuTopologyLevel_t), as nvidia-smi topo -m names them.
TOPOLOGY_NAMES = {0: "SAME", 10: "PIX", 20: "PXB", 30: "PHB", 40: "NODE", 50: "SYS"}
# nvmlGpuP2PStatus_t, as short words.
P2P_STATUS_NAMES = {
    0: "OK",
    1: "CHIPSET_NOT_SUPPORTED",
    2: "GPU_NOT_SUPPORTED",
    3: "IOH_TOPOLOGY_NOT_SUPPORTED",
    4: "DISABLED_BY_REGKEY",
    5: "NOT_SUPPORTED",
    6: "UNKNOWN",
}
NVLINK_MAX_LINKS = 18
NVLINK_REMOTE_SWITCH = 2  # nvmlIntNvLinkDeviceType_t: the far end is an NVSwitch


@dataclass
class GpuInfo:
    index: int
    name: str
    uuid: str = ""
    pci_bus_id: str = ""
    memory_total_mib: int = 0
    compute_capability: tuple[int, int] = (0, 0)
    temperature_c: int | None = None
    power_limit_w: float | None = None
    ecc_enabled: bool | None = None  # None: the card has no ECC
    pcie_gen_current: int | None = None
    pcie_gen_max: int | None = None
    pcie_width_current: int | None = None
    pcie_width_max: int | None = None
    utilization_pct: int | None = None  # when the link was read; an idle link downshifts
    cpu_affinity: list[int] = field(default_factory=list)  # CPU ids near this GPU
    numa_node: int | None = None
    nvlink_version: int | None = None


@dataclass
class PairInfo:
    a: int
    b: int
    p2p_read: str = "UNKNOWN"
    p2p_write: str = "UNKNOWN"
    topology: str = "SYS"  # NVLINK when linked, else the common ancestor (PIX ... SYS)
    nvlink_links: int = 0  # active NVLink links joining a and b


@dataclass
class Snapshot:
    """What NVML said. `error` is set, and the lists empty, when NVML could not be read."""

    driver_version: str = ""
    cuda_driver_version: int = 0  # e.g. 12040 for 12.4, the newest CUDA the driver supports
    gpus: list[GpuInfo] = field(default_factory=list)
    pairs: list[PairInfo] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def gpu(self, index: int) -> GpuInfo | None:
        return next((g for g in self.gpus if g.index == index), None)

    def pair(self, a: int, b: int) -> PairInfo | None:
        lo, hi = min(a, b), max(a, b)
        return next((p for p in self.pairs if (p.a, p.b) == (lo, hi)), None)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Snapshot:
        gpus = []
        for g in data.get("gpus", []):
            g = dict(g)
            g["compute_capability"] = tuple(g.get("compute_capability", (0, 0)))
            gpus.append(GpuInfo(**g))
        pairs = [PairInfo(**p) for p in data.get("pairs", [])]
        return cls(
            driver_version=data.get("driver_version", ""),
            cuda_driver_version=int(data.get("cuda_driver_version", 0)),
            gpus=gpus,
            pairs=pairs,
            error=data.get("error"),
        )

    @classmethod
    def load(cls, path: str | Path) -> Snapshot:
        return cls.from_dict(json.loads(Path(path).read_text()))


def _maybe(fn: Any, *args: Any) -> Any:
    """Call an NVML getter; None where the card or driver does not support it."""
    try:
        return fn(*args)
    except Exception:  # NVMLError_NotSupported and friends: the fact is simply unknown
        return None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _cpu_ids(masks: list[int] | None) -> list[int]:
    if not masks:
        return []
    return [word * 64 + bit for word, mask in enumerate(masks) for bit in range(64) if mask >> bit & 1]


def _numa_node(pci_bus_id: str) -> int | None:
    # sysfs wants the 4-digit domain form, lower case: 0000:01:00.0
    bus = pci_bus_id.lower()
    if len(bus.split(":")[0]) == 8:
        bus = bus[4:]
    try:
        node = int(Path(f"/sys/bus/pci/devices/{bus}/numa_node").read_text())
    except (OSError, ValueError):
        return None
    return node if node >= 0 else None


def _read_gpu(nv: Any, index: int, handle: Any, nvlink_version: int | None) -> GpuInfo:
    mem = _maybe(nv.nvmlDeviceGetMemoryInfo, handle)
    cc = _maybe(nv.nvmlDeviceGetCudaComputeCapability, handle) or (0, 0)
    power_mw = _maybe(nv.nvmlDeviceGetPowerManagementLimit, handle)
    ecc = _maybe(nv.nvmlDeviceGetEccMode, handle)
    pci = _maybe(nv.nvmlDeviceGetPciInfo, handle)
    util = _maybe(nv.nvmlDeviceGetUtilizationRates, handle)
    bus_id = _text(pci.busId) if pci is not None else ""
    return GpuInfo(
        index=index,
        name=_text(nv.nvmlDeviceGetName(handle)),
        uuid=_text(_maybe(nv.nvmlDeviceGetUUID, handle) or ""),
        pci_bus_id=bus_id,
        memory_total_mib=int(mem.total // 2**20) if mem is not None else 0,
        compute_capability=(int(cc[0]), int(cc[1])),
        temperature_c=_maybe(nv.nvmlDeviceGetTemperature, handle, 0),
        power_limit_w=power_mw / 1000 if power_mw is not None else None,
        ecc_enabled=bool(ecc[0]) if ecc is not None else None,
        pcie_gen_current=_maybe(nv.nvmlDeviceGetCurrPcieLinkGeneration, handle),
        pcie_gen_max=_maybe(nv.nvmlDeviceGetMaxPcieLinkGeneration, handle),
        pcie_width_current=_maybe(nv.nvmlDeviceGetCurrPcieLinkWidth, handle),
        pcie_width_max=_maybe(nv.nvmlDeviceGetMaxPcieLinkWidth, handle),
        utilization_pct=int(util.gpu) if util is not None else None,
        cpu_affinity=_cpu_ids(_maybe(nv.nvmlDeviceGetCpuAffinity, handle, 4)),
        numa_node=_numa_node(bus_id) if bus_id else None,
        nvlink_version=nvlink_version,
    )


@dataclass
class _NvLinks:
    """Where one GPU's active NVLinks go: to other GPUs (by PCI bus id) or to NVSwitches."""

    to_gpu: dict[str, int] = field(default_factory=dict)
    to_switch: int = 0
    version: int | None = None  # the first active link's NVLink version


def _read_nvlinks(nv: Any, handle: Any) -> _NvLinks:
    links = _NvLinks()
    seen_active = False
    for link in range(NVLINK_MAX_LINKS):
        if _maybe(nv.nvmlDeviceGetNvLinkState, handle, link) != 1:
            continue
        if not seen_active:
            links.version = _maybe(nv.nvmlDeviceGetNvLinkVersion, handle, link)
            seen_active = True
        if _maybe(nv.nvmlDeviceGetNvLinkRemoteDeviceType, handle, link) == NVLINK_REMOTE_SWITCH:
            links.to_switch += 1
            continue
        remote = _maybe(nv.nvmlDeviceGetNvLinkRemotePciInfo, handle, link)
        if remote is not None:
            bus = _text(remote.busId).lower()
            links.to_gpu[bus] = links.to_gpu.get(bus, 0) + 1
    return links


def _read_pair(nv: Any, a: int, b: int, handles: list[Any], gpus: list[GpuInfo], nvlinks: list[_NvLinks]) -> PairInfo:
    ha, hb = handles[a], handles[b]
    read = _maybe(nv.nvmlDeviceGetP2PStatus, ha, hb, 0)  # NVML_P2P_CAPS_INDEX_READ
    write = _maybe(nv.nvmlDeviceGetP2PStatus, ha, hb, 1)  # NVML_P2P_CAPS_INDEX_WRITE
    # Direct links (bridges, e.g. 3090 pairs), or both GPUs on NVSwitches (SXM boards: every pair).
    links = nvlinks[a].to_gpu.get(gpus[b].pci_bus_id.lower(), 0)
    if nvlinks[a].to_switch and nvlinks[b].to_switch:
        links += min(nvlinks[a].to_switch, nvlinks[b].to_switch)
    ancestor = _maybe(nv.nvmlDeviceGetTopologyCommonAncestor, ha, hb)
    topology = "NVLINK" if links else TOPOLOGY_NAMES.get(ancestor, "SYS") if ancestor is not None else "SYS"
    return PairInfo(
        a=a,
        b=b,
        p2p_read=P2P_STATUS_NAMES.get(read, "UNKNOWN") if read is not None else "UNKNOWN",
        p2p_write=P2P_STATUS_NAMES.get(write, "UNKNOWN") if write is not None else "UNKNOWN",
        topology=topology,
        nvlink_links=links,
    )


def read_snapshot() -> Snapshot:
    """Read every GPU and GPU pair. Never raises: problems land in Snapshot.error."""
    try:
        import pynvml as nv  # provided by nvidia-ml-py
    except ImportError:
        return Snapshot(error="nvidia-ml-py is not installed (pip install nvidia-ml-py)")
    try:
        nv.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return Snapshot(error=f"NVML unavailable: {exc} (no NVIDIA driver, or not passed into the container)")
    try:
        count = nv.nvmlDeviceGetCount()
        handles = [nv.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        nvlinks = [_read_nvlinks(nv, h) for h in handles]
        gpus = [_read_gpu(nv, i, h, nvlinks[i].version) for i, h in enumerate(handles)]
        pairs = [_read_pair(nv, a, b, handles, gpus, nvlinks) for a in range(count) for b in range(a + 1, count)]
        return Snapshot(
            driver_version=_text(nv.nvmlSystemGetDriverVersion()),
            cuda_driver_version=int(_maybe(nv.nvmlSystemGetCudaDriverVersion) or 0),
            gpus=gpus,
            pairs=pairs,
        )
    except Exception as exc:
        return Snapshot(error=f"NVML query failed: {exc}")
    finally:
        _maybe(nv.nvmlShutdown)
