"""The MLflow sink: every metrics row as MLflow metrics at its step, the config and manifest as parameters, loss.png.

On when train.sinks names it, or when MLFLOW_TRACKING_URI is set. The store is MLFLOW_TRACKING_URI
(a server, or a local sqlite:///…), else sqlite:///RUN_DIR/mlflow.db, whose artifacts (loss.png, manifest.json)
go to mlflow-artifacts/ beside it; the experiment is
MLFLOW_EXPERIMENT_NAME, else "torchrig". MLflow's own variables (MLFLOW_TRACKING_TOKEN, its HTTP
retries and timeouts) apply as usual. The MLflow run is named after RUN_DIR and its id kept in
RUN_DIR/trackers.json: a resumed run appends to it. Parameters are written once (MLflow refuses to
change one): a resumed launch adds only new keys.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from env.records.plots import LOSS_PLOT_NAME
from train.sinks.base import SinkContext
from train.sinks.tracker import MANIFEST_NAME, Tracker, figures, flat, import_tracker, keep_run, kept_run, parameters

DEFAULT_EXPERIMENT = "torchrig"
STORE_NAME = "mlflow.db"
ARTIFACTS_NAME = "mlflow-artifacts"
SQLITE = "sqlite:///"
# MLflow's limits: 100 parameters per log_batch call, 6000 characters per parameter value.
PARAMS_PER_CALL = 100
PARAM_VALUE_CHARS = 6000


class MlflowSink:
    def __init__(self, context: SinkContext) -> None:
        import_tracker("mlflow", "mlflow-skinny", "the mlflow sink")
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self.Metric, self.Param = Metric, Param
        self.run_dir = context.run_dir
        self.uri = os.environ.get("MLFLOW_TRACKING_URI") or ""
        if not self.uri:  # MLflow's local store of choice; its file store is deprecated
            import_tracker("sqlalchemy", "sqlalchemy alembic", "the mlflow sink's local store (no MLFLOW_TRACKING_URI)")
            self.uri = f"sqlite:///{(context.run_dir / STORE_NAME).resolve()}"
        self.client = MlflowClient(tracking_uri=self.uri)
        self.tracker = Tracker(f"MLflow ({self.uri})", context.console)
        self.run_id: str | None = self.tracker.call("to start its run", lambda: self._start(context))

    def _start(self, context: SinkContext) -> str:
        kept = kept_run(self.run_dir, "mlflow")
        run_id = kept.get("run_id") if kept.get("tracking_uri") == self.uri else None
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
            known = set(self.client.get_run(run_id).data.params)
        else:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self._create_experiment(name)
            run_id = self.client.create_run(experiment_id, run_name=self.run_dir.name).info.run_id
            known = set()
        params = [
            self.Param(key, str(value)[:PARAM_VALUE_CHARS])
            for key, value in flat(parameters(context)).items()
            if key not in known
        ]
        for start in range(0, len(params), PARAMS_PER_CALL):
            self.client.log_batch(run_id, params=params[start : start + PARAMS_PER_CALL])
        keep_run(self.run_dir, "mlflow", {"run_id": run_id, "tracking_uri": self.uri})
        return run_id

    def _create_experiment(self, name: str) -> str:
        """An experiment; in a local sqlite store, with its artifacts beside the store (MLflow's default is the
        working directory's ./mlruns)."""
        location = None
        if self.uri.startswith(SQLITE):
            location = (Path(self.uri[len(SQLITE) :]).parent / ARTIFACTS_NAME).resolve().as_uri()
        return self.client.create_experiment(name, artifact_location=location)

    def log(self, record: dict[str, Any]) -> None:
        if self.run_id is None:
            return
        stamp = int(record.get("time", 0) * 1000)
        metrics = [self.Metric(key, value, stamp, record["step"]) for key, value in figures(record).items()]
        self.tracker.call("to log a step", lambda: self.client.log_batch(self.run_id, metrics=metrics))

    def close(self, summary: dict[str, Any], files: dict[str, Path]) -> None:
        if self.run_id is None:
            return

        def finish() -> None:
            for path in (files.get(LOSS_PLOT_NAME), self.run_dir / MANIFEST_NAME):
                if path is not None and path.is_file():
                    self.client.log_artifact(self.run_id, str(path))
            self.client.set_terminated(self.run_id)

        self.tracker.call("to finish its run", finish)
