"""Issue 16, "figures and words that mislead": each figure named for what it is, each message true.

The console's and metrics.jsonl's `loss` included the MTP term beside a next-token `val_loss`;
SPECULATE=1 re-measured its own baseline at another moment; make compare showed a 23.6x step-time
ratio with no noise caution, and exited 0 without the PNG for an OUTPUT in a missing folder;
warmup_steps > STEPS gave no warning; VOCAB without TOKENIZER=bpe was ignored; the exit codes listed
in the docs never reach the shell through make. (Eval's DATA words: tests/test_harden_eval.py; the
removed checkpoints folder: tests/test_harden_checkpoint_race.py.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.helpers.paths import ROOT
from tests.helpers.sampling import small_config, trained_in_process, write_export
from tests.helpers.trainrun import launch_train, metrics
from train.errors import DataError


def test_the_model_reports_its_next_token_loss_beside_the_mtp_objective() -> None:
    cfg = small_config()  # tiny: one MTP depth
    model = trained_in_process(cfg, steps=0)
    tokens = torch.randint(0, 256, (2, 33))
    loss, parts = model(tokens[:, :-1], tokens[:, 1:], parts=True)
    logits = model(tokens[:, :-1])
    next_token = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
    assert torch.allclose(parts["next_token_loss"], next_token) and loss > parts["next_token_loss"]
    assert torch.equal(model(tokens[:, :-1], tokens[:, 1:]), loss)  # the plain call is unchanged


def test_training_logs_and_prints_both_losses_named(tmp_path: Path) -> None:
    result = launch_train(tmp_path / "run", 2, 2)
    assert result.returncode == 0, result.stderr
    rows = metrics(tmp_path / "run")
    assert all(r["next_token_loss"] < r["loss"] for r in rows)
    assert "= next-token" in result.stdout and "+ mtp" in result.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["final_next_token_loss"] == rows[-1]["next_token_loss"]


def test_speculation_prints_no_speed_up_against_a_baseline_timed_at_another_moment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from train import sample

    cfg = small_config()
    write_export(tmp_path, trained_in_process(cfg, steps=1), cfg.to_dict()["model"])
    assert sample.main(["--run-dir", str(tmp_path), "--tokens", "12", "--temperature", "0", "--speculate", "1"]) == 0
    err = capsys.readouterr().err
    assert "drafts accepted" in err and "tokens per main-model forward" in err and "train.benchmarks.sample" in err
    assert "speed-up" not in err and "measured after" not in err


def compare_runs(root: Path, step_ms: dict[str, list[float]]) -> list[Path]:
    """Two run directories whose logged step times are the given ones."""
    runs = []
    for name, times in step_ms.items():
        run = root / name
        run.mkdir(parents=True)
        (run / "manifest.json").write_text(json.dumps({"packages": {"list": []}}))
        rows = [{"step": i + 1, "loss": 1.0, "step_ms": t, "samples_per_sec": 1000 / t} for i, t in enumerate(times)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (run / "summary.json").write_text(json.dumps({"step_ms": sorted(times)[len(times) // 2]}))
        runs.append(run)
    return runs


def test_compare_marks_a_timing_ratio_within_noise_by_benchs_rule(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from env.records import compare

    steady, noisy = [100.0, 101.0, 99.0, 100.5, 99.5] * 4, [100.0, 2360.0, 95.0, 400.0, 110.0] * 4
    a, b = compare_runs(tmp_path / "noisy", {"a": steady, "b": noisy})
    assert compare.main([str(a), str(b), "--plot", str(tmp_path / "noisy.png")]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.split()[:1] == ["step_ms"])
    assert row.endswith("NOISE") and "B's step times spread ±" in out and "more than ±10%" in out
    a, b = compare_runs(tmp_path / "steady", {"a": steady, "b": [2 * t for t in steady]})
    assert compare.main([str(a), str(b), "--plot", str(tmp_path / "steady.png")]) == 0
    assert "NOISE" not in capsys.readouterr().out


def test_compare_into_a_missing_folder_is_refused_not_exit_0_without_the_png(tmp_path: Path) -> None:
    from env.records import compare

    a, b = compare_runs(tmp_path, {"a": [1.0, 1.0], "b": [1.0, 1.0]})
    with pytest.raises(compare.CompareError, match=r"its folder .*missing does not exist; create it"):
        compare.main([str(a), str(b), "--plot", str(tmp_path / "missing" / "x.png")])


def test_warmup_longer_than_the_run_is_said(capsys: pytest.CaptureFixture[str]) -> None:
    from train.launch import warn_short_warmup

    warn_short_warmup(small_config("train.steps=20", "train.warmup_steps=100", "train.lr=3e-4"))
    out = capsys.readouterr().out
    assert "train.warmup_steps=100 is more than train.steps=20" in out and "(20% of train.lr=0.0003)" in out
    warn_short_warmup(small_config("train.steps=20", "train.warmup_steps=20"))
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("tokenizer", ["bytes", "some/tokenizer.json"])
def test_vocab_without_a_bpe_to_train_is_refused(tmp_path: Path, tokenizer: str) -> None:
    from train import prepare

    (tmp_path / "a.txt").write_text("text\n")
    with pytest.raises(DataError, match=rf"VOCAB=300 sets the size of a BPE .* TOKENIZER={tokenizer} has its own"):
        prepare.main(["--procs", "1", "--input", str(tmp_path / "a.txt"), "--output", str(tmp_path / "x.bin"),
                      "--tokenizer", tokenizer, "--vocab", "300"])  # fmt: skip
    assert not (tmp_path / "x.bin").exists()


@pytest.mark.parametrize(("page", "code"), [("bench.md", "3"), ("doctor.md", "1"), ("nccl-test.md", "1")])
def test_the_exit_codes_are_listed_with_how_they_reach_the_shell(page: str, code: str) -> None:
    text = " ".join((ROOT / "docs" / page).read_text().split())
    assert f"Error {code}" in text and "torchrig " in text and "exits 2" in text
