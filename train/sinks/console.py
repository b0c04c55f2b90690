"""The console sink: one aligned line per logged step, with an ETA."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from train.sinks.base import VAL_KEYS, SinkContext


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


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


class ConsoleSink:
    def __init__(self, context: SinkContext) -> None:
        self.console = context.console
        self.total_steps = context.total_steps
        self.eta = Eta(context.start_step)

    def log(self, record: dict[str, Any]) -> None:
        self.eta.add(record["step"], record["step_ms"] / 1000)
        self.console.write(self.line(record) + "\n")
        self.console.flush()

    def line(self, r: dict[str, Any]) -> str:
        """One console line; every column has a fixed width, so the columns stay aligned as numbers grow."""
        steps = len(str(self.total_steps))
        mfu = f" | mfu {r['mfu'] * 100:5.1f}%" if r.get("mfu") is not None else ""
        tokens = f" | {r['tokens_per_sec']:>11,.0f} tok/s" if r.get("tokens_per_sec") else ""
        val = "".join(f" | {key} {r[key]:8.4f}" for key in VAL_KEYS if r.get(key) is not None)
        loss = f"loss {r['loss']:8.4f}"
        if r.get("next_token_loss") is not None:  # an objective with an MTP term: val_loss compares with the first
            mtp = r["loss"] - r["next_token_loss"]
            loss = f"loss {r['loss']:8.4f} = next-token {r['next_token_loss']:8.4f} + mtp {mtp:7.4f}"
        return (
            f"step {r['step']:>{steps}}/{self.total_steps} | {loss} | lr {r['lr']:9.2e} "
            f"| {r['step_ms']:9.1f} ms{tokens} | {r['samples_per_sec']:>10,.1f} samples/s{mfu} "
            f"| mem {r['peak_mem_gb']:7.2f} GB | eta {format_duration(self.eta.remaining(self.total_steps)):>6}{val}"
        )

    def close(self, summary: dict[str, Any], files: dict[str, Path]) -> None:
        self.console.flush()
