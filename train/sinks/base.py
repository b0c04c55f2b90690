"""The sink interface: what every sink is given (SinkContext) and what it does (Sink)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TextIO

# The validation figures a logged step may carry (train/eval.py).
VAL_KEYS = ("val_loss", "val_bpb", "val_perplexity")


@dataclass(frozen=True)
class SinkContext:
    """What a sink may know of its run."""

    run_dir: Path
    config: dict[str, Any]  # RunConfig.to_dict()
    total_steps: int
    start_step: int  # the step this launch resumed from (0: a new run)
    console: TextIO


class Sink(Protocol):
    def log(self, record: dict[str, Any]) -> None:
        """One logged step's figures (numbers, None where a figure is unknown)."""

    def close(self, summary: dict[str, Any], files: dict[str, Path]) -> None:
        """The end of this launch: the run's summary, and files made at the end (e.g. {"loss.png": path})."""
