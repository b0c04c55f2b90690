"""What a run reports: every logged step's figures to the run's sinks, and a summary at the end.

Only the main rank writes. Throughput figures are global (all ranks), and the summary
leaves out the first steps, which carry start-up costs (allocator warm-up, compilation),
so that two runs compare on their steady state.
"""

from __future__ import annotations

import contextlib
import json
import resource
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO, TypeVar

import torch

from env.common.atomic import write_text_atomically
from env.records.plots import LOSS_PLOT_NAME, PlotError, write_loss_plot
from train.rundir import SUMMARY_NAME, RunDirWriteError, earlier_records
from train.sinks import Sink, SinkContext, make_sinks
from train.sinks.base import VAL_KEYS

T = TypeVar("T")


def steady(windows: list[T]) -> list[T]:
    """The steady state of a run's logged windows: the first tenth dropped (at least the first of several)."""
    return windows[len(windows) // 10 :] if len(windows) >= 10 else windows[1:] or windows


def _validation_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The last validation figures of the run, and the best val_loss with its step (none without eval)."""
    evaluated = [r for r in records if r.get("val_loss") is not None]
    if not evaluated:
        return {}
    best = min(evaluated, key=lambda r: r["val_loss"])
    last = {key: evaluated[-1][key] for key in VAL_KEYS if evaluated[-1].get(key) is not None}
    return {**last, "best_val_loss": best["val_loss"], "best_val_step": best["step"]}


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory this rank used: CUDA allocator peak on GPUs, peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


@dataclass
class StepClock:
    """Training time per logging window: the mean step time since the last lap, saves left out."""

    device: torch.device
    _start: float = field(default_factory=time.perf_counter)
    _steps: int = 0

    def tick(self) -> None:
        self._steps += 1

    def lap(self) -> float:
        """Mean seconds per step since the last lap. Waits for the GPU: only logged steps call it."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        mean = (now - self._start) / max(1, self._steps)
        self._start, self._steps = now, 0
        return mean

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside (a checkpoint save) does not count as training time."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self._start += time.perf_counter() - started


@dataclass
class MetricsLogger:
    """Gives every logged step's row to the run's sinks (train/sinks/) and writes summary.json at the end.

    Only the main rank makes sinks; every rank keeps the rows (the summary is the same everywhere).
    """

    run_dir: Path
    is_main: bool
    total_steps: int
    sinks: list[str] = field(default_factory=lambda: ["console", "jsonl"])  # train.sinks
    config: dict[str, Any] = field(default_factory=dict)  # RunConfig.to_dict(), for trackers' parameters
    console: TextIO = field(default=sys.stdout)
    # The step this launch resumed from: the rows up to it (metrics.jsonl) count in the summary too.
    start_step: int = 0
    _records: list[dict[str, Any]] = field(default_factory=list)
    _earlier: list[dict[str, Any]] = field(default_factory=list)
    _outputs: list[Sink] = field(default_factory=list)
    _summary: dict[str, Any] = field(default_factory=dict)
    _started: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        if not self.is_main:
            return
        self._earlier = earlier_records(self.run_dir, self.start_step)
        context = SinkContext(self.run_dir, self.config, self.total_steps, self.start_step, self.console)
        self._outputs = make_sinks(self.sinks, context)

    def log(self, record: dict[str, Any]) -> None:
        """record holds step, loss, lr, grad_norm, step_ms, samples_per_sec, ... (val_loss on eval steps)."""
        record = {**record, "time": round(time.time(), 3)}  # wall clock, Unix seconds
        self._records.append(record)
        for sink in self._outputs:
            sink.log(record)

    def summary(self, extra: dict[str, Any]) -> dict[str, Any]:
        """Steady-state figures over the whole run's logged steps (the first tenth dropped), to summary.json.

        After a resume, the rows the earlier launches logged up to the resumed step count too: the
        first loss is the run's, not this launch's.
        """
        records = self._earlier + self._records
        steady_records = steady(records)

        def median(key: str) -> float | None:
            values = [r[key] for r in steady_records if r.get(key) is not None]
            return statistics.median(values) if values else None

        summary = {
            "steps": records[-1]["step"] if records else None,
            "final_loss": records[-1]["loss"] if records else None,
            "first_loss": records[0]["loss"] if records else None,
            # The objective without its MTP term, where it has one: the figure val_loss compares with.
            **(
                {"final_next_token_loss": records[-1]["next_token_loss"]}
                if records and "next_token_loss" in records[-1]
                else {}
            ),
            "step_ms": median("step_ms"),
            "samples_per_sec": median("samples_per_sec"),
            "tokens_per_sec": median("tokens_per_sec"),
            "mfu": median("mfu"),
            "peak_mem_gb": max((r["peak_mem_gb"] for r in records), default=None),
            "wall_s": round(time.perf_counter() - self._started, 2),  # this launch's
            "resumed_from_step": self.start_step,
            **_validation_summary(records),
            **extra,
        }
        if self.is_main:
            try:
                write_text_atomically(self.run_dir / SUMMARY_NAME, json.dumps(summary, indent=2) + "\n")
            except OSError as exc:
                raise RunDirWriteError(self.run_dir / SUMMARY_NAME, exc) from exc
        self._summary = summary
        return summary

    def close(self) -> None:
        """The end of the launch: loss.png from the whole run's metrics.jsonl, then each sink closes."""
        if not self.is_main:
            return
        files: dict[str, Path] = {}
        try:
            write_loss_plot(self.run_dir)
            files[LOSS_PLOT_NAME] = self.run_dir / LOSS_PLOT_NAME
        except PlotError as exc:
            self.console.write(f"torchrig: no loss.png: {exc}\n")
        for sink in self._outputs:
            sink.close(self._summary, files)
