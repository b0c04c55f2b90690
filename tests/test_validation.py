"""Held-out validation, make eval, data.path inference, the BPE tokenizer, prepare's overwrite guard, loss.png."""

from __future__ import annotations

import io
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from env.records.plots import TRAIN_LABEL, VAL_LABEL, write_loss_plot
from env.rig.runtime import TARGETS, build_argv
from tests.conftest import ROOT
from tests.trainrun import launch_train, losses, metrics
from train.config import RunConfig
from train.config_loader import default_config, load_config
from train.data import build_dataset, build_loader, read_token_file, validation_set
from train.data.split import split_samples
from train.errors import ConfigError, DataError
from train.tokenizer import load_tokenizer

WORDS = ["alpha", "beta", "gamma", "delta", "über", "naïve", "日本語", "return", "def", "x = 1"]


def write_corpus(folder: Path, files: int = 3, lines: int = 300) -> list[Path]:
    """A few text files of seeded random words: enough text for a BPE and a validation split."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(files):
        text = "\n".join(" ".join(rng.choice(WORDS, 10)) for _ in range(lines)) + "\n"
        path = folder / f"doc{index}.txt"
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths


def run_cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("torchrig")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


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


def test_progress_shows_throughput_and_an_eta(monkeypatch: pytest.MonkeyPatch) -> None:
    from train import prepare

    monkeypatch.setattr(prepare, "PROGRESS_EVERY_S", 0.0)
    out = io.StringIO()
    prepare.Progress("tokenized", 4 * 2**20, out).add(2**20)
    assert "tokenized 1.0 of 4.0 MiB (25%)" in out.getvalue() and "MiB/s, eta" in out.getvalue()


# ---------------------------------------------------------------------------- data.path and vocab auto


def test_data_path_picks_the_source_or_is_refused_when_it_contradicts(tmp_path: Path) -> None:
    write_corpus(tmp_path / "text", files=1, lines=20)
    (tmp_path / "images" / "cat").mkdir(parents=True)
    glob = str(tmp_path / "text" / "*.txt")
    assert load_config("tiny", [f"data.path={glob}"]).data.source == "files"  # tiny.yaml says corpus
    assert load_config("resnet50", [f"data.path={tmp_path / 'images'}"]).data.source == "images"
    with pytest.raises(ConfigError, match=r"data\.source=corpus does not read"):
        load_config("tiny", ["data.source=corpus", f"data.path={glob}"])
    with pytest.raises(ConfigError, match="is a directory"):
        load_config("tiny", ["data.source=files", f"data.path={tmp_path / 'images'}"])
    with pytest.raises(ConfigError, match="synthetic has none"):
        load_config("tiny", ["data.source=synthetic", "model.vocab_size=auto"])


def test_the_launcher_trains_on_a_given_path_with_the_default_source(tmp_path: Path) -> None:
    write_corpus(tmp_path / "text", files=1, lines=60)
    run_dir = tmp_path / "run"
    result = launch_train(run_dir, 1, 1, f"data.path={tmp_path / 'text' / '*.txt'}", "train.eval_every=0")
    assert result.returncode == 0, result.stderr
    assert "torchrig: data: files:" in result.stdout


# ---------------------------------------------------------------------------- tokenizer and prepare


def prepare_bpe(folder: Path, output: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_cli(
        "train.prepare", "--input", str(folder / "*.txt"), "--output", str(output), "--tokenizer", "bpe",
        "--vocab", "320", *extra,
    )  # fmt: skip


def test_bpe_round_trips_the_text_and_a_tiny_model_trains_on_it(tmp_path: Path) -> None:
    texts = write_corpus(tmp_path / "text", files=3, lines=120)
    output = tmp_path / "data" / "x.bin"
    result = prepare_bpe(tmp_path / "text", output)
    assert result.returncode == 0, result.stderr
    tokens, meta = read_token_file(output)
    tokenizer_file = tmp_path / "data" / "x.tokenizer.json"
    tokenizer = load_tokenizer(tokenizer_file)
    vocab = tokenizer.get_vocab_size()  # at most VOCAB: a small text may run out of pairs to merge
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == vocab and 256 < vocab <= 320
    assert meta["tokenizer"]["file"] == tokenizer_file.name and meta["tokenizer"]["vocab_size"] == vocab
    separator = tokenizer.token_to_id("<|endoftext|>")
    documents = np.split(np.asarray(tokens), np.flatnonzero(np.asarray(tokens) == separator) + 1)
    decoded = [tokenizer.decode(doc[:-1].tolist()) for doc in documents if len(doc)]
    assert [d.encode() for d in decoded] == [p.read_bytes() for p in sorted(texts)]  # byte-exact
    assert len(tokens) < sum(p.stat().st_size for p in texts)  # merges happened
    # The same input trains the same tokenizer.
    again = prepare_bpe(tmp_path / "text", tmp_path / "data" / "y.bin")
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "data" / "y.tokenizer.json").read_bytes() == tokenizer_file.read_bytes()

    run_dir = tmp_path / "run"
    trained = launch_train(
        run_dir, 1, 2, f"data.path={output}", "model.vocab_size=auto", "train.micro_batch=4", "train.eval_every=2",
        "train.eval_batches=2",
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    assert (run_dir / "tokenizer.json").read_bytes() == tokenizer_file.read_bytes()  # where sample/eval find it
    last = metrics(run_dir)[-1]
    assert last["val_loss"] > 0 and last["val_perplexity"] == pytest.approx(math.exp(last["val_loss"]))
    assert 0 < last["val_bpb"] < last["val_loss"] / math.log(2)  # a token stands for more than one byte

    small = load_config("tiny", [f"data.path={output}", "model.vocab_size=257"])
    with pytest.raises(DataError, match=r"model\.vocab_size=257"):
        build_dataset(small)


def test_a_file_that_is_not_a_tokenizer_is_one_line(tmp_path: Path) -> None:
    write_corpus(tmp_path / "text", files=1, lines=10)
    bogus = tmp_path / "bogus.json"
    bogus.write_text('{"hello": 1}')
    line = one_line_error(
        run_cli(
            "train.prepare",
            "--input",
            str(tmp_path / "text" / "*.txt"),
            "--output",
            str(tmp_path / "o.bin"),
            "--tokenizer",
            str(bogus),
        )
    )
    assert "is not a tokenizer.json" in line


def test_prepare_never_replaces_a_file_it_did_not_write(tmp_path: Path) -> None:
    write_corpus(tmp_path / "text", files=1, lines=30)
    output = tmp_path / "x.bin"
    for name in ("x.json", "x.bin", "x.tokenizer.json"):
        stranger = tmp_path / name
        stranger.write_text("precious\n")
        args = ["--input", str(tmp_path / "text" / "*.txt"), "--output", str(output), "--tokenizer", "bpe"]
        line = one_line_error(run_cli("train.prepare", *args, "--vocab", "300"))
        assert str(stranger) in line and "FORCE=1" in line
        assert stranger.read_text() == "precious\n"
        stranger.unlink()
    assert prepare_bpe(tmp_path / "text", output).returncode == 0
    assert prepare_bpe(tmp_path / "text", output).returncode == 0  # its own files it may replace
    (tmp_path / "x.json").write_text("{}")
    assert prepare_bpe(tmp_path / "text", output).returncode == 2
    assert prepare_bpe(tmp_path / "text", output, "--force").returncode == 0


def test_prepare_names_an_unreadable_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from train import prepare

    texts = write_corpus(tmp_path / "text", files=2, lines=5)
    real_read = Path.read_bytes

    def read_bytes(path: Path) -> bytes:  # what a non-root user meets on a file without read permission
        if path == texts[1]:
            raise PermissionError(13, "Permission denied", str(path))
        return real_read(path)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    for tokenizer in ("bytes", "bpe"):
        args = [
            "--input",
            str(tmp_path / "text" / "*.txt"),
            "--output",
            str(tmp_path / "o.bin"),
            "--tokenizer",
            tokenizer,
        ]
        with pytest.raises(DataError, match=r"cannot read the input .*doc1\.txt \(Permission denied\)"):
            prepare.main([*args, *(["--vocab", "300"] if tokenizer == "bpe" else [])])
    assert not (tmp_path / "o.bin").exists()


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed (the image leaves it out)")
def test_make_prepare_refuses_to_replace_a_sidecar_it_did_not_write(tmp_path: Path) -> None:
    write_corpus(tmp_path / "text", files=1, lines=5)
    (tmp_path / "x.json").write_text("precious\n")
    make = [
        "make",
        "-s",
        "prepare",
        "RUNTIME=local",
        f"INPUT={tmp_path / 'text' / '*.txt'}",
        f"OUTPUT={tmp_path / 'x.bin'}",
    ]
    refused = subprocess.run(make, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and f"{tmp_path / 'x.json'} exists and was not written by prepare" in refused.stderr
    assert (tmp_path / "x.json").read_text() == "precious\n" and not (tmp_path / "x.bin").exists()
    forced = subprocess.run([*make, "FORCE=1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert forced.returncode == 0, forced.stderr
    assert read_token_file(tmp_path / "x.bin")[1]["dtype"] == "uint8"


def test_make_passes_the_new_variables() -> None:
    prepare = build_argv(TARGETS["prepare"], {"INPUT": "a/*.txt", "OUTPUT": "x.bin", "TOKENIZER": "bpe",
                                              "VOCAB": "512", "FORCE": "1"}, None)  # fmt: skip
    # --flag=value, so that a value starting with '-' stays a value; FORCE=1 is the bare switch
    assert prepare[3:] == ["--input=a/*.txt", "--output=x.bin", "--tokenizer=bpe", "--vocab=512", "--force"]
    evaluate = build_argv(TARGETS["eval"], {"RUN_DIR": "runs/r", "DATA": "d.bin"}, 2)
    assert evaluate[3:] == ["--gpus=2", "--run-dir=runs/r", "--data=d.bin"]


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
    result = run_cli("env.records.compare", str(run), str(eval_runs["resumed"]), "--plot", str(plot))
    assert result.returncode == 0, result.stderr
    assert any(line.split()[:1] == ["val_loss"] for line in result.stdout.splitlines())
    assert plot.stat().st_size > 0 and str(plot) in result.stdout


def test_make_eval_gives_the_logged_validation_loss(eval_runs: dict[str, Path]) -> None:
    run = eval_runs["on"]
    result = run_cli("train.eval", "--run-dir", str(run))
    assert result.returncode == 0, result.stderr
    record = json.loads((run / "eval.json").read_text())
    # The newest checkpoint is step 4, evaluated during training on the same samples (eval_batches=3).
    assert record["step"] == 4 and record["val_loss"] == pytest.approx(metrics(run)[-1]["val_loss"], rel=1e-6)
    assert "val_loss" in result.stdout
    text = run.parent / "other.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 200)
    on_data = run_cli("train.eval", "--run-dir", str(run), "--data", str(text))
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
    line = one_line_error(run_cli("train.eval", "--run-dir", str(run), "--data", str(empty)))
    assert "matches only empty files (1 file, 0 bytes)" in line, line
    for tensors in run.glob("checkpoints/step-*/*.distcp"):
        tensors.write_bytes(tensors.read_bytes()[:-1])
    line = one_line_error(run_cli("train.eval", "--run-dir", str(run)))
    assert "is damaged (step-000004, step-000002;" in line and "nothing to evaluate" in line, line
    assert "train over" not in line  # the words of a training run's refusal


def test_make_eval_without_a_checkpoint_is_one_line(tmp_path: Path) -> None:
    assert "has no checkpoint" in one_line_error(run_cli("train.eval", "--run-dir", str(tmp_path)))


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
