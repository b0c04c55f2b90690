"""What the tracker sinks (W&B, MLflow) share: the tracker run kept in RUN_DIR, the run's parameters, and a
tracker that fails being one warning line, never the end of a run.

A tracker run's id is kept in RUN_DIR/trackers.json, so a resumed run goes on in the same tracker run.
Its parameters are the run's config and its manifest.json (the first launch's: `launches` in the
manifest lists every later one). A tracker that cannot be reached, at the start or later, prints one
warning line and is dropped for the rest of the launch; metrics.jsonl keeps every figure regardless.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, TextIO, TypeVar

from env.common.atomic import write_text_atomically
from env.common.cli import UserError
from env.common.readfile import read_regular
from train.sinks.base import SinkContext

TRACKERS_NAME = "trackers.json"
MANIFEST_NAME = "manifest.json"
RECORD_LIMIT = 16 << 20  # trackers.json and manifest.json are small; a larger one is not ours
# Figures of a metrics row that are not metrics: the x axis and the wall clock.
NOT_FIGURES = ("step", "time")
T = TypeVar("T")


class SinkUnavailable(UserError):
    """A tracker sink whose package is not installed."""


def import_tracker(module: str, install: str, what: str) -> ModuleType:
    """The tracker's package, or SinkUnavailable: one line naming the install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SinkUnavailable(f"{what} needs {install}: pip install {install} (the image has it)") from None


def _read_json(path: Path) -> dict[str, Any]:
    data = read_regular(path, RECORD_LIMIT) if path.is_file() else None  # is_file: never open a planted FIFO
    try:
        value = json.loads(data) if data is not None else {}
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def kept_run(run_dir: Path, tracker: str) -> dict[str, Any]:
    """What an earlier launch of this run kept of its tracker run ({} for a new run)."""
    kept = _read_json(run_dir / TRACKERS_NAME).get(tracker)
    return kept if isinstance(kept, dict) else {}


def keep_run(run_dir: Path, tracker: str, record: dict[str, Any]) -> None:
    """Keep the tracker run's id in RUN_DIR, so that a resumed run goes on in it."""
    kept = _read_json(run_dir / TRACKERS_NAME)
    kept[tracker] = record
    write_text_atomically(run_dir / TRACKERS_NAME, json.dumps(kept, indent=1) + "\n")


def parameters(context: SinkContext) -> dict[str, Any]:
    """The run's parameters: its config, and the manifest of its first launch."""
    return {"config": context.config, "manifest": _read_json(context.run_dir / MANIFEST_NAME)}


def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay whole values."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def figures(record: dict[str, Any]) -> dict[str, float]:
    """The numeric figures of a metrics row (what metrics.jsonl holds), without step and time."""
    return {
        key: float(value)
        for key, value in record.items()
        if key not in NOT_FIGURES and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


class Tracker:
    """A tracker's calls, each guarded: the first failure is one warning line, then the tracker is left alone."""

    def __init__(self, name: str, console: TextIO) -> None:
        self.name = name
        self.console = console
        self.on = True

    def call(self, doing: str, action: Callable[[], T]) -> T | None:
        """action's result; None, after one warning line, when it fails (or an earlier call did)."""
        if not self.on:
            return None
        try:
            return action()
        except Exception as exc:  # a tracker's failure of any kind must not end training
            self.on = False
            text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            self.console.write(
                f"torchrig: warning: {self.name} failed {doing} ({text}); training goes on without it "
                "(metrics.jsonl has every figure)\n"
            )
            self.console.flush()
            return None
