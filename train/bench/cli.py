"""The command line: arguments, the plan of runs, and main."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from env.common.cli import ArgumentParser, check_workers, count_arg
from env.records.manifest import write_manifest
from env.records.runlock import RunDirLock
from env.rig.runtime import shorthand_keys
from train import bench as package
from train.bench import BenchError, counted
from train.bench.bandwidth import LINK_ASSUMPTIONS, resolve_bandwidth
from train.bench.baseline import load_baseline, resolve_baseline
from train.bench.measure import DEFAULT_REPEATS, NOISE_EXIT, Plan, RunFailed, run_all
from train.bench.report import build_bench, columns_for, write_outputs
from train.config_loader import load_config

DEFAULT_STEPS = 40
# Make-variable shorthands train.launch accepts as flags; passed through unchanged.
# The training shorthands of the one make-variable table; bench has its own --steps.
LAUNCH_FLAGS = tuple(flag for flag in shorthand_keys() if flag != "steps")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m train.bench", description=package.__doc__.splitlines()[0])
    parser.add_argument(
        "--gpus", type=count_arg("--gpus"), help="largest count: runs 1..GPUS (default: every GPU, or 1 CPU process)"
    )
    parser.add_argument("--counts", default="", help="comma list of counts instead of 1..GPUS, e.g. 1,2,4")
    parser.add_argument("--config", default="", help="config name or .yaml (default: the baseline's, or small/tiny)")
    parser.add_argument(
        "--steps", type=count_arg("--steps"), default=DEFAULT_STEPS, help=f"steps per run (default {DEFAULT_STEPS})"
    )
    parser.add_argument(
        "--repeats",
        type=count_arg("--repeats"),
        default=DEFAULT_REPEATS,
        help=f"runs per count, interleaved (default {DEFAULT_REPEATS})",
    )
    parser.add_argument("--run-dir", default="", help="default runs/bench-CONFIG-TIMESTAMP")
    parser.add_argument("--baseline", default="", help="a shipped name (train/baselines/) or a previous bench.json")
    parser.add_argument("--nccl-json", default="", help="busbw for the prediction from make nccl-test JSON=...")
    parser.add_argument("--link", default="", help=f"assumed link instead: {', '.join(LINK_ASSUMPTIONS)}")
    for flag in LAUNCH_FLAGS:
        parser.add_argument(f"--{flag.replace('_', '-')}", dest=flag, default="")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. model.image_size=160")
    return parser


def parse_counts(text: str, gpus: int, unit: str) -> list[int]:
    """1..GPUS, or the --counts list: it must hold 1 and stay within GPUS."""
    if not text:
        return list(range(1, gpus + 1))
    try:
        counts = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise BenchError(f"--counts {text} is not a comma list of whole numbers, e.g. --counts 1,2,3") from None
    if not counts or counts[0] != 1:
        raise BenchError(f"--counts {text} must include 1: speedup and the prediction are relative to the 1-{unit} run")
    if counts[-1] > gpus:
        raise BenchError(f"--counts {text} asks for {counted(counts[-1], unit)} but GPUS is {gpus}; raise GPUS")
    return counts


def flag_values(args: argparse.Namespace, baseline: dict | None, device_type: str) -> tuple[str, dict[str, str]]:
    """The config and the train.launch flags (micro_batch, ...) to run: as given, else the baseline's workload
    on GPUs (its config and micro-batch), else train.launch's default config."""
    values = {flag: getattr(args, flag) for flag in LAUNCH_FLAGS if getattr(args, flag)}
    workload = (baseline or {}).get("workload", {})
    if args.config:
        return args.config, values
    if device_type == "cuda" and "config" in workload:
        if "micro_batch" in workload:
            values.setdefault("micro_batch", str(workload["micro_batch"]))
        print(
            f"bench: workload from baseline {baseline['name']}: config {workload['config']}, "
            f"micro-batch {values.get('micro_batch', 'as configured')}"
        )
        return workload["config"], values
    return ("small" if device_type == "cuda" else "tiny"), values


def make_plan(args: argparse.Namespace, baseline: dict | None, cuda_gpus: int) -> Plan:
    device_type = "cuda" if cuda_gpus else "cpu"
    unit = "GPU" if cuda_gpus else "CPU process"
    gpus = check_workers(args.gpus, cuda_gpus, "--gpus")
    counts = parse_counts(args.counts, gpus, unit)
    if args.steps < 2:
        raise BenchError(f"--steps {args.steps} must be at least 2 (the first logged window is warm-up)")
    config, values = flag_values(args, baseline, device_type)
    as_overrides = [f"train.{flag}={value}" for flag, value in values.items()]
    cfg = load_config(config, [*args.overrides, *as_overrides, f"train.steps={args.steps}", "data.source=synthetic"])
    run_dir = Path(args.run_dir or f"runs/bench-{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    taken = [run_dir / f"n{n}" for n in counts if (run_dir / f"n{n}").exists()]  # a repeat's runs go under n{n}/
    if taken:
        raise BenchError(f"{taken[0]} already holds a run; choose a new RUN_DIR")
    flags = [item for flag, value in values.items() for item in (f"--{flag.replace('_', '-')}", value)]
    if args.repeats < 1:
        raise BenchError(f"--repeats {args.repeats} must be at least 1")
    return Plan(cfg, counts, args.steps, run_dir, flags, list(args.overrides), device_type, args.repeats)


def main(argv: list[str] | None = None) -> int:
    import torch

    cuda_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    try:
        args = build_parser().parse_args(argv)
        baseline = load_baseline(resolve_baseline(args.baseline)) if args.baseline else None
        plan = make_plan(args, baseline, cuda_gpus)
        bandwidth = resolve_bandwidth(args.nccl_json, args.link, plan.device_type, plan.counts[-1])
        plan.run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BenchError(f"cannot create RUN_DIR ({exc.strerror}); choose a writable RUN_DIR") from None
    RunDirLock(plan.run_dir).acquire()  # one bench per RUN_DIR (env/records/runlock.py), held until this process exits
    if plan.device_type == "cpu":
        print(
            "bench: no GPU: counts are CPU processes on gloo (a testing mode): MFU is null, the processes share "
            "the CPU's cores (so exposed comm includes lost compute), and no figure says anything about GPUs",
            flush=True,
        )

    write_manifest(
        plan.run_dir,
        kind="bench",
        config=plan.cfg.to_dict(),
        extra={
            "counts": plan.counts,
            "steps": plan.steps,
            "baseline": args.baseline or None,
            "repeats": plan.repeats,
            "busbw": bandwidth.source,
        },
    )
    try:
        summaries = run_all(plan)
    except RunFailed as exc:
        print(f"torchrig: bench: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print(f"torchrig: bench: interrupted; the finished runs are in {plan.run_dir}", file=sys.stderr)
        return 130
    bench = build_bench(plan, summaries, bandwidth, baseline)
    print("\n".join(["", *write_outputs(plan.run_dir, bench, columns_for(baseline is not None))]), flush=True)
    return NOISE_EXIT if bench["noise"]["bound"] else 0
