"""What a run reports: JSON lines that survive a resume, a console line with an ETA, a steady-state summary."""

from __future__ import annotations

import io
import json
import re

from train import sinks as sink_table
from train.metrics import MetricsLogger


def record(step: int, step_ms: float, loss: float = 2.0) -> dict:
    per_sec = 1000 / step_ms
    return {"step": step, "loss": loss, "lr": 1e-3, "grad_norm": 1.0, "step_ms": step_ms, "samples_per_sec": per_sec,
            "tokens_per_sec": 128 * per_sec, "mfu": None, "peak_mem_gb": 1.5}  # fmt: skip


def test_lines_append_across_a_resume_and_the_console_shows_an_eta(tmp_path) -> None:
    console = io.StringIO()
    first = MetricsLogger(tmp_path, is_main=True, total_steps=100, console=console)
    first.log(record(10, step_ms=200))
    first.close()
    second = MetricsLogger(tmp_path, is_main=True, total_steps=100, console=console)
    second.log(record(20, step_ms=200))
    second.close()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [10, 20]
    assert console.getvalue().splitlines()[0].endswith(" 0m18s")  # 90 steps left at 200 ms


def test_the_summary_leaves_out_the_warm_up_and_only_the_main_rank_writes(tmp_path) -> None:
    logger = MetricsLogger(tmp_path, is_main=True, total_steps=20, console=io.StringIO())
    for step in range(1, 21):
        logger.log(record(step, step_ms=900 if step <= 2 else 100, loss=5.0 - step / 10))
    summary = logger.summary({"world_size": 1})
    assert summary["step_ms"] == 100 and summary["steps"] == 20 and summary["world_size"] == 1
    assert summary["first_loss"] == 4.9 and summary["final_loss"] == 3.0
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    other = tmp_path / "other"
    MetricsLogger(other, is_main=False, total_steps=20).summary({})
    assert not other.exists()


def test_tensorboard_gets_every_numeric_figure(tmp_path) -> None:
    sinks = ["console", "jsonl", "tensorboard"]
    logger = MetricsLogger(tmp_path, is_main=True, total_steps=10, sinks=sinks, console=io.StringIO())
    logger.log(record(1, step_ms=100))
    logger.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert {"loss", "lr", "step_ms", "samples_per_sec"} <= set(events.Tags()["scalars"])


def test_the_eta_is_the_mean_over_the_run_so_one_slow_window_does_not_make_it_jump(tmp_path) -> None:
    console = io.StringIO()
    logger = MetricsLogger(tmp_path, is_main=True, total_steps=1000, console=console)
    # Windows of 100 steps: a start-up window (compilation), then steady ones and one slow one.
    for step, step_ms in ((100, 3000), (200, 100), (300, 100), (400, 400), (500, 100)):
        logger.log(record(step, step_ms=step_ms))
    etas = [line.rsplit("eta", 1)[1].strip() for line in console.getvalue().splitlines()]
    # The start-up window counts only until another exists; then the mean of the later windows:
    # 900 x 3 s, 800 x 0.1 s, 700 x 0.1 s, 600 x 0.2 s (not 600 x 0.4 s), 500 x 0.175 s.
    assert etas == ["45m00s", "1m20s", "1m10s", "2m00s", "1m27s"]


def test_console_columns_keep_their_width_as_numbers_grow(tmp_path) -> None:
    console = io.StringIO()
    logger = MetricsLogger(tmp_path, is_main=True, total_steps=100000, console=console)
    logger.log(record(1, step_ms=0.5, loss=0.25) | {"mfu": 0.05, "peak_mem_gb": 0.1})
    logger.log(record(99999, step_ms=98765.4, loss=12.5) | {"mfu": 0.95, "peak_mem_gb": 123.45})
    first, second = console.getvalue().splitlines()
    assert len(first) == len(second)
    assert [m.start() for m in re.finditer(r"\|", first)] == [m.start() for m in re.finditer(r"\|", second)]


def test_a_resumed_run_summarises_the_whole_run_and_drops_rows_of_a_lost_segment(tmp_path) -> None:
    first = MetricsLogger(tmp_path, is_main=True, total_steps=20, console=io.StringIO())
    for step in range(1, 13):  # logged to step 12, but its last checkpoint is step 10: 11 and 12 are lost
        first.log(record(step, step_ms=100, loss=9.0 - step / 10))
    first.close()
    second = MetricsLogger(tmp_path, is_main=True, total_steps=20, console=io.StringIO(), start_step=10)
    for step in range(11, 21):
        second.log(record(step, step_ms=100, loss=5.0 - step / 10))
    summary = second.summary({})
    assert summary["first_loss"] == 8.9 and summary["final_loss"] == 3.0 and summary["steps"] == 20
    assert summary["resumed_from_step"] == 10


def test_a_sink_is_one_row_of_the_table_and_gets_every_row_then_the_summary_and_the_plot(tmp_path, monkeypatch) -> None:
    seen: dict = {"rows": [], "closed": None}

    class Recorder:
        def __init__(self, context) -> None:
            seen["context"] = context

        def log(self, row) -> None:
            seen["rows"].append(row)

        def close(self, summary, files) -> None:
            seen["closed"] = (summary, files)

    monkeypatch.setitem(sink_table.SINKS, "recorder", Recorder)
    logger = MetricsLogger(tmp_path, True, 10, sinks=["jsonl", "recorder"], config={"name": "x"}, console=io.StringIO())
    for step in (1, 2):
        logger.log(record(step, step_ms=100))
    summary = logger.summary({})
    logger.close()
    assert [row["step"] for row in seen["rows"]] == [1, 2] and seen["context"].config == {"name": "x"}
    assert seen["closed"][0] == summary and seen["closed"][1]["loss.png"] == tmp_path / "loss.png"
    assert (tmp_path / "loss.png").is_file() and logger._outputs[0].__class__.__name__ == "JsonlSink"
    MetricsLogger(tmp_path / "other", False, 10, sinks=["jsonl", "recorder"]).log(record(1, step_ms=1))
    assert len(seen["rows"]) == 2  # only the main rank makes sinks
