"""How fast the loader feeds a rank, against how fast one training step eats.

    python -m train.benchmarks.data_loader [--config tiny] [--workers 0,2] [--seconds 5] [key=value ...]

For each source and worker count it prints the loader's rate (tokens/s, or samples/s for image
models) from one rank's loader, and its ratio to the consumption of one rank: the figure given
by --step-tokens-per-sec, or one measured from a few training steps of train.models.build_model
on this machine's first device. The target is a loader at least 10x faster than consumption,
so that data never shows up in the step time. Ranks on one host share its CPU cores: divide
the loader figures by the number of ranks per host when comparing.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from env.common.cli import ArgumentParser, run_cli
from train.benchmarks import benchmark_main
from train.config import RunConfig
from train.config_loader import load_config
from train.data import build_dataset, build_loader
from train.errors import ConfigError
from train.models import build_model, get_spec

TARGET_RATIO = 10.0
# What a batch counts for each kind of input: tokens of a language model, samples of an image model.
UNITS: dict[str, tuple[str, Callable[[torch.Tensor], int]]] = {
    "tokens": ("tokens/s", lambda inputs: inputs.numel()),
    "images": ("samples/s", lambda inputs: inputs.shape[0]),
}
# Sources measured when --sources is not given; files and images need cfg.data.path.
DEFAULT_SOURCES = {"tokens": ["corpus", "synthetic"], "images": ["synthetic"]}


@dataclass
class LoaderRate:
    source: str
    workers: int
    startup_s: float
    rate: float


def measure_loader(cfg: RunConfig, seconds: float) -> LoaderRate:
    """One rank's loader rate after its first batch (startup: building the dataset and workers)."""
    count = UNITS[get_spec(cfg.model.arch).inputs][1]
    started = time.perf_counter()
    batches = iter(build_loader(build_dataset(cfg), cfg, rank=0, world_size=1, start_step=0))
    next(batches)
    startup = time.perf_counter() - started
    consumed, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        inputs, _ = next(batches)
        consumed += count(inputs)
    rate = consumed / (time.perf_counter() - began)
    del batches  # stops persistent workers before the next measurement
    return LoaderRate(cfg.data.source, cfg.data.num_workers, startup, rate)


def measure_consumption(cfg: RunConfig, steps: int) -> tuple[float, str]:
    """Units per second that training steps of build_model eat on one device, and how it was measured."""

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    synthetic = replace(cfg, data=replace(cfg.data, source="synthetic", num_workers=0))
    batches = iter(build_loader(build_dataset(synthetic), synthetic, rank=0, world_size=1, start_step=0))
    inputs, targets = (t.to(device) for t in next(batches))
    count = UNITS[get_spec(cfg.model.arch).inputs][1]

    def train_step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = model(inputs, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    train_step()  # warm-up: allocations, kernel selection
    if device.type == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(steps):
        train_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    rate = steps * count(inputs) / (time.perf_counter() - began)
    precision = "bf16" if use_bf16 else "fp32"
    return rate, f"measured: {steps} timed train steps of {cfg.model.arch} on {device.type}, {precision}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m train.benchmarks.data_loader", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny", help="config name or YAML path (default: tiny)")
    parser.add_argument("--workers", default="0,2", help="comma-separated data.num_workers values (default: 0,2)")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds to draw batches per measurement")
    parser.add_argument("--sources", help="comma-separated data sources (default: the built-in ones for the model)")
    parser.add_argument("--step-tokens-per-sec", type=float, help="consumption of one rank, instead of measuring it")
    parser.add_argument("--steps", type=int, default=5, help="train steps timed to measure consumption (default: 5)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.micro_batch=32")
    return parser.parse_args(argv)


def parse_workers(text: str) -> list[int]:
    try:
        workers = [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"--workers {text!r} is not a list of integers, e.g. --workers 0,2,4") from None
    if min(workers) < 0:
        raise ConfigError(f"--workers {text!r} has a negative count; use 0 or more")
    return workers


def run(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, args.overrides)
    kind = get_spec(cfg.model.arch).inputs
    unit = UNITS[kind][0]
    sources = args.sources.split(",") if args.sources else DEFAULT_SOURCES[kind]
    if not args.sources and cfg.data.path:
        sources = [*sources, cfg.data.source]
    workers = parse_workers(args.workers)
    batch = f"micro_batch {cfg.train.micro_batch}" + (f" × seq_len {cfg.data.seq_len}" if kind == "tokens" else "")
    print(f"data loader benchmark · config {cfg.name} · {batch} · torch {torch.__version__} · {os.cpu_count()} CPUs")

    if args.step_tokens_per_sec:
        consumption, how = args.step_tokens_per_sec, "given by --step-tokens-per-sec"
    else:
        try:
            consumption, how = measure_consumption(cfg, args.steps)
        except ImportError as exc:
            consumption, how = None, f"not measured ({exc}); pass --step-tokens-per-sec"
    shown = f"{consumption:,.0f} {unit}" if consumption else "unknown"
    print(f"consumption of one rank: {shown} ({how}); target: loader ≥ {TARGET_RATIO:.0f}× consumption\n")

    print(f"{'source':<10} {'workers':>7} {'startup_s':>9} {unit:>14} {'× consumption':>14}  verdict")
    for source, count in itertools.product(sources, workers):
        measured = replace(cfg, data=replace(cfg.data, source=source, num_workers=count))
        result = measure_loader(measured, args.seconds)
        ratio = result.rate / consumption if consumption else None
        verdict = "-" if ratio is None else ("ok" if ratio >= TARGET_RATIO else f"below {TARGET_RATIO:.0f}×")
        ratio_text = f"{ratio:,.1f}×" if ratio is not None else "-"
        print(f"{source:<10} {count:>7} {result.startup_s:>9.2f} {result.rate:>14,.0f} {ratio_text:>14}  {verdict}")


def main(argv: list[str] | None = None) -> int:
    return benchmark_main(parse_args, run, argv)


if __name__ == "__main__":
    run_cli("data-loader", main)
