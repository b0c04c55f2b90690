"""`make plan`: whether a training run fits the GPUs of a box, before it runs, and what would make it fit.

    python -m train.plan [--config small] [--gpus 1] [--vram 24] [--micro-batch N] [--strategy ddp|fsdp]
                         [--precision auto|bf16|fp16|fp32] [--json PATH] [key=value ...]

It plans for the box it is told of (GPUS GPUs of VRAM GiB each), whatever this machine has, and prints per
GPU the bytes of each kind (train/plan/memory.py), the activations under every checkpointing mode, a
verdict with the largest MICRO_BATCH that fits, and the levers that would make it fit, each with its
effect (train/plan/levers.py). Exit 0: it fits; 1: it does not (make turns any failure into 2).
"""

from __future__ import annotations

import argparse
import json
import os
import stat
from dataclasses import asdict
from pathlib import Path

from env.common.atomic import write_text_atomically
from env.common.cli import ArgumentParser, UserError, count_arg, real_arg, run_cli
from env.common.readfile import ReadRefused, read_json
from env.rig.runtime import shorthand_keys
from train.config_loader import load_config
from train.plan import gib, plan_run, verdict
from train.plan.levers import Lever
from train.plan.memory import GIB, Box, MemoryPlan
from train.weights import init_source_config

DEFAULT_CONFIG = "small"
DEFAULT_VRAM_GIB = 24.0
# 1 PiB per GPU: far past any GPU, and VRAM x 2^30 stays an exact integer of bytes below it.
MAX_VRAM_GIB = float(1 << 20)
# A plan's JSON is a few kilobytes: what JSON= may replace is a plan written before, never a larger file.
PLAN_JSON_LIMIT = 1 << 20
# The make shorthands make plan takes (MICRO_BATCH, STRATEGY, PRECISION), as the launcher reads them.
FLAG_KEYS = {flag: key for flag, key in shorthand_keys().items() if flag in ("micro_batch", "strategy", "precision")}


def table(plan: MemoryPlan, found: list[Lever]) -> str:
    p = plan
    modes = " | ".join(f"{mode} {gib(size)}" for mode, size in p.activations_by_mode.items())
    rows = [
        ("weights and buffers", p.weights),
        ("gradients (fp32)", p.gradients),
        ("AdamW states (fp32)", p.optimizer),
        (f"{p.precision} weight copies (autocast)", p.weight_copies),
        ("FSDP2 all-gather / reduce-scatter", p.gather_buffers),
        (f"activations ({p.activation_checkpointing})", p.activations),
        ("transient (loss gradient, recompute)", p.transient),
        ("CUDA context and NCCL", p.allowance),
        ("total", p.total),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [
        f"plan: {p.config} on {p.gpus} GPU(s) of {gib(p.vram)} GiB: {p.strategy}, {p.precision}, micro-batch "
        f"{p.micro_batch} x {p.seq_len} tokens, activation checkpointing {p.activation_checkpointing}",
        f"parameters {p.parameters:,}, trainable {p.trainable:,} ({p.training})",
        f"{'per GPU':<{width}}  {'GiB':>8}",
        *(f"{name:<{width}}  {gib(size):>8}" for name, size in rows),
        f"activations per micro-batch by checkpointing mode, GiB: {modes}",
        verdict(p),
    ]
    if found:
        lever_width = max(len(lever.name) for lever in found)
        lines.append(f"levers{'':<{lever_width - 6}}  {'GiB/GPU':>8}  {'change':>8}  fits  max MICRO_BATCH  how")
        for lever in found:
            q = lever.plan
            lines.append(
                f"{lever.name:<{lever_width}}  {gib(q.total):>8}  {gib(q.total - p.total):>8}  "
                f"{'yes' if q.fits else 'no ':<4}  {q.max_micro_batch:>15}  {lever.change}"
            )
    return "\n".join(lines)


def record(plan: MemoryPlan, found: list[Lever]) -> dict:
    """The plan as JSON: every figure in bytes, the verdict, and each lever's plan."""

    def figures(p: MemoryPlan) -> dict:
        return {
            **asdict(p),
            "total": p.total,
            "fits": p.fits,
            "headroom": p.headroom,
            "max_micro_batch": p.max_micro_batch,
        }

    return {
        **figures(plan),
        "verdict": verdict(plan),
        "levers": [{"name": lever.name, "change": lever.change, **figures(lever.plan)} for lever in found],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m train.plan", description=__doc__)
    parser.add_argument(
        "--config", default="", help=f"config name under train/configs/ or a .yaml path ({DEFAULT_CONFIG})"
    )
    parser.add_argument("--gpus", type=count_arg("--gpus"), default=1, help="GPUs of the box planned for (1)")
    parser.add_argument("--vram", type=real_arg("--vram"), default=DEFAULT_VRAM_GIB, help="GiB of each GPU (24)")
    for flag in FLAG_KEYS:
        parser.add_argument(f"--{flag.replace('_', '-')}", dest=flag, default="")
    parser.add_argument("--json", default="", help="also write the plan as JSON to this path")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. data.seq_len=4096")
    args = parser.parse_args(argv)
    if args.gpus < 1:
        raise UserError(f"GPUS={args.gpus}: plan for at least 1 GPU, e.g. GPUS=3")
    if not 0 < args.vram <= MAX_VRAM_GIB or round(args.vram * GIB) < 1:
        raise UserError(
            f"VRAM={args.vram:g}: give each GPU's memory in GiB, at least a byte and at most {MAX_VRAM_GIB:,.0f}, "
            "e.g. VRAM=24"
        )
    if args.json:
        check_json_output(Path(args.json))
    return args


def check_json_output(path: Path) -> None:
    """JSON= may name a new file, or a plan this target wrote before; never a link, a special file or other data
    (it would be replaced or, through a link, written elsewhere)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UserError(f"JSON={path}: cannot be checked ({exc.strerror}); give a path to a new file") from None
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISREG(info.st_mode):
        what = "a symlink" if stat.S_ISLNK(info.st_mode) else "not a regular file"
        raise UserError(f"JSON={path} is {what}; give a path to a new file")
    try:
        earlier = read_json(path, PLAN_JSON_LIMIT)
    except ReadRefused:
        earlier = None
    if not (isinstance(earlier, dict) and {"verdict", "levers", "fits"} <= earlier.keys()):
        raise UserError(f"JSON={path} exists and is not a plan make plan wrote; give a new path, or move it away")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    flags = [f"{key}={getattr(args, flag)}" for flag, key in FLAG_KEYS.items() if getattr(args, flag) != ""]
    cfg = load_config(args.config or DEFAULT_CONFIG, [*args.overrides, *flags], init_source_config)
    plan, found = plan_run(cfg, Box(args.gpus, round(args.vram * GIB)))
    print(table(plan, found), flush=True)
    if args.json:
        write_text_atomically(Path(args.json), json.dumps(record(plan, found), indent=2) + "\n")
    return 0 if plan.fits else 1


if __name__ == "__main__":
    run_cli("plan", main)
