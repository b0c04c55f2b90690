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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO, TypeVar

import torch

from env.atomic import write_fix, write_text_atomically
from env.plots import PlotError, write_loss_plot

T = TypeVar("T")


class RunDirWriteError(Exception):
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


def _format_duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


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

    def __post_init__(self) -> None:
        if not self.is_main:
            return
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
        remaining = (self.total_steps - r["step"]) * r["step_ms"] / 1000
        mfu = f" | mfu {r['mfu'] * 100:4.1f}%" if r.get("mfu") is not None else ""
        tokens = f" | {r['tokens_per_sec']:,.0f} tok/s" if r.get("tokens_per_sec") else ""
        val = "".join(f" | {key} {r[key]:.4f}" for key in VAL_KEYS if r.get(key) is not None)
        return (
            f"step {r['step']:>6}/{self.total_steps} | loss {r['loss']:.4f} | lr {r['lr']:.2e} "
            f"| {r['step_ms']:7.1f} ms{tokens} | {r['samples_per_sec']:,.1f} samples/s{mfu} "
            f"| mem {r['peak_mem_gb']:.2f} GB | eta {_format_duration(remaining)}{val}"
        )

    def summary(self, extra: dict[str, Any]) -> dict[str, Any]:
        """Steady-state figures over the logged steps (the first tenth dropped), written to summary.json."""
        records = self._records
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
            "wall_s": round(time.perf_counter() - self._started, 2),
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
