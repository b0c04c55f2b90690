"""The jsonl sink: RUN_DIR/metrics.jsonl, one JSON object per logged step, appended across resumes.

It is the run's record: summary.json, loss.png, `make compare` and a resumed run's summary read it, so
train.sinks always keeps it (train/config_loader.py).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from train.rundir import METRICS_NAME, RunDirWriteError
from train.sinks.base import SinkContext


class JsonlSink:
    def __init__(self, context: SinkContext) -> None:
        self.path = context.run_dir / METRICS_NAME
        try:
            context.run_dir.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "a")  # noqa: SIM115 - open for the run; appends across resumes
        except OSError as exc:
            raise RunDirWriteError(self.path, exc) from exc

    def log(self, record: dict[str, Any]) -> None:
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as exc:
            raise RunDirWriteError(self.path, exc) from exc

    def close(self, summary: dict[str, Any], files: dict[str, Path]) -> None:
        with contextlib.suppress(OSError):  # a write that failed already said so
            self.file.close()
