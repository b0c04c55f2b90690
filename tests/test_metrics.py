"""What a run reports: JSON lines that survive a resume, a console line with an ETA, a steady-state summary."""

from __future__ import annotations

import io
import json

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
    assert "eta 0m18s" in console.getvalue().splitlines()[0]  # 90 steps left at 200 ms


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
    logger = MetricsLogger(tmp_path, is_main=True, total_steps=10, tensorboard=True, console=io.StringIO())
    logger.log(record(1, step_ms=100))
    logger.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert {"loss", "lr", "step_ms", "samples_per_sec"} <= set(events.Tags()["scalars"])
