"""Machine facts: `Facts`, everything the doctor's checks and a run's manifest look at, and its gathering.

gather_facts reads the machine once (torch, NVML, the lock, /dev/shm, ulimits, the container, Docker,
disk, CPUs, NUMA, the environment) into one `Facts`; env/machine/checks.py judges it, env/machine/doctor.py reports it,
env/records/manifest.py records it. `Facts` is plain JSON-friendly data, so tests build it by hand or load it
from tests/fixtures/doctor/*.json.

The image is known by the variables the Dockerfile sets (IMAGE_VARS): TORCHRIG_VERSION,
TORCHRIG_CUDA_PROFILE (which also enters the driver check), TORCHRIG_GIT_COMMIT and
TORCHRIG_RUNTIME, plus TORCHRIG_IMAGE (the tag) and TORCHRIG_IMAGE_ID where the launcher
passes them. Pins are read from the lock the environment was made from (env.rig.profiles.lock_path).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import re
import resource
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from env.machine.nvml import Snapshot, read_snapshot
from env.machine.p2p import decide_p2p, torch_copy_check
from env.rig.docker import engine_status
from env.rig.profiles import NCCL_DIST, TRIO, dist_version, loaded_nccl, lock_path, read_pins

DISTRIBUTIONS = (*TRIO, NCCL_DIST, "nvidia-ml-py", "numpy")
ENV_PREFIXES = ("NCCL_", "TORCH_", "PYTORCH_", "CUDA_")
CGROUP_CONTAINER_WORDS = ("docker", "containerd", "kubepods", "libpod", "lxc")
CONTAINER_FILES = {"/.dockerenv": "docker", "/run/.containerenv": "podman"}
IMAGE_VARS = (
    "TORCHRIG_VERSION",
    "TORCHRIG_CUDA_PROFILE",
    "TORCHRIG_GIT_COMMIT",
    "TORCHRIG_RUNTIME",
    "TORCHRIG_IMAGE",
    "TORCHRIG_IMAGE_ID",
)
LOAD_SECONDS = 1.5


@dataclass
class Facts:
    """Everything the checks look at. Plain JSON-friendly fields, so it round-trips through a file."""

    snapshot: Snapshot = field(default_factory=Snapshot)
    pcie_load: str = "not run"  # "ran", or "not run: why": was the snapshot read while the GPUs were busy?
    gpus_requested: int | None = None  # --gpus N: how many GPUs (or CPU processes) the run will use
    python_version: str = ""
    platform: str = ""
    # torch, as imported; torch_error is set (and the rest empty) when `import torch` failed.
    torch_version: str | None = None
    torch_error: str | None = None
    torch_cuda: str | None = None  # torch.version.cuda; None for a CPU-only build
    torch_cuda_available: bool = False
    torch_device_count: int = 0
    arch_list: list[str] = field(default_factory=list)  # sm_XY / compute_XY the build carries
    nccl_version: str | None = None  # the NCCL torch loaded at run time, "2.20.5"
    nccl_error: str | None = None
    # Installed distribution versions (importlib.metadata), None where not installed.
    dist_versions: dict[str, str | None] = field(default_factory=dict)
    # Pins from the lock (requirements.txt or $TORCHRIG_LOCK): normalised name -> version.
    pins: dict[str, str] = field(default_factory=dict)
    lock_path: str = ""
    shm_bytes: int | None = None  # size of /dev/shm; None when there is none
    shm_mount_options: str = ""
    mem_total_bytes: int | None = None
    ulimits: dict[str, list[int | None]] = field(default_factory=dict)  # name -> [soft, hard], None = unlimited
    in_container: bool = False
    container_evidence: str = ""
    image_labels: dict[str, str] = field(default_factory=dict)  # the image's TORCHRIG_* variables (IMAGE_VARS)
    # On the host: env.rig.docker.engine_status() as a dict (answers, nvidia, reason), and probed.
    docker: dict[str, Any] = field(default_factory=dict)
    run_dir: str = ""
    disk_free_bytes: int | None = None
    cpu_count: int = 0
    cpu_usable: float = 0.0  # affinity mask, capped by the cgroup CPU quota
    numa_nodes: dict[str, str] = field(default_factory=dict)  # node id -> its CPU list, "0-15"
    environ: dict[str, str] = field(default_factory=dict)  # NCCL_*, TORCH_*, PYTORCH_*, CUDA_* variables
    # decide_p2p's answer with real peer copies (P2PDecision.to_dict()); None when no GPU work was allowed.
    p2p: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Facts:
        names = {f.name for f in dataclasses.fields(cls)} - {"snapshot"}
        known = {k: v for k, v in data.items() if k in names}
        return cls(snapshot=Snapshot.from_dict(data.get("snapshot", {})), **known)


def torch_facts() -> dict[str, Any]:
    try:
        import torch
    except Exception as exc:  # ImportError, or a broken install raising OSError for a missing .so
        return {"torch_error": f"{type(exc).__name__}: {exc}"}
    facts: dict[str, Any] = {
        "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torch_cuda_available": torch.cuda.is_available(),
    }
    facts["torch_device_count"] = torch.cuda.device_count() if facts["torch_cuda_available"] else 0
    # get_arch_list() is empty without a usable GPU; the build's list is there all the same.
    arch_flags = getattr(torch._C, "_cuda_getArchFlags", None)
    facts["arch_list"] = (arch_flags() or "").split() if arch_flags else torch.cuda.get_arch_list()
    if torch.version.cuda:
        try:
            # (major, minor, patch), with a suffix string after them on some builds
            facts["nccl_version"] = loaded_nccl(torch)
        except Exception as exc:
            facts["nccl_error"] = f"{type(exc).__name__}: {exc}"
    return facts


def dist_versions() -> dict[str, str | None]:
    return {name: dist_version(name) for name in DISTRIBUTIONS}


def shm_facts() -> dict[str, Any]:
    try:
        stats = os.statvfs("/dev/shm")
    except OSError:
        return {"shm_bytes": None}
    options = ""
    try:
        for line in Path("/proc/self/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) >= 4 and fields[1] == "/dev/shm":
                options = fields[3]
    except OSError:
        pass
    return {"shm_bytes": stats.f_blocks * stats.f_frsize, "shm_mount_options": options}


def mem_total_bytes() -> int | None:
    try:
        match = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def ulimits() -> dict[str, list[int | None]]:
    limits = {"memlock": resource.RLIMIT_MEMLOCK, "stack": resource.RLIMIT_STACK, "nofile": resource.RLIMIT_NOFILE}
    return {
        name: [None if v == resource.RLIM_INFINITY else v for v in resource.getrlimit(which)]
        for name, which in limits.items()
    }


def container_facts() -> tuple[bool, str]:
    for path, engine in CONTAINER_FILES.items():
        if Path(path).exists():
            return True, f"{path}: {engine}"
    engine = os.environ.get("container")  # noqa: SIM112 (podman and systemd-nspawn set it in lower case)
    if engine:
        return True, f"$container={engine}"
    try:
        cgroup = Path("/proc/1/cgroup").read_text()
    except OSError:
        cgroup = ""
    for word in CGROUP_CONTAINER_WORDS:
        if word in cgroup:
            return True, f"/proc/1/cgroup mentions {word}"
    return False, ""


def image_labels() -> dict[str, str]:
    return {name: os.environ[name] for name in IMAGE_VARS if os.environ.get(name)}


def docker_facts() -> dict[str, Any]:
    """The host's Docker engine: does it answer, can it hand GPUs to containers (the runtime's own probe)."""
    return {"probed": True, **dataclasses.asdict(engine_status())}


def disk_free(run_dir: Path) -> int | None:
    """Free bytes on the disk that holds run_dir, or where it will be created."""
    probe = run_dir.resolve()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def _cgroup_cpu_quota() -> float | None:
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 else None


def cpu_facts() -> tuple[int, float]:
    count = os.cpu_count() or 1
    usable: float = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else count
    quota = _cgroup_cpu_quota()
    return count, min(usable, quota) if quota else usable


def numa_nodes() -> dict[str, str]:
    nodes = {}
    for node in sorted(Path("/sys/devices/system/node").glob("node[0-9]*")):
        try:
            nodes[node.name.removeprefix("node")] = (node / "cpulist").read_text().strip()
        except OSError:
            continue
    return nodes


def environ_facts() -> dict[str, str]:
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES)}


def _one_line(exc: Exception) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"


def read_snapshot_under_load(seconds: float = LOAD_SECONDS) -> tuple[Snapshot, str]:
    """Read NVML while every visible GPU runs matmuls and host->device copies.

    An idle GPU drops its PCIe link to Gen1 to save power; reading the link under load tells
    that normal downshift from a link that trained narrow or slow. Returns the snapshot and
    "ran", or an idle snapshot and "not run: why".
    """
    try:
        import torch
    except Exception as exc:
        return read_snapshot(), f"not run: torch unavailable ({type(exc).__name__})"
    if not torch.cuda.is_available():
        return read_snapshot(), "not run: torch sees no CUDA device"
    # Contexts and buffers first, outside the timed window: creating a context per GPU takes a while.
    try:
        work = [
            (torch.randn(2048, 2048, device=device), torch.empty(16 * 2**20, dtype=torch.uint8, pin_memory=True))
            for device in (torch.device("cuda", i) for i in range(torch.cuda.device_count()))
        ]
    except Exception as exc:  # out of memory on a busy GPU, a failing GPU: report, do not crash the doctor
        return read_snapshot(), f"not run: {_one_line(exc)}"
    stop = threading.Event()
    failures: list[str] = []

    def keep_busy() -> None:
        try:
            while not stop.is_set():
                for matrix, host in work:
                    for _ in range(8):
                        matrix @ matrix
                    host.to(matrix.device, non_blocking=True)
                for matrix, _ in work:
                    torch.cuda.synchronize(matrix.device)
        except Exception as exc:
            failures.append(_one_line(exc))

    worker = threading.Thread(target=keep_busy, daemon=True)
    worker.start()
    time.sleep(seconds)  # NVML's utilisation is an average over the last fraction of a second
    snapshot = read_snapshot()
    stop.set()
    worker.join()
    if failures:
        return snapshot, f"not run: load failed ({failures[0]})"
    return snapshot, "ran"


def gather_facts(
    run_dir: Path | str = "runs",
    *,
    gpus_requested: int | None = None,
    gpu_load: bool = False,
    probe_docker: bool = True,
) -> Facts:
    """Everything the checks need, read once. Never raises for a missing GPU, driver or torch.

    gpu_load allows a few seconds of GPU work (the doctor's default; a run's manifest skips
    it): PCIe links are read under load and P2P is decided with real peer copies.
    probe_docker asks the host's Docker engine whether it can run GPU containers (with a timeout).
    """
    facts = Facts(**torch_facts())
    facts.environ = environ_facts()
    if gpu_load and facts.torch_cuda_available:
        facts.snapshot, facts.pcie_load = read_snapshot_under_load()
        facts.p2p = decide_p2p(facts.snapshot, facts.environ, torch_copy_check).to_dict()
    else:
        facts.snapshot = read_snapshot()
        facts.pcie_load = "not run: " + ("torch sees no CUDA device" if gpu_load else "not asked")
    facts.gpus_requested = gpus_requested
    facts.python_version = platform.python_version()
    facts.platform = platform.platform()
    facts.dist_versions = dist_versions()
    lock = lock_path()
    facts.lock_path, facts.pins = str(lock), read_pins(lock)
    for key, value in shm_facts().items():
        setattr(facts, key, value)
    facts.mem_total_bytes = mem_total_bytes()
    facts.ulimits = ulimits()
    facts.in_container, facts.container_evidence = container_facts()
    facts.image_labels = image_labels()
    facts.docker = docker_facts() if probe_docker and not facts.in_container else {"probed": False}
    facts.run_dir = str(run_dir)
    facts.disk_free_bytes = disk_free(Path(run_dir))
    facts.cpu_count, facts.cpu_usable = cpu_facts()
    facts.numa_nodes = numa_nodes()
    return facts
