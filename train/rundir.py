"""A run directory across launches: whether it is finished, and its history.

A RUN_DIR outlives the launch that made it: a run is resumed, stopped, resumed again. This module
holds what the launcher decides about a RUN_DIR before any worker starts (is it already complete?;
whether another job holds it is env/records/runlock.py's), and the history a resumed run reads back so
that summary.json covers the whole run, not only its last segment. The history is metrics.jsonl
itself: no state is added to the checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from env.common.atomic import write_fix
from env.common.cli import UserError
from env.common.readfile import open_regular, read_regular

SUMMARY_NAME = "summary.json"
METRICS_NAME = "metrics.jsonl"
# Bounds on reading them back (env/common/readfile.py): far above what a run writes, far below harm.
SUMMARY_LIMIT = 1 << 20
METRICS_LIMIT = 1 << 30
ROW_LIMIT = 1 << 16


class RunDirWriteError(UserError):
    """Writing a run's figures into RUN_DIR failed (a full disk, say): one line with the file and the fix."""

    def __init__(self, path: Path, error: OSError):
        reason = error.strerror or str(error)
        fix = write_fix(error)
        super().__init__(f"writing {path} failed ({reason}): {fix}; checkpoints already written are intact")


def completed_steps(run_dir: Path, steps: int) -> int | None:
    """The step a finished run reached, when its summary says it ran to `steps` or beyond; else None.

    A run that stopped early (SIGTERM), crashed (no summary yet) or is asked for more steps is not
    complete; a summary that cannot be read is not evidence that it is.
    """
    text = read_regular(Path(run_dir) / SUMMARY_NAME, SUMMARY_LIMIT)
    try:
        summary = json.loads(text) if text is not None else None
    except (ValueError, UnicodeDecodeError, RecursionError):
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
    rows = open_regular(Path(run_dir) / METRICS_NAME, METRICS_LIMIT)
    if rows is None:
        return []
    with rows:
        while line := rows.readline(ROW_LIMIT):
            if not line.endswith(b"\n") and len(line) == ROW_LIMIT:
                while (rest := rows.readline(ROW_LIMIT)) and not rest.endswith(b"\n"):
                    pass  # an over-long row is no row of ours: skip to its end
                continue
            try:
                record = json.loads(line)
            except (ValueError, UnicodeDecodeError, RecursionError):
                continue
            step = record.get("step") if isinstance(record, dict) else None
            if isinstance(step, int) and 0 < step <= up_to_step and isinstance(record.get("loss"), (int, float)):
                by_step[step] = record
    return [by_step[step] for step in sorted(by_step)]
