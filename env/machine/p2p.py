"""Should NCCL use GPU peer-to-peer (P2P)? Decided from measurements, not from the card's name.

GeForce cards on PCIe (e.g. RTX 4090) are the classic trap: NVML reports P2P as not supported,
yet some drivers let CUDA claim peer access, and NCCL then hangs or copies zeros. Data-centre
boards with NVLink need P2P for their bandwidth. So, per pair of visible GPUs, this module
reads NVML's P2P read/write status, the topology and NVLink links, and, where NVML says P2P
works, checks it with a real cross-device copy whose bytes are compared. NCCL_P2P_DISABLE=1
is set only when some pair cannot do P2P; a user's own NCCL_P2P_DISABLE always wins.

`decide_p2p` and `apply_p2p_decision` are shared by the collective test and training, and
importing this module has no side effects (torch is imported only by `torch_copy_check`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import asdict, dataclass, field
from itertools import combinations
from typing import Any

from env.machine.nvml import GpuInfo, Snapshot

DISABLE_VAR = "NCCL_P2P_DISABLE"
LEVEL_VAR = "NCCL_P2P_LEVEL"
NVLINK_ONLY_LEVEL = "NVL"  # NCCL_P2P_LEVEL value: P2P over NVLink only
IDLE_UTILIZATION_PCT = 10  # below this, a PCIe link below its maximum speed is idling, not degraded

# verify_copy(src, dst) copies a known pattern from CUDA device src to dst and says whether it arrived intact.
CopyCheck = Callable[[int, int], bool]


@dataclass
class P2PDecision:
    disable: bool | None  # None: nothing decided, NCCL's defaults stand
    source: str  # "user" | "measured" | "no-gpu" | "single-gpu"
    reason: str
    pairs: list[dict[str, Any]] = field(default_factory=list)
    level: str | None = None  # NCCL_P2P_LEVEL to set: "NVL" keeps P2P on NVLink pairs only

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> P2PDecision:
        return cls(**dict(data))


def visible_gpu_indices(snapshot: Snapshot, environ: Mapping[str, str]) -> list[int]:
    """NVML indices of the GPUs CUDA will show, in CUDA's order (PCI bus order; see CUDA_DEVICE_ORDER).

    CUDA_VISIBLE_DEVICES holds indices or UUID prefixes; like CUDA, parsing stops at the first entry
    that names no GPU.
    """
    indices = [g.index for g in snapshot.gpus]
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return indices
    chosen: list[int] = []
    for token in (t.strip() for t in listed.split(",")):
        named = (g.index for g in snapshot.gpus if token and (token == str(g.index) or g.uuid.startswith(token)))
        match = next(named, None)
        if match is None or match in chosen:
            break
        chosen.append(match)
    return chosen


def pcie_link_state(gpu: GpuInfo) -> str:
    """The link's state: full, idle, degraded or unknown.

    A GPU saves power by lowering its link's speed (generation), not its width, so a slower
    generation with low utilization is idle; a narrower link than the slot's maximum is degraded.
    """
    facts = (gpu.pcie_gen_current, gpu.pcie_gen_max, gpu.pcie_width_current, gpu.pcie_width_max)
    if None in facts:
        return "unknown"
    gen_now, gen_max, width_now, width_max = facts
    if width_now < width_max:
        return "degraded"
    if gen_now < gen_max:
        busy = gpu.utilization_pct is not None and gpu.utilization_pct >= IDLE_UTILIZATION_PCT
        return "degraded" if busy else "idle"
    return "full"


def pcie_link_text(gpu: GpuInfo) -> str:
    """E.g. "GPU0 PCIe gen1 x16 of gen4 x16 (idle)"."""
    state = pcie_link_state(gpu)
    if state == "unknown":
        return f"GPU{gpu.index} PCIe link unknown"
    return (
        f"GPU{gpu.index} PCIe gen{gpu.pcie_gen_current} x{gpu.pcie_width_current}"
        f" of gen{gpu.pcie_gen_max} x{gpu.pcie_width_max} ({state})"
    )


def p2p_mode(environ: Mapping[str, str]) -> str:
    """How NCCL may use P2P under this environment: "off", "nvlink-only" or "on"."""
    if environ.get(DISABLE_VAR, "").strip() not in ("", "0"):
        return "off"
    if environ.get(LEVEL_VAR, "").strip().upper() == NVLINK_ONLY_LEVEL:
        return "nvlink-only"
    return "on"


def decide_p2p(snapshot: Snapshot, environ: Mapping[str, str], verify_copy: CopyCheck | None) -> P2PDecision:
    """Decide NCCL_P2P_DISABLE for the GPUs visible under `environ`, from NVML facts and (optionally) real copies.

    `verify_copy` gets CUDA device ordinals (positions among the visible GPUs) and is called only for
    pairs where NVML says P2P works, in both directions; None trusts NVML.
    """
    user_value = environ.get(DISABLE_VAR, "").strip()
    visible = visible_gpu_indices(snapshot, environ) if snapshot.ok else []
    if user_value:
        pairs = [_describe_pair(snapshot, a, b) for a, b in combinations(visible, 2)]
        return P2PDecision(
            disable=user_value != "0",
            source="user",
            reason=f"{DISABLE_VAR}={user_value} was set by the user and is kept",
            pairs=pairs,
        )
    if not snapshot.ok:
        return P2PDecision(None, "no-gpu", f"P2P not probed: {snapshot.error}; NCCL's defaults stand")
    if not visible:
        return P2PDecision(None, "no-gpu", "no NVIDIA GPU is visible: P2P does not apply")
    if len(visible) == 1:
        return P2PDecision(None, "single-gpu", f"one GPU (GPU{visible[0]}): P2P does not apply")
    ordinal = {index: position for position, index in enumerate(visible)}
    pairs = [_probe_pair(snapshot, a, b, ordinal, verify_copy) for a, b in combinations(visible, 2)]
    return _decide_from_pairs(pairs)


def apply_p2p_decision(decision: P2PDecision, environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Set NCCL_P2P_DISABLE=1 (or NCCL_P2P_LEVEL=NVL) only where the decision needs it; return what was set."""
    if decision.source == "user":
        return {}
    settings: dict[str, str] = {}
    if decision.disable:
        settings[DISABLE_VAR] = "1"
    elif decision.level and LEVEL_VAR not in environ:  # a user's own level is kept
        settings[LEVEL_VAR] = decision.level
    environ.update(settings)
    return settings


def copy_intact(copy: Callable[[Any], Any], source_device: str, count: int = 8 << 20) -> bool:
    """Send a pattern with no zeros through `copy` and compare every element where it landed."""
    import torch

    sent = torch.arange(1, count + 1, dtype=torch.int32, device=source_device)
    received = copy(sent)
    expected = torch.arange(1, count + 1, dtype=torch.int32, device=received.device)
    return bool(torch.equal(received, expected))


def torch_copy_check(src: int, dst: int) -> bool:
    """A real copy from cuda:src to cuda:dst, checked element by element (32 MiB).

    torch copies between devices with peer access when CUDA grants it, so this takes the same
    P2P path NCCL would; the known failure on some GeForce drivers delivers zeros.
    """
    return copy_intact(lambda tensor: tensor.to(f"cuda:{dst}"), f"cuda:{src}")


def _describe_pair(snapshot: Snapshot, a: int, b: int) -> dict[str, Any]:
    """What NVML says about one pair, as plain JSON-able facts."""
    pair = snapshot.pair(a, b)
    gpus = [snapshot.gpu(a), snapshot.gpu(b)]
    read = pair.p2p_read if pair else "UNKNOWN"
    write = pair.p2p_write if pair else "UNKNOWN"
    return {
        "gpus": [a, b],
        "names": [g.name if g else "" for g in gpus],
        "topology": pair.topology if pair else "UNKNOWN",
        "nvlink_links": pair.nvlink_links if pair else 0,
        "p2p_read": read,
        "p2p_write": write,
        "nvml_p2p_ok": read == "OK" and write == "OK",
        "pcie": [pcie_link_text(g) for g in gpus if g],
        "copy": "not run",
        "usable": read == "OK" and write == "OK",
    }


def _probe_pair(
    snapshot: Snapshot, a: int, b: int, ordinal: Mapping[int, int], verify_copy: CopyCheck | None
) -> dict[str, Any]:
    facts = _describe_pair(snapshot, a, b)
    if not facts["nvml_p2p_ok"]:
        facts["copy"] = "skipped: NVML says no P2P"  # a copy over a pair NVML rejects can hang
    elif verify_copy is not None:
        intact = _copies_intact(verify_copy, ordinal[a], ordinal[b])
        facts["copy"] = "verified" if intact else "FAILED: bytes arrived wrong (e.g. zeros)"
        facts["usable"] = intact
    return facts


def _copies_intact(verify_copy: CopyCheck, src: int, dst: int) -> bool:
    try:
        return verify_copy(src, dst) and verify_copy(dst, src)
    except Exception:  # any CUDA error on a peer copy means P2P is not usable on this pair
        return False


def _pair_problem(facts: Mapping[str, Any]) -> str:
    a, b = facts["gpus"]
    where = f"GPU{a}-GPU{b} ({facts['topology']})"
    if not facts["nvml_p2p_ok"]:
        return f"NVML reports P2P read {facts['p2p_read']} / write {facts['p2p_write']} on {where}"
    return f"a P2P copy on {where} delivered wrong bytes although NVML reports P2P OK"


def _decide_from_pairs(pairs: list[dict[str, Any]]) -> P2PDecision:
    broken = [p for p in pairs if not p["usable"]]
    if not broken:
        checked = "NVML OK and copies verified" if all(p["copy"] == "verified" for p in pairs) else "NVML OK"
        reason = f"P2P works on every GPU pair ({len(pairs)}; {checked}); kept on"
        return P2PDecision(False, "measured", reason, pairs)
    problem = _pair_problem(broken[0])
    more = f" and {len(broken) - 1} more pair(s)" if len(broken) > 1 else ""
    nvlink_broken = any(p["nvlink_links"] for p in broken)
    nvlink_working = any(p["nvlink_links"] and p["usable"] for p in pairs)
    if nvlink_working and not nvlink_broken:
        # NCCL_P2P_DISABLE would also switch off the NVLink pairs; keep P2P on those only.
        reason = f"{problem}{more}; P2P kept on NVLink pairs only ({LEVEL_VAR}={NVLINK_ONLY_LEVEL})"
        return P2PDecision(False, "measured", reason, pairs, level=NVLINK_ONLY_LEVEL)
    reason = f"{problem}{more}; {DISABLE_VAR}=1 so NCCL goes through host memory instead of hanging or copying zeros"
    return P2PDecision(True, "measured", reason, pairs)
