"""A run directory across launches: whether it is finished, and its history.

A RUN_DIR outlives the launch that made it: a run is resumed, stopped, resumed again. This module
holds what the launcher decides about a RUN_DIR before any worker starts (is it already complete?;
whether another job holds it is env/runlock.py's), and the history a resumed run reads back so
that summary.json covers the whole run, not only its last segment. The history is metrics.jsonl
itself: no state is added to the checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SUMMARY_NAME = "summary.json"
METRICS_NAME = "metrics.jsonl"


def completed_steps(run_dir: Path, steps: int) -> int | None:
    """The step a finished run reached, when its summary says it ran to `steps` or beyond; else None.

    A run that stopped early (SIGTERM), crashed (no summary yet) or is asked for more steps is not
    complete; a summary that cannot be read is not evidence that it is.
    """
    try:
        summary = json.loads((Path(run_dir) / SUMMARY_NAME).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(summary, dict) or summary.get("stopped_early") is not False:
        return None
    reached = summary.get("steps")
    if isinstance(reached, int) and not isinstance(reached, bool) and reached >= steps:
        return reached
    return None


def earlier_records(run_dir: Path, up_to_step: int) -> list[dict[str, Any]]:
    """The rows metrics.jsonl holds for steps 1..up_to_step, the newest row of each step, in step order.

    A resumed run's checkpoint is at up_to_step: rows past it come from a segment that was lost and
    is trained again, and a row cut short by a kill is skipped.
    """
    if up_to_step <= 0:
        return []
    by_step: dict[int, dict[str, Any]] = {}
    try:
        with open(Path(run_dir) / METRICS_NAME, encoding="utf-8", errors="replace") as rows:
            for line in rows:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                step = record.get("step") if isinstance(record, dict) else None
                if isinstance(step, int) and 0 < step <= up_to_step and isinstance(record.get("loss"), (int, float)):
                    by_step[step] = record
    except OSError:
        return []
    return [by_step[step] for step in sorted(by_step)]
