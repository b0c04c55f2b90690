"""W&B and MLflow as sinks: the figures of metrics.jsonl, read back with each tracker's own reader; a resumed run
continues its tracker run; an unreachable tracker or a missing package is one line."""

from __future__ import annotations

import io
import json
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from wandb.proto import wandb_internal_pb2

from env.rig import docker, runtime
from tests.helpers.trainrun import launch_train, metrics
from train.sinks import SinkContext, chosen_sinks, make_sinks
from train.sinks.tracker import TRACKERS_NAME, SinkUnavailable

# The W&B transaction log (run-<id>.wandb) is LevelDB's log format: a 7-byte header (":W&B", magic 0xBEE1,
# version 0), then 32 KiB blocks of records, each a 7-byte header (crc32c, length, type: 1 full, 2 first,
# 3 middle, 4 last) and its bytes. Each record is a wandb_internal_pb2.Record, W&B's own schema. wandb
# 0.31 ships no Python reader of this file (wandb.sdk.internal.datastore was removed); this is that reader.
WANDB_BLOCK = 32768
WANDB_FULL, WANDB_FIRST, WANDB_MIDDLE, WANDB_LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> Iterator[wandb_internal_pb2.Record]:
    data = path.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1
    position, pending = 7, b""
    while position + 7 <= len(data):
        if WANDB_BLOCK - position % WANDB_BLOCK < 7:  # a block's tail too short for a header is padding
            position += WANDB_BLOCK - position % WANDB_BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (WANDB_FULL, WANDB_LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending + chunk)
            pending = b""
            yield record
        elif kind in (WANDB_FIRST, WANDB_MIDDLE):
            pending += chunk


def _key(item: object) -> str:
    """An item's key: in `key`, or (nested, as W&B writes them today) in `nested_key`."""
    return item.key or ".".join(item.nested_key)  # type: ignore[attr-defined]


def wandb_history(run_file: Path) -> tuple[str, dict[int, dict[str, float]], dict]:
    """(run id, {step: figures}, config) of one .wandb file."""
    run_id, history, config = "", {}, {}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
            config.update({_key(item): json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "config":
            config.update({_key(item): json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            items = {_key(item): json.loads(item.value_json) for item in record.history.item}
            history[record.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
    return run_id, history, config


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two steps, then a resume to four, with both trackers chosen by their environment alone."""
    root = tmp_path_factory.mktemp("trackers")
    store = root / "mlflow.db"
    env = {"WANDB_MODE": "offline", "WANDB_PROJECT": "torchrig-test", "MLFLOW_TRACKING_URI": f"sqlite:///{store}"}
    run_dir = root / "run"
    for steps in (2, 4):
        result = launch_train(run_dir, 1, steps, "train.eval_every=2", "train.eval_batches=1", env=env, timeout=600)
        assert result.returncode == 0, result.stderr
        assert "torchrig: warning" not in result.stdout + result.stderr, result.stdout + result.stderr
    return run_dir, store


def test_wandb_offline_holds_the_loss_history_and_a_resumed_run_continues_it(tracked_run: tuple[Path, Path]) -> None:
    run_dir, _ = tracked_run
    kept = json.loads((run_dir / TRACKERS_NAME).read_text())["wandb"]
    launches = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(launches) == 2
    histories = [wandb_history(path) for path in launches]
    assert {run_id for run_id, _, _ in histories} == {kept["id"]}  # one W&B run, resumed
    assert [sorted(history) for _, history, _ in histories] == [[1, 2], [3, 4]]
    logged = {r["step"]: r for r in metrics(run_dir)}
    for _, history, _ in histories:
        for step, figures in history.items():
            for key in ("loss", "lr", "tokens_per_sec", "step_ms", "grad_norm"):
                assert figures[key] == pytest.approx(logged[step][key]), (step, key)
    assert histories[0][1][2]["val_loss"] == pytest.approx(logged[2]["val_loss"])
    config = histories[0][2]
    assert config["config"]["train"]["steps"] == 2 and config["manifest"]["kind"] == "train"
    assert (launches[-1].parent / "files" / "loss.png").is_file()


def test_mlflow_has_one_point_per_logged_step_and_a_resumed_run_appends(tracked_run: tuple[Path, Path]) -> None:
    run_dir, store = tracked_run
    kept = json.loads((run_dir / TRACKERS_NAME).read_text())["mlflow"]
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("torchrig")
    assert [run.info.run_id for run in client.search_runs([experiment.experiment_id])] == [kept["run_id"]]
    logged = metrics(run_dir)
    history = client.get_metric_history(kept["run_id"], "loss")
    assert [(point.step, point.value) for point in history] == [(r["step"], pytest.approx(r["loss"])) for r in logged]
    assert [p.step for p in client.get_metric_history(kept["run_id"], "val_loss")] == [2, 4]
    run = client.get_run(kept["run_id"])
    assert run.data.params["config.train.steps"] == "2" and run.data.params["manifest.kind"] == "train"
    assert run.info.status == "FINISHED" and run.info.run_name == run_dir.name
    assert "loss.png" in {artifact.path for artifact in client.list_artifacts(kept["run_id"])}
    assert (store.parent / "mlflow-artifacts").is_dir()  # beside the store, not in the working directory


def test_unreachable_trackers_are_one_warning_line_each_and_training_goes_on(tmp_path: Path) -> None:
    env = {
        "WANDB_MODE": "online", "WANDB_PROJECT": "p", "WANDB_BASE_URL": "http://127.0.0.1:1",
        "WANDB_API_KEY": "x" * 40, "WANDB_INIT_TIMEOUT": "5",
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:1", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
    }  # fmt: skip
    run_dir = tmp_path / "run"
    result = launch_train(run_dir, 1, 3, "train.eval_every=0", env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stdout.splitlines() if line.startswith("torchrig: warning:")]
    assert len(warnings) == 2 and "W&B failed to start its run" in warnings[0], warnings
    assert "MLflow (http://127.0.0.1:1) failed to start its run" in warnings[1], warnings
    assert all("training goes on without it" in line for line in warnings)
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3]


def context(tmp_path: Path) -> SinkContext:
    return SinkContext(tmp_path, {"name": "x"}, 10, 0, io.StringIO())


def test_a_missing_package_is_one_line_naming_the_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` meets where it is not installed
    monkeypatch.setitem(sys.modules, "mlflow", None)
    for name, install in (("wandb", "pip install wandb"), ("mlflow", "pip install mlflow-skinny")):
        with pytest.raises(SinkUnavailable) as error:  # named in train.sinks: the run stops, in one line
            make_sinks(["console", "jsonl", name], context(tmp_path), {})
        assert install in str(error.value) and "\n" not in str(error.value)
    chosen = context(tmp_path)  # chosen by the environment: one warning line, the run goes on
    sinks = make_sinks(["jsonl"], chosen, {"WANDB_PROJECT": "p", "MLFLOW_TRACKING_URI": "http://x"})
    lines = chosen.console.getvalue().splitlines()  # type: ignore[attr-defined]
    assert [type(sink).__name__ for sink in sinks] == ["JsonlSink"] and len(lines) == 2
    assert lines[0].startswith("torchrig: warning: WANDB_PROJECT is set, but the wandb sink needs wandb")
    assert "MLFLOW_TRACKING_URI is set, but the mlflow sink needs mlflow-skinny" in lines[1]


def test_the_environment_adds_trackers_to_train_sinks() -> None:
    base = ["console", "jsonl"]
    assert chosen_sinks(base, {}) == base
    assert chosen_sinks(base, {"WANDB_PROJECT": "p"}) == [*base, "wandb"]
    assert chosen_sinks(base, {"WANDB_PROJECT": "p", "WANDB_MODE": "disabled"}) == base
    assert chosen_sinks(["mlflow", *base], {"MLFLOW_TRACKING_URI": "http://x"}) == [*base, "mlflow"]


def test_the_trackers_environment_reaches_the_job_under_both_runtimes(monkeypatch: pytest.MonkeyPatch) -> None:
    runtime.check_values("train", {"WANDB_PROJECT": "p", "MLFLOW_TRACKING_URI": "http://x"})  # make's command line
    monkeypatch.setenv("WANDB_API_KEY", "k")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://x")
    passed = docker.passthrough_env()  # what compose run is given with -e
    assert passed["WANDB_API_KEY"] == "k" and passed["MLFLOW_TRACKING_URI"] == "http://x"
