"""The doctor's checks: pure functions of `Facts`, kept as a table (`CHECKS`) that the doctor walks.

`Facts` (env/machine/facts.py) holds everything gathered about the machine (tests build it by hand or
load it from tests/fixtures/doctor/*.json); version tables and pins come from env/rig/profiles.py. Each check turns
Facts into a `CheckResult`: a status (OK, WARN or FAIL), one line of evidence, and one
line of fix when the status is not OK. No check reads the machine itself.

Where a fact is missing (no GPU, no NVML, no torch) the checks that need it say so as a
WARN rather than fail: a CPU-only machine is a valid place to run the rig.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from env.machine.facts import Facts
from env.machine.links import PCIE_LANE_GBPS
from env.machine.nvml import GpuInfo, Snapshot
from env.machine.p2p import DISABLE_VAR, P2PDecision, decide_p2p
from env.rig.profiles import CUDA_MIN_DRIVER, NCCL_DIST, TORCH_TRIOS, TRIO

MIB = 2**20
GIB = 2**30


class Status(str, Enum):
    OK = "OK"
    WARN = "WARN"
    FAIL = "FAIL"

    @property
    def rank(self) -> int:
        return list(Status).index(self)


def worst(statuses: list[Status]) -> Status:
    return max(statuses, key=lambda s: s.rank, default=Status.OK)


@dataclass(frozen=True)
class CheckResult:
    status: Status
    evidence: str
    fix: str = ""


# --- small helpers -------------------------------------------------------------------------


def base_version(version: str | None) -> str:
    """'2.4.1+cu121' -> '2.4.1'."""
    return (version or "").split("+")[0]


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version))


def gib(n_bytes: float) -> str:
    return f"{n_bytes / GIB:.1f} GiB" if n_bytes >= GIB else f"{n_bytes / MIB:.0f} MiB"


def cpu_ranges(cpus: list[int]) -> str:
    """[0, 1, 2, 3, 8] -> '0-3,8'."""
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(f"{a}-{b}" if a != b else str(a) for a, b in runs)


def gpu_count(f: Facts) -> int:
    """GPUs the run will use: --gpus when given, else all NVML sees."""
    return f.gpus_requested if f.gpus_requested is not None else len(f.snapshot.gpus)


def _no_gpu(f: Facts) -> CheckResult | None:
    """The WARN a GPU check gives on a machine where NVML shows no GPU; None when there are GPUs."""
    if f.snapshot.gpus:
        return None
    return CheckResult(Status.WARN, "skipped: no GPU visible to NVML (see gpus)", "none on a CPU-only machine")


# --- GPUs and driver -----------------------------------------------------------------------

HOT_GPU_C = 85  # consumer cards start to throttle near here


def _describe_gpus(gpus: list[GpuInfo]) -> str:
    """Alike GPUs as one group: '3× NVIDIA GeForce RTX 4090 (24 GiB, sm_89, 450 W, no ECC) at 44-47°C'."""
    groups: dict[tuple[Any, ...], list[GpuInfo]] = {}
    for g in gpus:
        cc = f"sm_{g.compute_capability[0]}{g.compute_capability[1]}"
        ecc = {None: "no ECC", True: "ECC on", False: "ECC off"}[g.ecc_enabled]
        power = f"{g.power_limit_w:.0f} W" if g.power_limit_w is not None else "power limit ?"
        groups.setdefault((g.name, f"{g.memory_total_mib / 1024:.0f} GiB", cc, power, ecc), []).append(g)
    parts = []
    for (name, *details), members in groups.items():
        temps = sorted(g.temperature_c for g in members if g.temperature_c is not None)
        span = "" if not temps else f"{temps[0]}" if temps[0] == temps[-1] else f"{temps[0]}-{temps[-1]}"
        at = f" at {span}°C" if span else ""
        parts.append(f"{len(members)}× {name} ({', '.join(details)}){at}")
    return "; ".join(parts)


def check_gpus(f: Facts) -> CheckResult:
    # Without GPUs, --gpus N counts CPU processes on gloo: nothing to compare it with.
    if not f.snapshot.gpus:
        return CheckResult(
            Status.WARN,
            f.snapshot.error or "NVML sees no GPU",
            "none on a CPU-only machine; on a GPU box install the NVIDIA driver (in Docker: compose's gpu service)",
        )
    found = len(f.snapshot.gpus)
    evidence = _describe_gpus(f.snapshot.gpus)
    if f.gpus_requested is not None and f.gpus_requested > found:
        return CheckResult(
            Status.FAIL,
            f"--gpus {f.gpus_requested} but NVML sees {found}: {evidence}",
            f"use GPUS={found}, or pass all GPUs into the container",
        )
    hot = [g.index for g in f.snapshot.gpus if (g.temperature_c or 0) >= HOT_GPU_C]
    if hot:
        return CheckResult(
            Status.WARN,
            f"GPU(s) {hot} at >= {HOT_GPU_C}°C: {evidence}",
            "improve airflow or lower the power limit (nvidia-smi -pl) before benchmarking",
        )
    return CheckResult(Status.OK, evidence)


# Forward compatibility (the cuda-compat package) works on datacenter GPUs only, not on GeForce.
# Matched against the words of NVML's name ("NVIDIA A100-SXM4-80GB", "Tesla T4").
DATACENTER_MODELS = frozenset(
    {"A100", "A800", "H100", "H200", "H800", "B100", "B200", "GH200", "GB200"}
    | {"A10", "A10G", "A16", "A30", "A40", "L4", "L40", "L40S", "T4", "V100"}
)


def _is_datacenter(name: str) -> bool:
    return any(word in DATACENTER_MODELS for word in re.split(r"[\s-]+", name))


def _cuda_in_use(f: Facts) -> tuple[tuple[int, int], str] | None:
    """The newest CUDA runtime this environment needs: torch's own, or the image's base."""
    sources = [(f.torch_cuda, "torch"), (f.image_labels.get("TORCHRIG_CUDA_PROFILE"), "image")]
    found = [(version_tuple(v)[:2], who) for v, who in sources if v and len(version_tuple(v)) >= 2]
    return max(found, default=None)


def check_driver(f: Facts) -> CheckResult:
    if skip := _no_gpu(f):
        return skip
    driver = f.snapshot.driver_version
    cuda = _cuda_in_use(f)
    if cuda is None:
        return CheckResult(
            Status.WARN,
            f"driver {driver}; no CUDA runtime to check it against (CPU-only torch?)",
            "make setup installs the CUDA build of torch from the lock",
        )
    (major, minor), who = cuda
    listed = [k for k in CUDA_MIN_DRIVER if k <= (major, minor)]
    if not listed:
        return CheckResult(
            Status.WARN,
            f"driver {driver}; CUDA {major}.{minor} ({who}) is older than the table",
            "use a CUDA profile the rig knows (make build CUDA=12.1)",
        )
    nearest = max(listed)
    needed = CUDA_MIN_DRIVER[nearest]
    note = "" if nearest == (major, minor) else f" (table stops at CUDA {nearest[0]}.{nearest[1]})"
    supports = f.snapshot.cuda_driver_version
    supports_text = f", supports CUDA {supports // 1000}.{supports % 1000 // 10}" if supports else ""
    evidence = f"driver {driver}{supports_text}; CUDA {major}.{minor} ({who}) needs >= {needed}{note}"
    if version_tuple(driver) >= version_tuple(needed):
        return CheckResult(Status.OK, evidence)
    fix = f"upgrade the NVIDIA driver to >= {needed.split('.')[0]}, or use an older CUDA profile (make build CUDA=...)"
    if any(_is_datacenter(g.name) for g in f.snapshot.gpus):
        fix += f"; on datacenter GPUs the cuda-compat-{major}-{minor} forward-compatibility package also works"
    return CheckResult(Status.FAIL, evidence, fix)


# --- the torch stack -----------------------------------------------------------------------

SETUP_FIX = "make setup (makes .venv from the lock), or run through the image (make RUNTIME=docker ...)"


def check_torch(f: Facts) -> CheckResult:
    if f.torch_version is None:
        return CheckResult(Status.FAIL, f"torch is not importable: {f.torch_error or 'not installed'}", "make setup")
    build = f"CUDA {f.torch_cuda} build" if f.torch_cuda else "CPU-only build"
    evidence = f"torch {f.torch_version} ({build}), sees {f.torch_device_count} CUDA device(s)"
    nvml_gpus = len(f.snapshot.gpus)
    if nvml_gpus and not f.torch_cuda:
        return CheckResult(Status.FAIL, f"{evidence}, but NVML sees {nvml_gpus} GPU(s)", SETUP_FIX)
    if nvml_gpus and not f.torch_cuda_available:
        return CheckResult(
            Status.FAIL,
            f"{evidence}: torch cannot use the {nvml_gpus} GPU(s) NVML sees",
            "check the driver check above; in Docker pass the GPUs (compose `gpus: all`)",
        )
    hidden = "CUDA_VISIBLE_DEVICES" in f.environ
    if nvml_gpus and f.torch_device_count != nvml_gpus and not hidden:
        return CheckResult(
            Status.WARN, f"{evidence}, NVML sees {nvml_gpus}", "a GPU fails CUDA init: see dmesg / nvidia-smi -q for it"
        )
    return CheckResult(Status.OK, evidence)


def _parse_arch(entry: str) -> tuple[str, tuple[int, int], str] | None:
    """'sm_86' -> ('sm', (8, 6), ''); 'compute_90' -> ('compute', (9, 0), ''); 'sm_90a' -> (..., 'a')."""
    match = re.fullmatch(r"(sm|compute)_(\d+)(\w?)", entry)
    if not match:
        return None
    digits = match.group(2)
    return match.group(1), (int(digits[:-1]), int(digits[-1])), match.group(3)


def _arch_verdict(cc: tuple[int, int], arch_list: list[str]) -> tuple[Status, str]:
    """How a GPU of capability `cc` runs this build: its own cubins, compatible ones, PTX JIT, or not at all."""
    parsed = [p for p in map(_parse_arch, arch_list) if p]
    cubins = [a for kind, a, suffix in parsed if kind == "sm" and not suffix]
    # A cubin runs on any GPU of the same major and an equal or higher minor capability.
    compatible = [a for a in cubins if a[0] == cc[0] and a[1] <= cc[1]]
    if compatible:
        best = max(compatible)
        how = "native" if best == cc else f"runs sm_{best[0]}{best[1]} cubins"
        return Status.OK, f"sm_{cc[0]}{cc[1]} {how}"
    ptx = [a for kind, a, suffix in parsed if kind == "compute" and not suffix and a <= cc]
    if ptx:
        best = max(ptx)
        return Status.WARN, f"sm_{cc[0]}{cc[1]} only by JIT from compute_{best[0]}{best[1]} PTX"
    return Status.FAIL, f"sm_{cc[0]}{cc[1]} has no kernels in this build"


def check_arch(f: Facts) -> CheckResult:
    if skip := _no_gpu(f):
        return skip
    if f.torch_version is None or not f.torch_cuda:
        return CheckResult(Status.WARN, "skipped: no CUDA build of torch to compare with", SETUP_FIX)
    verdicts = [_arch_verdict(g.compute_capability, f.arch_list) for g in f.snapshot.gpus]
    status = worst([s for s, _ in verdicts])
    evidence = "; ".join(sorted({text for _, text in verdicts})) + f" (build has: {' '.join(f.arch_list)})"
    fixes = {
        Status.OK: "",
        Status.WARN: "first use JIT-compiles kernels (slow start, cached in ~/.nv); newer CUDA profiles have them",
        Status.FAIL: "use a CUDA profile whose torch has kernels for this GPU (make build CUDA=12.8 for sm_120)",
    }
    return CheckResult(status, evidence, fixes[status])


def _torchvision_by_rule(torch_version: str) -> str:
    """The pattern the table follows from 2.1 on: torch 2.m.p pairs with torchvision 0.(m+15).p."""
    parts = version_tuple(torch_version)
    return f"0.{parts[1] + 15}.{parts[2]}" if len(parts) >= 3 and parts[0] == 2 else "?"


def check_trio(f: Facts) -> CheckResult:
    torch_v = base_version(f.dist_versions.get("torch"))
    if not torch_v:
        return CheckResult(Status.FAIL, "torch is not installed", "make setup")
    vision = base_version(f.dist_versions.get("torchvision")) or None
    audio = base_version(f.dist_versions.get("torchaudio")) or None
    evidence = f"torch {torch_v}, torchvision {vision or '-'}, torchaudio {audio or '-'}"
    nms_fix = (
        "install the matching trio (make setup); a mismatched torchvision fails with "
        "'operator torchvision::nms does not exist'"
    )
    if torch_v in TORCH_TRIOS:
        want_vision, want_audio = TORCH_TRIOS[torch_v]
        wrong = [
            f"{name} {have} (needs {want})"
            for name, have, want in (("torchvision", vision, want_vision), ("torchaudio", audio, want_audio))
            if have and have != want
        ]
        if wrong:
            return CheckResult(Status.FAIL, f"torch {torch_v} with " + ", ".join(wrong), nms_fix)
        return CheckResult(Status.OK, evidence)
    want_vision = _torchvision_by_rule(torch_v)
    if vision and vision != want_vision:
        return CheckResult(
            Status.WARN,
            f"{evidence}: torch {torch_v} is not in the trio table, and by the usual rule "
            f"torchvision should be {want_vision}",
            nms_fix,
        )
    return CheckResult(Status.OK, f"{evidence} (torch {torch_v} not in the table; torchvision fits the usual rule)")


def check_pins(f: Facts) -> CheckResult:
    if not f.pins:
        return CheckResult(
            Status.WARN,
            f"no pins read from {f.lock_path or 'requirements.txt'}",
            "run from the torchrig checkout, or set TORCHRIG_LOCK to the lock file",
        )
    checked = [(name, f.pins[name], base_version(f.dist_versions.get(name))) for name in TRIO if name in f.pins]
    wrong = [f"{name} {have or 'missing'} (lock: {pin})" for name, pin, have in checked if have != pin]
    if wrong:
        return CheckResult(Status.FAIL, "differs from the lock: " + ", ".join(wrong), SETUP_FIX)
    return CheckResult(Status.OK, "matches the lock: " + ", ".join(f"{n}=={p}" for n, p, _ in checked))


def check_nccl(f: Facts) -> CheckResult:
    if f.torch_version is None:
        return CheckResult(Status.WARN, "skipped: torch is not importable", "make setup")
    if not f.torch_cuda:
        return CheckResult(
            Status.WARN,
            "CPU-only torch build: no NCCL, multi-process runs use gloo",
            "none on a CPU machine; on a GPU box make setup installs the CUDA build",
        )
    if f.nccl_version is None:
        return CheckResult(Status.FAIL, f"torch could not report its NCCL: {f.nccl_error}", SETUP_FIX)
    pin = f.pins.get(NCCL_DIST)
    if pin is None:
        return CheckResult(
            Status.WARN,
            f"NCCL {f.nccl_version} loaded; no {NCCL_DIST} pin in the lock",
            "set TORCHRIG_LOCK to the lock this environment was made from",
        )
    evidence = f"NCCL {f.nccl_version} loaded, lock pins {NCCL_DIST}=={pin}"
    if f.nccl_version != pin:
        return CheckResult(
            Status.FAIL,
            evidence,
            "another libnccl is loaded: unset LD_LIBRARY_PATH/LD_PRELOAD entries pointing at it, or make setup",
        )
    return CheckResult(Status.OK, evidence)


# --- shared memory, IPC, ulimits -----------------------------------------------------------

# /dev/shm budget. NCCL's SHM transport (the path between GPUs when P2P is off, as on consumer
# cards) maps one ~9 MiB segment per channel per peer connection; 256 MiB per GPU leaves room
# for the rings and trees of a few channels. Below that NCCL fails at init ("Error while creating
# shared memory segment"), so it FAILs. DataLoader workers hand every batch to the trainer
# through /dev/shm too: below 1 GiB per GPU (or process) it WARNs, since a larger batch or
# more workers then dies with "bus error". A single process uses no NCCL shared memory.
NCCL_SHM_PER_GPU = 256 * MIB
SHM_PER_PROCESS = 1 * GIB


def check_shm(f: Facts) -> CheckResult:
    if f.shm_bytes is None:
        return CheckResult(Status.WARN, "no /dev/shm mounted", "mount a tmpfs at /dev/shm (docker: --shm-size 16g)")
    processes = max(gpu_count(f), 1)
    nccl_need = NCCL_SHM_PER_GPU * processes if processes > 1 else 0
    comfortable = SHM_PER_PROCESS * processes
    evidence = f"/dev/shm {gib(f.shm_bytes)} for {processes} process(es)"
    fix = "set shm_size: 16gb or ipc: host in docker-compose.yml (docker run --shm-size 16g / --ipc=host)"
    if f.shm_bytes < nccl_need:
        return CheckResult(Status.FAIL, f"{evidence}: NCCL alone needs about {gib(nccl_need)}", fix)
    if f.shm_bytes < comfortable:
        return CheckResult(Status.WARN, f"{evidence}: DataLoader workers want {gib(comfortable)}", fix)
    return CheckResult(Status.OK, f"{evidence} (>= {gib(comfortable)} wanted)")


DOCKER_DEFAULT_SHM = 64 * MIB


def check_ipc(f: Facts) -> CheckResult:
    """Docker hides the IPC mode from inside; /dev/shm's size tells it apart in practice."""
    if not f.in_container:
        return CheckResult(Status.OK, "not in a container: host IPC")
    if f.shm_bytes is None:
        return CheckResult(Status.WARN, "in a container without /dev/shm", "use ipc: host or shm_size in compose")
    # A host's /dev/shm is a tmpfs at half of RAM by default; docker's private one is 64 MiB unless shm_size is set.
    half_ram = (f.mem_total_bytes or 0) / 2
    if half_ram and abs(f.shm_bytes - half_ram) <= 0.05 * half_ram:
        return CheckResult(Status.OK, f"/dev/shm is {gib(f.shm_bytes)}, half of RAM: looks like ipc=host")
    if f.shm_bytes == DOCKER_DEFAULT_SHM:
        return CheckResult(
            Status.WARN,
            "/dev/shm is docker's default 64 MiB: private IPC without shm_size",
            "run through compose (ipc: host), or docker run --ipc=host",
        )
    return CheckResult(Status.OK, f"/dev/shm is {gib(f.shm_bytes)}: private IPC with shm_size set")


# Compose sets memlock unlimited (pinned host buffers, GPUDirect RDMA) and a 64 MiB stack, as NVIDIA's images advise.
ULIMIT_WANTS: dict[str, tuple[int | None, str]] = {
    "memlock": (None, "unlimited"),
    "stack": (64 * MIB, "64 MiB"),
}


def _limit_text(value: int | None) -> str:
    return "unlimited" if value is None else gib(value)


def check_ulimits(f: Facts) -> CheckResult:
    if not f.ulimits:
        return CheckResult(Status.WARN, "ulimits not read", "none: this platform has no resource module")
    short = []
    for name, (want, want_text) in ULIMIT_WANTS.items():
        soft = f.ulimits.get(name, [None, None])[0]
        if soft is not None and (want is None or soft < want):
            short.append(f"{name} {_limit_text(soft)} (want {want_text})")
    evidence = ", ".join(f"{n} {_limit_text(f.ulimits.get(n, [None])[0])}" for n in ULIMIT_WANTS)
    if short:
        return CheckResult(
            Status.WARN,
            "low: " + ", ".join(short),
            "run through compose (sets them), or docker run --ulimit memlock=-1 --ulimit stack=67108864",
        )
    return CheckResult(Status.OK, evidence)


# --- container, Docker, disk, CPUs ---------------------------------------------------------


def check_container(f: Facts) -> CheckResult:
    if not f.in_container:
        return CheckResult(Status.OK, "on the host (no container)")
    labels = ", ".join(f"{k.removeprefix('TORCHRIG_').lower()}={v}" for k, v in sorted(f.image_labels.items()))
    if not labels:
        return CheckResult(Status.OK, f"in a container ({f.container_evidence}), not the torchrig image")
    return CheckResult(Status.OK, f"in the torchrig image ({labels})")


def check_docker_gpu(f: Facts) -> CheckResult:
    if f.in_container:
        return CheckResult(Status.OK, "n/a inside a container")
    if not f.docker.get("probed"):
        return CheckResult(Status.OK, "Docker not probed")
    reason = f.docker.get("reason", "")
    if not f.docker.get("answers"):
        return CheckResult(
            Status.WARN,
            f"{reason}: make uses RUNTIME=local",
            "optional: Docker and the NVIDIA Container Toolkit give RUNTIME=docker (the pinned image)",
        )
    if f.docker.get("nvidia") or not f.snapshot.gpus:
        return CheckResult(Status.OK, reason + ("" if f.docker.get("nvidia") else "; no GPU, so none needed"))
    return CheckResult(
        Status.WARN,
        f"{reason}: containers will not see the GPUs",
        "install nvidia-container-toolkit, then sudo nvidia-ctk runtime configure --runtime=docker "
        "&& sudo systemctl restart docker",
    )


# Free space where runs and checkpoints go. Below 2 GiB a checkpoint of even the small
# configs can fail to write; below 20 GiB a long run's checkpoints and metrics may not fit.
DISK_FAIL_BELOW = 2 * GIB
DISK_WARN_BELOW = 20 * GIB


def check_disk(f: Facts) -> CheckResult:
    if f.disk_free_bytes is None:
        return CheckResult(Status.WARN, f"could not read free space at {f.run_dir}", "check that the path exists")
    evidence = f"{gib(f.disk_free_bytes)} free at {f.run_dir}"
    fix = "free space there, or point RUN_DIR at a larger disk"
    if f.disk_free_bytes < DISK_FAIL_BELOW:
        return CheckResult(Status.FAIL, f"{evidence} (< {gib(DISK_FAIL_BELOW)})", fix)
    if f.disk_free_bytes < DISK_WARN_BELOW:
        return CheckResult(Status.WARN, f"{evidence} (< {gib(DISK_WARN_BELOW)})", fix)
    return CheckResult(Status.OK, evidence)


CPUS_PER_PROCESS = 2  # one for the training process, at least one for its DataLoader worker


def check_cpu(f: Facts) -> CheckResult:
    nodes = len(f.numa_nodes) or 1
    affinity = [
        f"GPU{g.index}→cpus {cpu_ranges(g.cpu_affinity)}" + (f" node {g.numa_node}" if g.numa_node is not None else "")
        for g in f.snapshot.gpus
        if g.cpu_affinity
    ]
    evidence = f"{f.cpu_count} cores ({f.cpu_usable:g} usable), {nodes} NUMA node(s)"
    if affinity:
        evidence += "; " + ", ".join(affinity)
    processes = max(gpu_count(f), 1)
    if f.cpu_usable < CPUS_PER_PROCESS * processes:
        return CheckResult(
            Status.WARN,
            f"{evidence}: fewer than {CPUS_PER_PROCESS} per process",
            "give the container more CPUs (cpus: in compose), or use fewer DataLoader workers",
        )
    return CheckResult(Status.OK, evidence)


# --- PCIe and P2P --------------------------------------------------------------------------

BUSY_PCT = 50  # a GPU this busy has left its idle power state, so its link runs at full speed
# A link at a quarter of its bandwidth or less under load (x4 of x16) FAILs: without P2P every
# all-reduce goes through host memory and the slowest link sets the ring's pace, so the box
# cannot reach its scaling figures; it is a seating, riser or slot fault to fix. Anything between
# (Gen3 on a Gen4 card, x8 of x16) WARNs: slower, and often a BIOS or slot-sharing choice.
PCIE_FAIL_AT_OR_BELOW = 0.25


def _link(gen: int | None, width: int | None) -> str:
    return f"Gen{gen} x{width}"


def _pcie_verdict(g: GpuInfo, under_load: bool) -> tuple[Status, str] | None:
    if None in (g.pcie_gen_current, g.pcie_gen_max, g.pcie_width_current, g.pcie_width_max):
        return None
    now = PCIE_LANE_GBPS.get(g.pcie_gen_current, 0) * g.pcie_width_current
    best = PCIE_LANE_GBPS.get(g.pcie_gen_max, 0) * g.pcie_width_max
    link = (
        f"GPU{g.index} {_link(g.pcie_gen_current, g.pcie_width_current)} of {_link(g.pcie_gen_max, g.pcie_width_max)}"
    )
    if best and now >= best:
        if g.pcie_width_max < 8:
            return Status.WARN, f"{link}: the slot gives only x{g.pcie_width_max}"
        return Status.OK, ""
    busy = under_load and (g.utilization_pct or 0) >= BUSY_PCT
    if busy:
        share = now / best if best else 0
        status = Status.FAIL if share <= PCIE_FAIL_AT_OR_BELOW else Status.WARN
        return status, f"{link} under load ({g.utilization_pct}% busy, {share:.0%} of its bandwidth)"
    if g.pcie_width_current < g.pcie_width_max:
        return Status.WARN, f"{link} while idle: width is not an idle downshift"
    return Status.OK, ""


def check_pcie(f: Facts) -> CheckResult:
    if skip := _no_gpu(f):
        return skip
    under_load = f.pcie_load == "ran"
    verdicts = [v for g in f.snapshot.gpus if (v := _pcie_verdict(g, under_load))]
    if not verdicts:
        return CheckResult(Status.WARN, "NVML does not report PCIe links here", "none (SXM/virtual GPUs may not)")
    status = worst([s for s, _ in verdicts])
    findings = [text for s, text in verdicts if s is not Status.OK]
    when = "under load" if under_load else f"idle, load {f.pcie_load}"
    if status is Status.OK:
        links = sorted({_link(g.pcie_gen_current, g.pcie_width_current) for g in f.snapshot.gpus})
        normal = "" if under_load else "; an idle Gen downshift is normal"
        return CheckResult(Status.OK, f"{len(f.snapshot.gpus)} link(s) at {', '.join(links)} ({when}){normal}")
    fixes = {
        Status.WARN: "check the slot (x8/x4 wiring, shared lanes) and the BIOS PCIe Gen; rerun with the GPUs free",
        Status.FAIL: "reseat the GPU or move it to a CPU-attached x16 slot; check the riser and BIOS bifurcation",
    }
    return CheckResult(status, "; ".join(findings), fixes[status])


def topology_text(snapshot: Snapshot) -> str:
    """'topology 0-1 NVLINKx4, 0-2 PHB' (the P2P status of each pair is in the decision's reason)."""
    links = [f"{p.a}-{p.b} {f'NVLINKx{p.nvlink_links}' if p.nvlink_links else p.topology}" for p in snapshot.pairs]
    return "topology " + (", ".join(links) or "unknown")


def check_p2p(f: Facts) -> CheckResult:
    if skip := _no_gpu(f):
        return skip
    if len(f.snapshot.gpus) < 2:
        return CheckResult(Status.OK, "one GPU: no peer pairs")
    decision = P2PDecision.from_dict(f.p2p) if f.p2p else decide_p2p(f.snapshot, f.environ, None)
    how = "copies verified" if f.p2p else "NVML only, no peer copy run"
    verdict = {True: "P2P off", False: "P2P on", None: "P2P undecided"}[decision.disable]
    evidence = f"{topology_text(f.snapshot)}; {verdict} ({decision.source}, {how}): {decision.reason}"
    if decision.source == "user":
        usable = [p["usable"] for p in decision.pairs]
        if decision.disable and usable and all(usable):
            return CheckResult(Status.WARN, evidence, f"unset {DISABLE_VAR}: every pair can do P2P, and it is faster")
        if not decision.disable and not all(usable):
            return CheckResult(
                Status.WARN,
                evidence,
                f"unset {DISABLE_VAR} and let the rig decide: P2P on these pairs can hang NCCL or copy zeros",
            )
    return CheckResult(Status.OK, evidence)


Check = Callable[[Facts], CheckResult]

# The doctor runs these in order. The name is what the report and the JSON call the check.
CHECKS: list[tuple[str, Check]] = [
    ("gpus", check_gpus),
    ("driver", check_driver),
    ("torch", check_torch),
    ("arch", check_arch),
    ("trio", check_trio),
    ("pins", check_pins),
    ("nccl", check_nccl),
    ("shm", check_shm),
    ("ipc", check_ipc),
    ("ulimits", check_ulimits),
    ("container", check_container),
    ("docker-gpu", check_docker_gpu),
    ("disk", check_disk),
    ("cpu", check_cpu),
    ("pcie", check_pcie),
    ("p2p", check_p2p),
]


@dataclass(frozen=True)
class Outcome:
    name: str
    status: Status
    evidence: str
    fix: str


def run_checks(facts: Facts, checks: list[tuple[str, Check]] = CHECKS) -> list[Outcome]:
    """Every check's outcome. A check that raises is a bug in it, reported as a WARN so the rest still run."""
    outcomes = []
    for name, check in checks:
        try:
            result = check(facts)
        except Exception as exc:
            result = CheckResult(
                Status.WARN, f"the check itself failed: {type(exc).__name__}: {exc}", "report this as a torchrig bug"
            )
        outcomes.append(Outcome(name, result.status, result.evidence, result.fix))
    return outcomes
