"""Where one training step's time goes: the device busy or idle, kernels and host syncs per step, the top ops.

    python -m train.benchmarks.step_profile [--config small] [--steps 5] [--trace PATH] [key=value ...]

It profiles the harness_overhead benchmark's bare step (same model, batch, precision and optimizer
as training, synthetic data) with torch.profiler, after warm-up steps. The wall time per step is
measured first without the profiler, which slows the host side. On a GPU it reports:

- device busy: the union of kernel, memcpy and memset intervals, per step, and its share of the
  wall time. A large idle share means the step waits on the host (kernel launches, host syncs),
  not on the GPU's arithmetic, and MFU cannot reach its target until that changes.
- kernels per step, and host syncs per step (cudaStreamSynchronize, cudaDeviceSynchronize and
  cudaEventSynchronize calls, and device-to-host copies).
- the kernels with the most device time, and the operators with the most host (self CPU) time.

On CPU only the operator table means anything. It prints figures and judges nothing.
--trace writes the Chrome/Perfetto trace (tens of MB for `small`).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from env.common.cli import ArgumentParser, run_cli
from env.nccl.collectives import synchronize
from train.benchmarks import benchmark_main
from train.benchmarks.harness_overhead import bare_step, benchmark_config
from train.config_loader import load_config
from train.errors import ConfigError
from train.run import Precision

WARMUP_STEPS = 3
TOP = 12
DEVICE_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
SYNC_CALLS = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"}


@dataclass
class OpRow:
    name: str
    ms_per_step: float
    calls_per_step: float


@dataclass
class StepProfile:
    steps: int
    wall_ms: float  # per step, measured without the profiler
    device_busy_ms: float | None  # per step; None when no device activity was traced (CPU)
    kernels: float  # per step
    sync_calls: float  # per step
    copies_to_host: float  # per step
    top_kernels: list[OpRow]

    @property
    def busy_share(self) -> float | None:
        return None if self.device_busy_ms is None else self.device_busy_ms / self.wall_ms


def union_us(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by (start, end) intervals, overlaps counted once."""
    covered, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end <= reach:
            continue
        covered += end - max(start, reach)
        reach = end
    return covered


def summarize(events: list[dict], steps: int, wall_ms: float) -> StepProfile:
    """Figures per step from a Chrome trace's events (Kineto categories) of `steps` profiled steps."""
    device_intervals = []
    kernel_time: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    kernels = sync_calls = copies_to_host = 0
    for event in events:
        category, name = event.get("cat"), event.get("name", "")
        if category in DEVICE_CATEGORIES and event.get("ph") == "X":
            device_intervals.append((event["ts"], event["ts"] + event["dur"]))
            row = kernel_time[name]
            row[0] += event["dur"]
            row[1] += 1
            kernels += category == "kernel"
            copies_to_host += category == "gpu_memcpy" and "DtoH" in name
        elif category in {"cuda_runtime", "cuda_driver"} and name in SYNC_CALLS:
            sync_calls += 1
    ranked = sorted(kernel_time.items(), key=lambda item: -item[1][0])[:TOP]
    return StepProfile(
        steps=steps,
        wall_ms=wall_ms,
        device_busy_ms=union_us(device_intervals) / 1000 / steps if device_intervals else None,
        kernels=kernels / steps,
        sync_calls=sync_calls / steps,
        copies_to_host=copies_to_host / steps,
        top_kernels=[OpRow(name, us / 1000 / steps, calls / steps) for name, (us, calls) in ranked],
    )


def top_host_ops(prof: profile, steps: int) -> list[OpRow]:
    """The operators with the most self CPU time: the host's share of the step."""
    averages = sorted(prof.key_averages(), key=lambda avg: -avg.self_cpu_time_total)[:TOP]
    return [OpRow(avg.key, avg.self_cpu_time_total / 1000 / steps, avg.count / steps) for avg in averages]


def _table(title: str, rows: list[OpRow]) -> list[str]:
    lines = [title, f"  {'ms/step':>9}  {'calls/step':>10}  name"]
    lines += [f"  {row.ms_per_step:9.3f}  {row.calls_per_step:10.1f}  {row.name[:90]}" for row in rows]
    return lines


def report(result: StepProfile, host_ops: list[OpRow]) -> str:
    lines = [f"wall          : {result.wall_ms:9.2f} ms per step (without the profiler)"]
    if result.device_busy_ms is None:
        lines.append("device busy   :       n/a (no device activity traced: CPU run)")
    else:
        share = result.busy_share or 0.0
        lines += [
            f"device busy   : {result.device_busy_ms:9.2f} ms per step ({share:.0%} of the wall time; "
            f"idle {1 - share:.0%}: launch- or sync-bound where high)",
            f"kernels       : {result.kernels:9.0f} per step",
            f"host syncs    : {result.sync_calls:9.1f} per step (synchronize calls), "
            f"{result.copies_to_host:.1f} device-to-host copies per step",
            *_table("top kernels by device time:", result.top_kernels),
        ]
    lines += _table("top operators by host (self CPU) time:", host_ops)
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m train.benchmarks.step_profile", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="tiny", help="config name or YAML path (default: tiny)")
    parser.add_argument("--steps", type=int, default=5, help="profiled steps, after warm-up (default: 5)")
    parser.add_argument("--trace", default="", help="also keep the Chrome/Perfetto trace here")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.micro_batch=8")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    if args.steps < 1:
        raise ConfigError(f"--steps {args.steps}: profile at least 1 step")
    cfg = benchmark_config(load_config(args.config, args.overrides), WARMUP_STEPS + 2 * args.steps)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    batch = f"micro_batch {cfg.train.micro_batch} x accum {cfg.train.accum}"
    precision = Precision.resolve(cfg.train.precision, device).name
    print(f"step profile · config {cfg.name} · {batch} · {precision} · {args.steps} steps · {device} · "
          f"torch {torch.__version__}", flush=True)  # fmt: skip
    step = bare_step(cfg, device)
    for _ in range(WARMUP_STEPS):
        step()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(device)
    wall_ms = (time.perf_counter() - started) * 1000 / args.steps

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        synchronize(device)
    with tempfile.TemporaryDirectory(prefix="step-profile-") as scratch:
        trace = Path(args.trace) if args.trace else Path(scratch) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    if args.trace:
        print(f"trace         : {args.trace} (open in https://ui.perfetto.dev or chrome://tracing)")
    print(report(summarize(events, args.steps, wall_ms), top_host_ops(prof, args.steps)))


def main(argv: list[str] | None = None) -> int:
    return benchmark_main(parse_args, run, argv)


if __name__ == "__main__":
    run_cli("step-profile", main)
