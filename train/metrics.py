"""What a run reports: one JSON object per logged step, a console line with an ETA, a summary.

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

from env.common.atomic import write_fix, write_text_atomically
from env.common.cli import UserError
from env.records.plots import PlotError, write_loss_plot
from train.rundir import earlier_records

T = TypeVar("T")


class RunDirWriteError(UserError):
    """Writing a run's figures into RUN_DIR failed (a full disk, say): one line with the file and the fix."""

    def __init__(self, path: Path, error: OSError):
        reason = error.strerror or str(error)
        fix = write_fix(error)
        super().__init__(f"writing {path} failed ({reason}): {fix}; checkpoints already written are intact")


def steady(windows: list[T]) -> list[T]:
    """The steady state of a run's logged windows: the first tenth dropped (at least the first of several)."""
    return windows[len(windows) // 10 :] if len(windows) >= 10 else windows[1:] or windows


VAL_KEYS = ("val_loss", "val_bpb", "val_perplexity")


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


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


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
class Eta:
    """Time left, from the mean step time over the run since this launch started, not the last window.

    The first window carries the start-up (allocator warm-up, compilation) and counts only until a
    later one exists; after that every window counts by its steps, so one slow window moves the
    estimate by its share and no more. Checkpoint saves are not in step_ms, so they are left out.
    """

    last_step: int
    _first: tuple[float, int] | None = None
    _seconds: float = 0.0
    _steps: int = 0

    def add(self, step: int, step_s: float) -> None:
        """A logged window ending at `step`, whose steps took `step_s` each on average."""
        steps = step - self.last_step
        self.last_step = step
        if steps <= 0:
            return
        if self._first is None:
            self._first = (step_s * steps, steps)
        else:
            self._seconds += step_s * steps
            self._steps += steps

    def remaining(self, total_steps: int) -> float:
        seconds, steps = (self._seconds, self._steps) if self._steps else (self._first or (0.0, 1))
        return max(0, total_steps - self.last_step) * seconds / steps


@dataclass
class MetricsLogger:
    run_dir: Path
    is_main: bool
    total_steps: int
    tensorboard: bool = False
    console: TextIO = field(default=sys.stdout)
    _records: list[dict[str, Any]] = field(default_factory=list)
    _jsonl: TextIO | None = None
    _writer: Any = None
    _started: float = field(default_factory=time.perf_counter)
    # The step this launch resumed from: the rows up to it (metrics.jsonl) count in the summary too.
    start_step: int = 0
    _earlier: list[dict[str, Any]] = field(default_factory=list)
    _eta: Eta = field(init=False)

    def __post_init__(self) -> None:
        self._eta = Eta(self.start_step)
        if not self.is_main:
            return
        self._earlier = earlier_records(self.run_dir, self.start_step)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._jsonl = open(self.run_dir / "metrics.jsonl", "a")  # noqa: SIM115 - open for the run; appends across resumes
        except OSError as exc:
            raise RunDirWriteError(self.run_dir / "metrics.jsonl", exc) from exc
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        """record holds step, loss, lr, grad_norm, step_ms, samples_per_sec, ... (val_loss on eval steps)."""
        record = {**record, "time": round(time.time(), 3)}  # wall clock, Unix seconds
        self._records.append(record)
        self._eta.add(record["step"], record["step_ms"] / 1000)
        if not self.is_main or self._jsonl is None:
            return
        try:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        except OSError as exc:
            raise RunDirWriteError(self.run_dir / "metrics.jsonl", exc) from exc
        if self._writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "time"):
                    self._writer.add_scalar(key, value, record["step"])
        self.console.write(self._progress_line(record) + "\n")
        self.console.flush()

    def _progress_line(self, r: dict[str, Any]) -> str:
        """One console line; every column has a fixed width, so the columns stay aligned as numbers grow."""
        steps = len(str(self.total_steps))
        mfu = f" | mfu {r['mfu'] * 100:5.1f}%" if r.get("mfu") is not None else ""
        tokens = f" | {r['tokens_per_sec']:>11,.0f} tok/s" if r.get("tokens_per_sec") else ""
        val = "".join(f" | {key} {r[key]:8.4f}" for key in VAL_KEYS if r.get(key) is not None)
        return (
            f"step {r['step']:>{steps}}/{self.total_steps} | loss {r['loss']:8.4f} | lr {r['lr']:9.2e} "
            f"| {r['step_ms']:9.1f} ms{tokens} | {r['samples_per_sec']:>10,.1f} samples/s{mfu} "
            f"| mem {r['peak_mem_gb']:7.2f} GB | eta {format_duration(self._eta.remaining(self.total_steps)):>6}{val}"
        )

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
                write_text_atomically(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
            except OSError as exc:
                raise RunDirWriteError(self.run_dir / "summary.json", exc) from exc
        return summary

    def close(self) -> None:
        if self.is_main and self._jsonl is not None:
            try:  # the whole run's records (metrics.jsonl holds earlier segments too), drawn as RUN_DIR/loss.png
                write_loss_plot(self.run_dir)
            except PlotError as exc:
                self.console.write(f"torchrig: no loss.png: {exc}\n")
        if self._jsonl is not None:
            with contextlib.suppress(OSError):  # a write that failed already said so
                self._jsonl.close()
        if self._writer is not None:
            self._writer.close()
