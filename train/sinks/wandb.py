"""The W&B sink: every metrics row as a W&B history step, the config and manifest as the run's config, loss.png.

On when train.sinks names it, or when WANDB_PROJECT is set (unless WANDB_MODE=disabled). W&B's own
variables apply as usual: WANDB_PROJECT (default "torchrig"), WANDB_ENTITY, WANDB_MODE=offline (no
network: `wandb sync` uploads later), WANDB_API_KEY, WANDB_BASE_URL; WANDB_DIR, else RUN_DIR, holds
its files. The W&B run is named after RUN_DIR and its id kept in RUN_DIR/trackers.json: a resumed run
goes on in it (W&B ignores steps at or before the last one it has, after a resume from an older
checkpoint). Console capture is off: the console already goes where the launcher sends it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from env.records.plots import LOSS_PLOT_NAME
from train.sinks.base import SinkContext
from train.sinks.tracker import MANIFEST_NAME, Tracker, figures, import_tracker, keep_run, kept_run, parameters

DEFAULT_PROJECT = "torchrig"


class WandbSink:
    def __init__(self, context: SinkContext) -> None:
        self.wandb = import_tracker("wandb", "wandb", "the wandb sink")
        self.run_dir = context.run_dir
        self.tracker = Tracker("W&B", context.console)
        self.run: Any = self.tracker.call("to start its run", lambda: self._start(context))

    def _start(self, context: SinkContext) -> Any:
        kept = kept_run(self.run_dir, "wandb")
        run = self.wandb.init(
            project=os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
            id=kept.get("id"),  # None: W&B draws one for a new run
            resume="allow",
            name=self.run_dir.name,
            dir=os.environ.get("WANDB_DIR") or str(self.run_dir),
            settings=self.wandb.Settings(console="off"),
        )
        run.config.update(parameters(context), allow_val_change=True)
        keep_run(self.run_dir, "wandb", {"id": run.id, "project": run.project})
        return run

    def log(self, record: dict[str, Any]) -> None:
        if self.run is not None:
            self.tracker.call("to log a step", lambda: self.run.log(figures(record), step=record["step"]))

    def close(self, summary: dict[str, Any], files: dict[str, Path]) -> None:
        if self.run is None:
            return

        def finish() -> None:
            plot = files.get(LOSS_PLOT_NAME)
            if plot is not None:
                self.run.save(str(plot), base_path=str(plot.parent), policy="now")
            if (self.run_dir / MANIFEST_NAME).is_file():
                self.run.save(str(self.run_dir / MANIFEST_NAME), base_path=str(self.run_dir), policy="now")
            self.run.finish()

        self.tracker.call("to finish its run", finish)
