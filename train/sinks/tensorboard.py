"""The TensorBoard sink: every numeric figure as a scalar under RUN_DIR/tensorboard."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from train.sinks.base import SinkContext


class TensorBoardSink:
    def __init__(self, context: SinkContext) -> None:
        from torch.utils.tensorboard import SummaryWriter  # optional and slow to import: only runs that log to it

        self.writer = SummaryWriter(str(context.run_dir / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "time"):
                self.writer.add_scalar(key, value, record["step"])

    def close(self, summary: dict[str, Any], files: dict[str, Path]) -> None:
        self.writer.close()
