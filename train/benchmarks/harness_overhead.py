"""What the training harness costs per step, against a bare PyTorch loop doing the same math.

    python -m train.benchmarks.harness_overhead [--config tiny] [--steps 50] [key=value ...]

Both sides train the same model (train.models.build_model), on the same micro-batch, in the same
precision (autocast, and the gradient scaler for fp16), with the same optimizer (the trainer's
AdamW groups) and the same per-step math: gradient clipping and the MoE balancing update.

- bare: one fixed synthetic batch already on the device, no data loader, no metrics, no
  watchdog, no loss synchronisation; timed in the trainer's windows (log_every steps, the device
  synchronised at each window's end), median window after dropping the first tenth.
- harness: train.trainer.train(cfg, run_dir) in this process (one process, no torchrun), on
  synthetic data, its step_ms from summary.json: the same windows and median, with checkpoint
  saving subtracted from its windows by the trainer itself.

The bare loop runs before and after the harness, so drift and noise show; the overhead is
(harness - bare) / bare against their mean. The target is ≤ 3%. It prints figures and asserts nothing:
timing depends on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from env.common.cli import ArgumentParser, run_cli
from env.nccl.collectives import synchronize
from train.benchmarks import benchmark_main
from train.config import RunConfig
from train.config_loader import load_config
from train.data import build_dataset, build_loader
from train.errors import ConfigError
from train.metrics import steady
from train.models import build_model, get_spec
from train.run import Precision, build_optimizer, device_settings, seed_everything
from train.trainer import train

TARGET_OVERHEAD = 0.03
WINDOWS = 10  # timing windows per run, as the harness logs them


def log_every(steps: int) -> int:
    return max(1, steps // WINDOWS)


def steady_median(window_ms: list[float]) -> float:
    """The median under the metrics summary's rule (train.metrics.steady)."""
    return statistics.median(steady(window_ms))


def benchmark_config(cfg: RunConfig, steps: int) -> RunConfig:
    """Synthetic data, a logging window every steps/10 steps, no checkpoint before the last step."""
    train_cfg = replace(cfg.train, steps=steps, log_every=log_every(steps), ckpt_every=steps)
    return replace(cfg, data=replace(cfg.data, source="synthetic"), train=train_cfg)


def bare_step(cfg: RunConfig, device: torch.device) -> Callable[[], None]:
    """One optimizer step of the bare loop, as a function: model, optimizer and batch made once, here."""
    seed_everything(cfg.train.seed)
    device_settings(cfg, device)  # the backend settings train.run.setup makes
    after_step = get_spec(cfg.model.arch).after_step
    precision = Precision.resolve(cfg.train.precision, device)
    model = build_model(cfg.model).to(device)
    optimizer = build_optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.use_scaler)
    batches = iter(build_loader(build_dataset(cfg), cfg, rank=0, world_size=1, start_step=0))
    micro_batches = [tuple(t.to(device) for t in next(batches)) for _ in range(cfg.train.accum)]

    def step() -> None:
        for inputs, targets in micro_batches:
            with precision.autocast(device):
                loss = model(inputs, targets) / cfg.train.accum
            scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step(model, None)

    return step


def bare_step_ms(cfg: RunConfig, device: torch.device) -> float:
    """Median window step time of the bare loop."""
    step = bare_step(cfg, device)
    per_window = log_every(cfg.train.steps)
    windows = []
    synchronize(device)
    for _ in range(cfg.train.steps // per_window):
        started = time.perf_counter()
        for _ in range(per_window):
            step()
        synchronize(device)
        windows.append((time.perf_counter() - started) / per_window * 1000)
    return steady_median(windows)


def harness_step_ms(cfg: RunConfig) -> tuple[float, str]:
    """The trainer's own median step time, and the device and precision it ran with."""
    with tempfile.TemporaryDirectory(prefix="harness-overhead-") as run_dir:
        summary = train(cfg, Path(run_dir))
    return summary["step_ms"], f"{summary['device']}, {summary['precision']}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m train.benchmarks.harness_overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="tiny", help="config name or YAML path (default: tiny)")
    parser.add_argument("--steps", type=int, default=50, help="steps per side (default: 50)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.micro_batch=32")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    if args.steps < 2 * WINDOWS:
        raise ConfigError(f"--steps {args.steps} is too few to time; use at least {2 * WINDOWS}")
    cfg = benchmark_config(load_config(args.config, args.overrides), args.steps)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    batch = f"micro_batch {cfg.train.micro_batch} x accum {cfg.train.accum}"
    print(
        f"harness overhead · config {cfg.name} · {batch} · {cfg.train.steps} steps per side · torch {torch.__version__}"
    )
    before = bare_step_ms(cfg, device)
    print(f"bare loop  : {before:9.2f} ms per step (median of {cfg.train.log_every}-step windows)", flush=True)
    harness, ran_on = harness_step_ms(cfg)
    print(f"harness    : {harness:9.2f} ms per step (train.trainer.train, summary step_ms; {ran_on})", flush=True)
    after = bare_step_ms(cfg, device)
    print(f"bare again : {after:9.2f} ms per step (before and after the harness: drift and noise show here)")
    bare = (before + after) / 2
    overhead = (harness - bare) / bare
    verdict = "ok" if overhead <= TARGET_OVERHEAD else "ABOVE TARGET"
    print(f"overhead   : {overhead:+.1%} against the mean bare step (target ≤ {TARGET_OVERHEAD:.0%}): {verdict}")


def main(argv: list[str] | None = None) -> int:
    return benchmark_main(parse_args, run, argv)


if __name__ == "__main__":
    run_cli("harness-overhead", main)
