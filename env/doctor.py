"""`make doctor` / `python -m env.doctor`: is this box healthy for the rig?

All facts are gathered first into one `Facts` (gather_facts), then the checks in
env/checks.py (a table of pure functions) judge them. The report is a table of
status, check and evidence, with the fix under each row that is not OK.

    python -m env.doctor [--json PATH] [--gpus N] [--run-dir DIR] [--no-load]

Exit status: 0 when no check FAILs, 1 when one does, 2 for bad input.

--json PATH writes a machine-readable report with a stable schema:

    {"schema": 1,
     "worst": "OK" | "WARN" | "FAIL",
     "checks": [{"name": str, "status": "OK" | "WARN" | "FAIL", "evidence": str, "fix": str}, ...],
     "facts": {...}}        # Facts.to_dict(): what the checks were given

Only "facts" may grow new keys within schema 1.

The image is known by the variables the Dockerfile sets (IMAGE_VARS): TORCHRIG_VERSION,
TORCHRIG_CUDA_PROFILE (which also enters the driver check), TORCHRIG_GIT_COMMIT and
TORCHRIG_RUNTIME, plus TORCHRIG_IMAGE (the tag) and TORCHRIG_IMAGE_ID where the launcher
passes them. Pins are compared with the lock the environment was made from: $TORCHRIG_LOCK
when set, else the lock of the image's CUDA profile, else requirements.txt (the local .venv's).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import resource
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from env.atomic import write_text_atomically
from env.checks import CHECKS, Facts, Outcome, Status, run_checks, worst
from env.cli import ArgumentParser, UserError, count_arg, run_cli
from env.docker import engine_status
from env.nvml import Snapshot, read_snapshot
from env.p2p import decide_p2p, torch_copy_check
from env.profiles import UnknownProfile, dist_version, normalise_name, profile

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = 1
DISTRIBUTIONS = ("torch", "torchvision", "torchaudio", "nvidia-nccl-cu12", "nvidia-ml-py", "numpy")
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


# --- facts ---------------------------------------------------------------------------------


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
            facts["nccl_version"] = ".".join(str(part) for part in torch.cuda.nccl.version()[:3])
        except Exception as exc:
            facts["nccl_error"] = f"{type(exc).__name__}: {exc}"
    return facts


def dist_versions() -> dict[str, str | None]:
    return {name: dist_version(name) for name in DISTRIBUTIONS}


def read_pins(lock: Path) -> dict[str, str]:
    """name==version lines of a pip lock (hashes, markers and comments ignored)."""
    try:
        text = lock.read_text()
    except OSError:
        return {}
    pins = {}
    for match in re.finditer(r"^([A-Za-z0-9][A-Za-z0-9_.\-]*)==([^\s;\\]+)", text, re.MULTILINE):
        pins.setdefault(normalise_name(match.group(1)), match.group(2))
    return pins


def lock_path() -> Path:
    if os.environ.get("TORCHRIG_LOCK"):
        return Path(os.environ["TORCHRIG_LOCK"])
    cuda_profile = os.environ.get("TORCHRIG_CUDA_PROFILE")
    if cuda_profile:
        try:
            return ROOT / profile(cuda_profile).lock
        except UnknownProfile:
            pass  # an image from a newer checkout: fall back to the default lock, the pins check will say so
    return ROOT / "requirements.txt"


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


# --- report --------------------------------------------------------------------------------


def exit_code(outcomes: list[Outcome]) -> int:
    return 1 if worst([o.status for o in outcomes]) is Status.FAIL else 0


def report_dict(facts: Facts, outcomes: list[Outcome]) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "worst": worst([o.status for o in outcomes]).value,
        "checks": [{"name": o.name, "status": o.status.value, "evidence": o.evidence, "fix": o.fix} for o in outcomes],
        "facts": facts.to_dict(),
    }


def render_report(facts: Facts, outcomes: list[Outcome]) -> str:
    counts = {s: sum(o.status is s for o in outcomes) for s in Status}
    lines = [f"torchrig doctor: {len(outcomes)} checks, " + ", ".join(f"{n} {s.value}" for s, n in counts.items())]
    if not facts.snapshot.gpus:
        why = facts.snapshot.error or "NVML sees no GPU"
        lines.append(f"no GPU here ({why}): GPU checks are WARN; a CPU-only machine is a valid place to run")
    width = max(len(o.name) for o in outcomes) + 2
    lines.append(f"{'STATUS':<6}  {'CHECK':<{width}}EVIDENCE")
    for o in outcomes:
        lines.append(f"{o.status.value:<6}  {o.name:<{width}}{o.evidence}")
        if o.status is not Status.OK and o.fix:
            lines.append(f"{'':<6}  {'':<{width}}fix: {o.fix}")
    result = worst([o.status for o in outcomes])
    lines.append(f"result: {result.value} (exit {exit_code(outcomes)})")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m env.doctor", description="Check this box for the rig.")
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON (schema 1) here")
    parser.add_argument(
        "--gpus", type=count_arg("--gpus"), metavar="N", help="GPUs (or CPU processes) the runs will use"
    )
    parser.add_argument("--run-dir", default="runs", metavar="DIR", help="where runs and checkpoints go (disk check)")
    parser.add_argument(
        "--no-load",
        action="store_true",
        help="no GPU work: read PCIe links idle, decide P2P from NVML without peer copies",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, facts: Facts | None = None) -> int:
    """Run the doctor; `facts` replaces gathering (tests inject recorded facts)."""
    args = parse_args(argv)
    if facts is None:
        facts = gather_facts(args.run_dir, gpus_requested=args.gpus, gpu_load=not args.no_load)
    outcomes = run_checks(facts, CHECKS)
    print(render_report(facts, outcomes), flush=True)
    if args.json:
        path = Path(args.json)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomically(path, json.dumps(report_dict(facts, outcomes), indent=2) + "\n")
        except OSError as exc:
            raise UserError(f"cannot write --json {path}: {exc.strerror}; choose a writable path") from None
    return exit_code(outcomes)


if __name__ == "__main__":
    run_cli("doctor", main)
