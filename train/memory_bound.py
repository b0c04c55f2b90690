"""One bound on what a model needs, checked against the memory actually available, before anything is built.

Wherever a model is built (make train's launcher, make eval, make sample and make export of a run or
an export, train.init_from's source: train/weights.py), its needs are figured from the config alone,
and a model that cannot fit is refused in one line with the bytes needed and available, before a
module is built or a byte allocated. The figures, each from the model's spec (train/models/spec.py):

- parameters: count_params x bytes per parameter: 16 to train (fp32 weights and gradients, AdamW's
  two moments; FSDP shards them over the world), 8 to read (the fp32 model and the state dict it is
  loaded from);
- modules: count_modules x MODULE_BYTES: each nn.Module is Python objects of its own (a config of
  millions of tiny experts needs gigabytes before any weight exists, and hours to build);
- activations: the spec's numbers per sample (a lower bound: tensors its forward certainly holds)
  x samples x bytes per number (2 under bf16/fp16 autocast, else 4).

Available: for the host, the least of MemAvailable (/proc/meminfo), every cgroup memory limit on the
way up from this process's cgroup less what that cgroup uses (v2 memory.max - memory.current, v1
memory.limit_in_bytes - memory.usage_in_bytes, page cache that can be dropped not counted as used:
what Docker's --memory, Kubernetes limits and Slurm's cgroup plugin set), and Slurm's
SLURM_MEM_PER_NODE (--mem); for a GPU, its free memory. Every term is a floor of the real need, so
the bound refuses only what cannot fit; `make plan` (issue 18) is the full planner and can reuse
`Need` and `available_host_bytes`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from train.config import ModelConfig, RunConfig
from train.errors import ConfigError
from train.models import get_spec

# Bytes one nn.Module costs before any weight: measured as the resident-set growth per module while
# building DeepSeek MoE layers of 20,000 and 80,000 one-wide experts (3,231 and 3,194 bytes; torch
# 2.4.1, CPython 3.11, CPU); 3,000 keeps the figure a floor.
MODULE_BYTES = 3_000
TRAINING_BYTES_PER_PARAM = 16
READING_BYTES_PER_PARAM = 8


@dataclass(frozen=True)
class Need:
    """Bytes a model needs, by kind; `device` on the device that computes, `modules` always in host memory."""

    parameters: int
    activations: int
    modules: int
    bytes_per_param: int

    @property
    def device(self) -> int:
        return self.parameters + self.activations

    def line(self) -> str:
        return (
            f"parameters {_gib(self.parameters)} ({self.bytes_per_param} bytes each), activations at least "
            f"{_gib(self.activations)}, modules {_gib(self.modules)}"
        )


def _gib(count: float) -> str:
    return f"{count / 2**30:,.1f} GiB"


def bytes_per_number(precision: str, on_gpu: bool) -> int:
    """Activation bytes per number: 2 under bf16/fp16 autocast (auto is bf16 on a GPU), else 4."""
    return 2 if precision in ("bf16", "fp16") or (precision == "auto" and on_gpu) else 4


def modules_of(model: ModelConfig) -> int:
    spec = get_spec(model.arch)
    return spec.count_modules(model) if spec.count_modules is not None else 0


def activations_of(model: ModelConfig, seq_len: int, samples: int, training: bool, number_bytes: int) -> int:
    spec = get_spec(model.arch)
    if spec.activations is None:
        return 0
    return int(spec.activations(model, seq_len, training) * samples * number_bytes)


def training_need(cfg: RunConfig, world: int, on_gpu: bool) -> Need:
    """What one training worker needs: its share of the training state, its micro-batch's activations, its modules."""
    params = get_spec(cfg.model.arch).count_params(cfg.model).total
    shards = world if cfg.train.strategy == "fsdp" else 1
    number = bytes_per_number(cfg.train.precision, on_gpu)
    return Need(
        parameters=params * TRAINING_BYTES_PER_PARAM // shards,
        activations=activations_of(cfg.model, cfg.data.seq_len, cfg.train.micro_batch, True, number),
        modules=modules_of(cfg.model) * MODULE_BYTES,
        bytes_per_param=TRAINING_BYTES_PER_PARAM // shards,
    )


def reading_need(model: ModelConfig, seq_len: int, samples: int, on_gpu: bool = False) -> Need:
    """What reading weights into a model needs (eval, sample, export, init_from): the fp32 model and (in host
    memory beside it) the state dict, the forward of `samples` sequences of seq_len tokens (or images) without
    gradients, the modules. On a GPU only the model counts there."""
    per_param = READING_BYTES_PER_PARAM // 2 if on_gpu else READING_BYTES_PER_PARAM
    params = get_spec(model.arch).count_params(model).total
    return Need(
        parameters=params * per_param,
        activations=activations_of(model, seq_len, samples, False, 4),
        modules=modules_of(model) * MODULE_BYTES,
        bytes_per_param=per_param,
    )


# ------------------------------------------------------------------------------------------ available


def _read_number(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None  # "max" (v2 unlimited) and anything odd: no limit here


def _reclaimable(directory: Path, key: str) -> int:
    """Page cache the kernel drops before it fails an allocation (memory.stat's inactive file pages)."""
    try:
        for line in (directory / "memory.stat").read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except (OSError, UnicodeDecodeError):
        pass
    return 0


def _cgroup_dirs(root: Path) -> list[tuple[Path, int]]:
    """The memory cgroup directories of this process and their ancestors, with their version (1 or 2)."""
    try:
        membership = (root / "proc/self/cgroup").read_text().splitlines()
        mounts = (root / "proc/self/mountinfo").read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    paths = {}
    for line in membership:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and not controllers:
            paths[2] = path
        elif "memory" in controllers.split(","):
            paths[1] = path
    found: list[tuple[Path, int]] = []
    for line in mounts:
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        mount_root, mount_point = fields[3], fields[4]
        fstype, _, options = line.split(" - ", 1)[1].partition(" ")
        version = (
            2 if fstype == "cgroup2" else 1 if fstype == "cgroup" and "memory" in options.split()[-1].split(",") else 0
        )
        if version not in paths:
            continue
        own = paths[version]
        relative = os.path.relpath(own, mount_root) if own.startswith(mount_root) else "."
        directory = root / mount_point.lstrip("/") / ("" if relative == "." else relative)
        base = root / mount_point.lstrip("/")
        if not directory.is_dir():  # a namespaced container sees its own cgroup at the mount's root
            directory = base
        while True:
            found.append((directory, version))
            if directory == base or base not in directory.parents:
                break
            directory = directory.parent
    return found


def cgroup_available(root: Path = Path("/")) -> tuple[int, str] | None:
    """The least (limit - usage) over this process's memory cgroups and their ancestors, with where; None: no limit."""
    best: tuple[int, str] | None = None
    for directory, version in _cgroup_dirs(root):
        if version == 2:
            limit, used = _read_number(directory / "memory.max"), _read_number(directory / "memory.current")
            cache = _reclaimable(directory, "inactive_file")
            name = "memory.max"
        else:
            limit = _read_number(directory / "memory.limit_in_bytes")
            used = _read_number(directory / "memory.usage_in_bytes")
            cache = _reclaimable(directory, "total_inactive_file")
            name = "memory.limit_in_bytes"
        if limit is None or limit >= 2**62:  # v1 writes "unlimited" as a page-rounded 2^63 - 1
            continue
        left = max(0, limit - max(0, (used or 0) - cache))
        if best is None or left < best[0]:
            best = (left, f"the cgroup limit ({name} {_gib(limit)} in {directory})")
    return best


def available_host_bytes(root: Path = Path("/")) -> tuple[int, str]:
    """Host memory this process may still use, and what set the figure (see the module docstring)."""
    candidates: list[tuple[int, str]] = []
    try:
        for line in (root / "proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                candidates.append((int(line.split()[1]) * 1024, "this machine's available memory (MemAvailable)"))
    except (OSError, UnicodeDecodeError, ValueError, IndexError):
        pass
    limited = cgroup_available(root)
    if limited is not None:
        candidates.append(limited)
    slurm = os.environ.get("SLURM_MEM_PER_NODE", "")
    if slurm.isdigit():  # megabytes, as sbatch --mem gives it
        candidates.append((int(slurm) * 2**20, f"the Slurm job's memory (--mem={slurm}M)"))
    if not candidates:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's memory"
    return min(candidates)


def available_gpu_bytes(index: int = 0) -> tuple[int, str]:
    import torch

    free, _ = torch.cuda.mem_get_info(index)
    return free, f"GPU {index}'s free memory"


# ------------------------------------------------------------------------------------------ the check


def check_need(need: Need, what: str, fix: str, *, workers: int = 1, on_gpu: bool = False) -> None:
    """Refuse, in one line, a need that the memory available cannot hold.

    workers: processes on this host with this need each. on_gpu: parameters and activations live on
    each worker's GPU, modules in host memory; else everything is host memory.
    """
    host_available, host_where = available_host_bytes()
    host_need = need.modules * workers + (0 if on_gpu else need.device * workers)
    if host_need > host_available:
        each = f" ({workers} processes)" if workers > 1 else ""
        raise ConfigError(
            f"{what} needs about {_gib(host_need)} of host memory{each}: {need.line()}; {host_where} leaves "
            f"{_gib(host_available)}; {fix}"
        )
    if on_gpu:
        gpu_available, gpu_where = available_gpu_bytes()
        if need.device > gpu_available:
            raise ConfigError(
                f"{what} needs about {_gib(need.device)} per GPU: {need.line()}; {gpu_where} is "
                f"{_gib(gpu_available)}; {fix}"
            )
