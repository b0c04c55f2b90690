"""Held-out validation and make eval (train/eval.py): the split, evaluation during training and after it, loss.png.

data.path inference is in test_config.py; the BPE tokenizer and prepare's overwrite guard in test_prepare.py."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from env.records.plots import TRAIN_LABEL, VAL_LABEL, write_loss_plot
from tests.helpers.commands import one_line_error, run_module
from tests.helpers.corpus import write_corpus
from tests.helpers.trainrun import launch_train, losses, metrics
from train.config import RunConfig
from train.config_loader import default_config
from train.data import build_dataset, build_loader, validation_set
from train.data.split import split_samples

# ---------------------------------------------------------------------------- the split


def files_config(path: str, seed: int, val_fraction: float = 0.1) -> RunConfig:
    cfg = default_config()
    cfg.data.source, cfg.data.path, cfg.data.seq_len = "files", path, 16
    cfg.data.val_fraction = val_fraction
    cfg.train.micro_batch, cfg.train.seed = 4, seed
    return cfg


def test_validation_samples_are_never_trained_on_for_any_seed(tmp_path: Path) -> None:
    write_corpus(tmp_path, files=2, lines=40)
    held_out = None
    for seed in (1, 2):
        cfg = files_config(str(tmp_path / "*.txt"), seed)
        dataset = build_dataset(cfg)
        split = split_samples(dataset, cfg)
        assert held_out is None or np.array_equal(split.val, held_out)  # the seed does not move the split
        held_out = split.val
        assert len(split.val) == math.ceil(len(dataset) * 0.1 - 1e-9) and len(split.train) + len(split.val) == len(
            dataset
        )
        val_windows = {tuple(dataset[int(i)][0].tolist()) for i in split.val}
        # Two epochs of every rank of a 2-rank stream: all of the training split, none of the validation.
        steps = 2 * math.ceil(len(split.train) / (2 * cfg.train.micro_batch)) + 1
        seen = set()
        for rank in (0, 1):
            loader = iter(build_loader(dataset, cfg, rank, 2, start_step=0))
            for _ in range(steps):
                inputs, _ = next(loader)
                seen |= {tuple(row.tolist()) for row in inputs}
        assert not seen & val_windows
        assert seen == {tuple(dataset[int(i)][0].tolist()) for i in split.train}


def test_a_separate_validation_set_leaves_all_of_data_path_to_training(tmp_path: Path) -> None:
    write_corpus(tmp_path / "train", files=1, lines=40)
    write_corpus(tmp_path / "val", files=1, lines=10)
    cfg = files_config(str(tmp_path / "train" / "*.txt"), seed=1)
    cfg.data.val_path = str(tmp_path / "val" / "*.txt")
    dataset = build_dataset(cfg)
    assert len(split_samples(dataset, cfg).train) == len(dataset)
    held_out, indices = validation_set(dataset, cfg)
    assert held_out.origin == cfg.data.val_path and list(indices) == list(range(len(held_out)))


# ---------------------------------------------------------------------------- training runs with eval


EVAL = ["train.eval_every=2", "train.eval_batches=3", "train.ckpt_every=2"]


@pytest.fixture(scope="module")
def eval_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Four-step runs on 2 ranks: eval on, eval off, and eval on stopped at 2 then resumed."""
    root = tmp_path_factory.mktemp("eval-runs")
    runs = {name: root / name for name in ("on", "off", "resumed")}
    for name, overrides, steps in (
        ("on", EVAL, [4]),
        ("off", ["train.eval_every=0", "train.ckpt_every=2"], [4]),
        ("resumed", EVAL, [2, 4]),
    ):
        for count in steps:
            result = launch_train(runs[name], 2, count, "train.micro_batch=2", *overrides)
            assert result.returncode == 0, result.stderr
    return runs


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir)}


def test_evaluation_never_changes_training(eval_runs: dict[str, Path]) -> None:
    on, off = train_losses(eval_runs["on"]), train_losses(eval_runs["off"])
    assert on == off and len(on) == 4  # bitwise: floats compared with ==
    assert [r["step"] for r in metrics(eval_runs["on"]) if "val_loss" in r] == [2, 4]
    assert not any("val_loss" in r for r in metrics(eval_runs["off"]))


def test_resume_across_an_evaluation_is_exact(eval_runs: dict[str, Path]) -> None:
    assert train_losses(eval_runs["resumed"]) == train_losses(eval_runs["on"])
    val = {r["step"]: r["val_loss"] for r in metrics(eval_runs["resumed"]) if "val_loss" in r}
    assert val == {r["step"]: r["val_loss"] for r in metrics(eval_runs["on"]) if "val_loss" in r}


def test_figures_reach_the_summary_the_plot_and_compare(eval_runs: dict[str, Path]) -> None:
    run = eval_runs["on"]
    summary = json.loads((run / "summary.json").read_text())
    records = metrics(run)
    assert summary["val_loss"] == records[-1]["val_loss"] and summary["val_bpb"] == records[-1]["val_bpb"]
    assert summary["val_bpb"] == pytest.approx(summary["val_loss"] / math.log(2))  # bytes: one byte a token
    assert all(isinstance(r["time"], float) for r in records)
    assert (run / "loss.png").stat().st_size > 0
    drawn = write_loss_plot(run)
    assert drawn[f"{TRAIN_LABEL} vs step"] == ([1, 2, 3, 4], losses(run))
    assert drawn[f"{VAL_LABEL} vs step"] == ([2, 4], [r["val_loss"] for r in records if "val_loss" in r])
    tokens = [r["tokens"] for r in records]
    assert drawn[f"{TRAIN_LABEL} vs tokens"][0] == tokens and tokens == [s * 4 * 32 for s in (1, 2, 3, 4)]

    plot = run.parent / "overlay.png"
    result = run_module("env.records.compare", str(run), str(eval_runs["resumed"]), "--plot", str(plot))
    assert result.returncode == 0, result.stderr
    assert any(line.split()[:1] == ["val_loss"] for line in result.stdout.splitlines())
    assert plot.stat().st_size > 0 and str(plot) in result.stdout


def test_make_eval_gives_the_logged_validation_loss(eval_runs: dict[str, Path]) -> None:
    run = eval_runs["on"]
    result = run_module("train.eval", "--run-dir", str(run))
    assert result.returncode == 0, result.stderr
    record = json.loads((run / "eval.json").read_text())
    # The newest checkpoint is step 4, evaluated during training on the same samples (eval_batches=3).
    assert record["step"] == 4 and record["val_loss"] == pytest.approx(metrics(run)[-1]["val_loss"], rel=1e-6)
    assert "val_loss" in result.stdout
    text = run.parent / "other.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 200)
    on_data = run_module("train.eval", "--run-dir", str(run), "--data", str(text))
    assert on_data.returncode == 0, on_data.stderr
    record = json.loads((run / "eval.json").read_text())
    assert record["data"] == str(text) and record["samples"] == (len(text.read_bytes()) + 1 - 1) // 32


def test_make_eval_of_empty_data_or_damaged_checkpoints_is_one_line_in_evals_words(
    eval_runs: dict[str, Path], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(eval_runs["off"], run)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    line = one_line_error(run_module("train.eval", "--run-dir", str(run), "--data", str(empty)))
    assert "matches only empty files (1 file, 0 bytes)" in line, line
    for tensors in run.glob("checkpoints/step-*/*.distcp"):
        tensors.write_bytes(tensors.read_bytes()[:-1])
    line = one_line_error(run_module("train.eval", "--run-dir", str(run)))
    assert "is damaged (step-000004, step-000002;" in line and "nothing to evaluate" in line, line
    assert "train over" not in line  # the words of a training run's refusal


def test_make_eval_without_a_checkpoint_is_one_line(tmp_path: Path) -> None:
    assert "has no checkpoint" in one_line_error(run_module("train.eval", "--run-dir", str(tmp_path)))


def test_a_validation_split_smaller_than_a_batch_is_one_line(tmp_path: Path) -> None:
    write_corpus(tmp_path / "text", files=1, lines=20)
    result = launch_train(
        tmp_path / "run", 1, 2, f"data.path={tmp_path / 'text' / '*.txt'}", "data.val_fraction=0.001",
        "train.micro_batch=8", "train.eval_every=1",
    )  # fmt: skip
    assert "needs a validation split of at least one batch" in one_line_error(result)


# ---------------------------------------------------------------------------- world-size independence


def test_val_loss_is_the_same_at_1x6_2x3_and_3x2(tmp_path: Path) -> None:
    write_corpus(tmp_path / "text", files=2, lines=80)
    figures = []
    for ranks, micro_batch in ((1, 6), (2, 3), (3, 2)):
        run_dir = tmp_path / f"r{ranks}"
        result = launch_train(
            run_dir, ranks, 1, f"data.path={tmp_path / 'text' / '*.txt'}", f"train.micro_batch={micro_batch}",
            "train.eval_every=1", "train.eval_batches=0",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        figures.append(metrics(run_dir)[-1]["val_loss"])
    assert figures[1] == pytest.approx(figures[0], rel=1e-6) and figures[2] == pytest.approx(figures[0], rel=1e-6)
