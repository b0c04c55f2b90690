"""nccl-test's flags, every one checked into `Options` before anything starts (by the launcher, and by each worker)."""

from __future__ import annotations

import argparse
import difflib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from env.common.cli import ArgumentParser, UserError, check_workers, count_arg, real_arg
from env.rig.launch import Nodes, add_node_arguments, nodes_from_args

DEFAULT_SIZES = {"cuda": "8:1G:2", "cpu": "8:4M:4"}
# gloo on CPU copies each message through the host at well under a GB/s and holds several copies
# per rank: beyond this a run takes minutes and gigabytes, and says nothing about GPU links.
CPU_MAX_SIZE = 64 << 20
SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
JSON_NAME = "nccl_test.json"
DESCRIPTION = "`make nccl-test`: collective bandwidth and correctness on the torch stack training uses, with a verdict."


@dataclass
class Options:
    gpus: int
    sizes: list[int]
    dtype: Any  # env.nccl.collectives.Dtype; imported with torch, lazily
    ops: list[str]
    min_busbw: float | None
    iters: int
    warmup: int
    run_dir: Path  # manifest.json, and the JSON record unless --json names another path
    json_path: Path
    first_timeout: float
    launch_overhead: bool
    nodes: Nodes


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m env.nccl.launch", description=DESCRIPTION)
    parser.add_argument(
        "--gpus", type=count_arg("--gpus"), help="workers: default every visible GPU, or 1 CPU process on gloo"
    )
    parser.add_argument("--sizes", help="min:max:factor with K/M/G suffixes (default 8:1G:2 on GPU, 8:4M:4 on CPU)")
    parser.add_argument("--dtype", default="fp32", help="fp32 (default), bf16 or fp16")
    parser.add_argument("--ops", default="all_reduce", help="comma list of collectives, or all (default all_reduce)")
    parser.add_argument(
        "--min-busbw",
        type=real_arg("--min-busbw"),
        help="GB/s the large-message busbw must reach (overrides the links)",
    )
    parser.add_argument("--iters", type=count_arg("--iters"), default=20, help="timed calls per size (default 20)")
    parser.add_argument(
        "--warmup", type=count_arg("--warmup"), default=5, help="untimed calls per size first (default 5)"
    )
    parser.add_argument("--json", help=f"the JSON record's path (default RUN_DIR/{JSON_NAME})")
    parser.add_argument("--run-dir", help="directory for the JSON record when --json is not given")
    parser.add_argument(
        "--first-timeout", type=real_arg("--first-timeout"), default=30.0, help="seconds the first collective may take"
    )
    parser.add_argument("--launch-overhead", action="store_true", help="benchmark: time per 8 B call, queued vs waited")
    add_node_arguments(parser)
    return parser


def parse_size(text: str) -> int:
    """A size such as 8, 64K or 1G (binary units, as nccl-tests) in bytes."""
    match = re.fullmatch(r"(\d+)([KMG]?)B?", text.strip(), re.IGNORECASE)
    if match is None or int(match.group(1)) == 0:
        raise UserError(f"'{text}' is not a size; use a positive number with an optional K, M or G, e.g. 8:1G:2")
    return int(match.group(1)) * SIZE_UNITS[match.group(2).upper()]


def parse_sizes(spec: str) -> list[int]:
    """nccl-tests' min:max:factor (or min:max, factor 2, or one size) -> the sizes in bytes."""
    parts = spec.split(":")
    if len(parts) > 3:
        raise UserError(f"--sizes {spec}: write min:max:factor, e.g. 8:1G:2")
    try:
        low = parse_size(parts[0])
        high = parse_size(parts[1]) if len(parts) > 1 else low
    except UserError as exc:
        raise UserError(f"--sizes {spec}: {exc}") from None
    factor_text = parts[2].strip() if len(parts) > 2 else "2"
    if not factor_text.isdigit() or int(factor_text) < 2:
        raise UserError(f"--sizes {spec}: the factor '{factor_text}' must be a whole number of at least 2")
    if low > high:
        raise UserError(f"--sizes {spec}: min {parts[0]} is larger than max {parts[1]}; write min:max:factor")
    sizes = [low]
    while sizes[-1] * int(factor_text) <= high:
        sizes.append(sizes[-1] * int(factor_text))
    return sizes


def parse_ops(spec: str, known: list[str]) -> list[str]:
    names = [name.strip() for name in spec.split(",") if name.strip()]
    if not names:
        raise UserError(f"--ops is empty; choose from {', '.join(known)}, or all")
    if "all" in names:
        return list(known)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise UserError(f"unknown op '{name}' in --ops; {hint}choose from {', '.join(known)}, or all")
    return list(dict.fromkeys(names))


def format_size(nbytes: int) -> str:
    for unit in ("G", "M", "K"):
        if nbytes >= SIZE_UNITS[unit] and nbytes % SIZE_UNITS[unit] == 0:
            return f"{nbytes // SIZE_UNITS[unit]}{unit}"
    return f"{nbytes}B"


def _check_range(name: str, value: float, low: float, high: float | None = None) -> None:
    if value < low or (high is not None and value > high):
        bound = f"between {low:g} and {high:g}" if high is not None else f"at least {low:g}"
        raise UserError(f"{name} {value:g} must be {bound}")


def parse_options(argv: list[str], cuda_gpus: int, *, in_worker: bool) -> Options:
    """Every flag checked before anything starts; raises UserError naming the problem and the fix."""
    from env.nccl.collectives import COLLECTIVES, DTYPES

    args = build_parser().parse_args(argv)
    if in_worker:  # inside torchrun the launcher has already fixed the process count
        gpus = args.gpus if args.gpus is not None else check_workers(None, cuda_gpus)
    else:
        gpus = check_workers(args.gpus, cuda_gpus, "--gpus")
    if args.dtype not in DTYPES:
        raise UserError(f"--dtype {args.dtype} is not one of {', '.join(DTYPES)}")
    _check_range("--iters", args.iters, 1)
    _check_range("--warmup", args.warmup, 0)
    if args.first_timeout <= 0:
        raise UserError(f"--first-timeout {args.first_timeout:g} must be more than 0 seconds")
    if args.min_busbw is not None:
        _check_range("--min-busbw", args.min_busbw, 0)
    nodes = nodes_from_args(args)
    if nodes.problem():
        raise UserError(nodes.problem())
    # Workers get --run-dir from the launcher, so every process agrees on the default's time stamp.
    run_dir = Path(args.run_dir or f"runs/nccl-test-{time.strftime('%Y%m%d-%H%M%S')}")
    json_path = Path(args.json) if args.json else run_dir / JSON_NAME
    sizes = parse_sizes(args.sizes or DEFAULT_SIZES["cuda" if cuda_gpus else "cpu"])
    if not cuda_gpus and sizes[-1] > CPU_MAX_SIZE:
        raise UserError(
            f"--sizes {args.sizes}: on CPU (gloo) sizes are capped at {format_size(CPU_MAX_SIZE)} (larger ones take "
            "minutes and gigabytes and measure no GPU link); use e.g. --sizes 8:4M:4"
        )
    return Options(
        gpus=gpus,
        sizes=sizes,
        dtype=DTYPES[args.dtype],
        ops=parse_ops(args.ops, list(COLLECTIVES)),
        min_busbw=args.min_busbw,
        iters=args.iters,
        warmup=args.warmup,
        run_dir=run_dir,
        json_path=json_path,
        first_timeout=args.first_timeout,
        launch_overhead=args.launch_overhead,
        nodes=nodes,
    )


def visible_cuda_gpus() -> int:
    """CUDA GPUs this process sees, numbered in PCI order (so that CUDA ordinals match NVML indices)."""
    # CUDA numbers GPUs fastest-first by default; PCI order makes CUDA ordinals match NVML indices.
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
