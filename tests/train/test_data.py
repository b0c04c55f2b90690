"""Data: the exact sample stream, resumable loading, the corpus, token files and user errors."""

from __future__ import annotations

import itertools
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from env.common.cli import exit_code
from tests.helpers.paths import ROOT
from train import prepare
from train.config import RunConfig
from train.config_loader import default_config
from train.data import build_corpus, build_dataset, build_loader, describe, read_token_file, write_token_file
from train.data.sources import SyntheticImages, SyntheticTokens
from train.data.split import split_samples
from train.data.stream import stream_indices
from train.data.text import DOC_SEPARATOR
from train.errors import DataError
from train.models.resnet import ResNetConfig


def make_config(source: str = "synthetic", path: str = "", seq_len: int = 8, **train: int) -> RunConfig:
    cfg = default_config()
    cfg.data.source, cfg.data.path, cfg.data.seq_len = source, path, seq_len
    cfg.train.micro_batch, cfg.train.accum, cfg.train.seed = train.get("micro_batch", 3), train.get("accum", 1), 7
    return cfg


def global_stream(world_size: int, micro_batch: int, accum: int, n_samples: int, seed: int, steps: int) -> list[int]:
    """Every rank's indices laid out in stream order: step, then micro-batch, then rank."""
    return [
        index
        for step, micro, rank in itertools.product(range(steps), range(accum), range(world_size))
        for index in stream_indices(step, micro, rank, world_size, micro_batch, accum, n_samples, seed)
    ]


def take(loader, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(itertools.islice(iter(loader), count))


def assert_same_batches(left, right) -> None:
    for (a_in, a_out), (b_in, b_out) in zip(left, right, strict=True):
        assert torch.equal(a_in, b_in) and torch.equal(a_out, b_out)


def write_text(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


@pytest.fixture
def text_files(tmp_path: Path) -> list[Path]:
    return [
        write_text(tmp_path, "b.txt", "the second file, which sorts after a.txt\n" * 20),
        write_text(tmp_path, "a.txt", "Ünïcode bytes stay bytes: ∑ and é\n" * 15),
    ]


# ---------------------------------------------------------------------------- the stream


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("accum", [1, 2])
def test_every_epoch_of_the_stream_is_a_permutation(world_size: int, accum: int) -> None:
    n_samples, micro_batch, epochs = 37, 3, 3  # 37 is prime: epochs end mid-batch and spill over
    global_batch = world_size * micro_batch * accum
    steps = -(-epochs * n_samples // global_batch)
    stream = global_stream(world_size, micro_batch, accum, n_samples, seed=5, steps=steps)
    for epoch in range(epochs):
        assert sorted(stream[epoch * n_samples : (epoch + 1) * n_samples]) == list(range(n_samples))
    assert stream[:n_samples] != stream[n_samples : 2 * n_samples], "each epoch has its own order"


def test_stream_depends_on_the_seed_only() -> None:
    args = dict(step=4, micro=1, rank=1, world_size=2, micro_batch=8, accum=2, n_samples=1000)
    assert stream_indices(**args, seed=1) == stream_indices(**args, seed=1)
    assert stream_indices(**args, seed=1) != stream_indices(**args, seed=2)


@pytest.mark.parametrize("accum", [1, 2])
def test_two_ranks_of_b_equal_one_rank_of_2b_per_step(accum: int) -> None:
    n_samples, b = 50, 4
    for step in range(12):  # crosses epoch boundaries
        two_ranks = [
            i
            for micro, rank in itertools.product(range(accum), range(2))
            for i in stream_indices(step, micro, rank, 2, b, accum, n_samples, seed=3)
        ]
        one_rank = [i for micro in range(accum) for i in stream_indices(step, micro, 0, 1, 2 * b, accum, n_samples, 3)]
        assert sorted(two_ranks) == sorted(one_rank)


# ---------------------------------------------------------------------------- the loader


def test_loader_yields_the_stream_and_resumes_exactly(text_files: list[Path]) -> None:
    cfg = make_config("files", str(text_files[0].parent / "*.txt"), micro_batch=2, accum=2)
    dataset = build_dataset(cfg)
    rank, world_size, resume_step = 1, 2, 3
    uninterrupted = take(build_loader(dataset, cfg, rank, world_size, start_step=0), 6 * cfg.train.accum)
    resumed = take(build_loader(dataset, cfg, rank, world_size, start_step=resume_step), 3 * cfg.train.accum)
    assert_same_batches(uninterrupted[resume_step * cfg.train.accum :], resumed)

    inputs, targets = uninterrupted[3]  # step 1, micro-batch 1
    train = split_samples(dataset, cfg).train  # the stream runs over the training split only
    expected = train[stream_indices(1, 1, rank, world_size, 2, 2, len(train), cfg.train.seed)]
    assert inputs.dtype == targets.dtype == torch.int64 and inputs.shape == (2, cfg.data.seq_len)
    assert torch.equal(inputs, torch.stack([dataset[i][0] for i in expected]))
    assert torch.equal(inputs[:, 1:], targets[:, :-1])


def test_two_workers_give_the_same_batches_as_none(tmp_path: Path, text_files: list[Path]) -> None:
    output = tmp_path / "tokens.bin"
    assert prepare.main(["--input", str(tmp_path / "*.txt"), "--output", str(output)]) == 0
    cfg = make_config("files", str(output), accum=2)
    dataset = build_dataset(cfg)
    in_process = take(build_loader(dataset, cfg, 0, 1, start_step=2), 8)
    cfg.data.num_workers = 2
    assert_same_batches(take(build_loader(dataset, cfg, 0, 1, start_step=2), 8), in_process)


def test_synthetic_samples_are_a_function_of_seed_and_index() -> None:
    tokens = SyntheticTokens(vocab_size=50, seq_len=16, seed=1)
    assert torch.equal(tokens[9][0], SyntheticTokens(50, 16, seed=1)[9][0])
    assert not torch.equal(tokens[9][0], SyntheticTokens(50, 16, seed=2)[9][0])
    assert not torch.equal(tokens[9][0], tokens[10][0])
    assert int(tokens[9][0].max()) < 50

    cfg = make_config("synthetic", micro_batch=4)
    cfg.model = ResNetConfig(image_size=20, num_classes=10)
    images, labels = take(build_loader(build_dataset(cfg), cfg, 0, 1, 0), 1)[0]
    assert images.shape == (4, 3, 20, 20) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.shape == (4,) and int(labels.max()) < 10
    assert torch.equal(SyntheticImages(20, 10, seed=7)[3][0], SyntheticImages(20, 10, seed=7)[3][0])


def test_image_folder_batches(tmp_path: Path) -> None:
    from PIL import Image

    for label, colour in [("cat", (200, 10, 10)), ("dog", (10, 10, 200))]:
        (tmp_path / label).mkdir()
        for i in range(2):
            Image.new("RGB", (40, 30), colour).save(tmp_path / label / f"{i}.png")
    cfg = make_config("images", str(tmp_path), micro_batch=2)
    cfg.model = ResNetConfig(image_size=24, num_classes=2)
    dataset = build_dataset(cfg)
    images, labels = take(build_loader(dataset, cfg, 0, 1, 0), 1)[0]
    assert images.shape == (2, 3, 24, 24) and labels.dtype == torch.int64
    assert "2 classes" in describe(dataset)


# ---------------------------------------------------------------------------- the corpus


def test_corpus_builds_once_and_identically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = build_corpus(tmp_path / "one")
    second = build_corpus(tmp_path / "two")
    assert first.stat().st_size > 2**20
    assert first.read_bytes() == second.read_bytes()
    built_at = first.stat().st_mtime_ns
    assert build_corpus(tmp_path / "one") == first and first.stat().st_mtime_ns == built_at, "the cache is reused"

    monkeypatch.setenv("TORCHRIG_DATA_DIR", str(tmp_path / "one"))
    dataset = build_dataset(make_config("corpus", seq_len=64))
    assert first.stat().st_mtime_ns == built_at
    assert bytes(dataset[0][0].tolist()) == first.read_bytes()[:64]
    assert f"Python {sys.version_info.major}.{sys.version_info.minor}" in describe(dataset)


# ---------------------------------------------------------------------------- token files


def test_prepare_round_trip_keeps_the_bytes(tmp_path: Path, text_files: list[Path]) -> None:
    output = tmp_path / "out" / "corpus.bin"
    assert prepare.main(["--input", str(tmp_path / "*.txt"), "--output", str(output)]) == 0
    meta = json.loads(output.with_suffix(".json").read_text())
    expected = b"".join(path.read_bytes() + DOC_SEPARATOR for path in sorted(text_files))
    assert meta["dtype"] == "uint8" and meta["count"] == len(expected) and meta["vocab_size"] == 256

    for path in (str(output), str(tmp_path / "*.txt")):  # the prepared file and the raw glob agree
        dataset = build_dataset(make_config("files", path, seq_len=16))
        windows = [dataset[i] for i in range(len(dataset))]
        rebuilt = torch.cat([inputs for inputs, _ in windows] + [windows[-1][1][-1:]])
        assert bytes(rebuilt.tolist()) == expected[: len(dataset) * 16 + 1]


def test_wide_vocab_uses_uint32_and_is_checked_against_the_model(tmp_path: Path) -> None:
    path = tmp_path / "wide.bin"
    tokens = np.arange(70_000 - 40, 70_000)
    write_token_file(path, [tokens[:15], tokens[15:]], vocab_size=70_000, tokenizer={"sha256": "0" * 64})
    assert json.loads(path.with_suffix(".json").read_text())["dtype"] == "uint32"
    assert np.array_equal(read_token_file(path)[0], tokens)

    cfg = make_config("files", str(path), seq_len=4)
    cfg.model.vocab_size = 70_000
    assert build_dataset(cfg)[1][0].tolist() == tokens[4:8].tolist()
    cfg.model.vocab_size = 256
    with pytest.raises(DataError, match=r"set model\.vocab_size=70000"):
        build_dataset(cfg)


def test_pickled_file_dataset_reopens_the_file(tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    write_token_file(path, [np.arange(100_000) % 256], vocab_size=256, tokenizer={"kind": "bytes"})
    dataset = build_dataset(make_config("files", str(path), seq_len=32))
    blob = pickle.dumps(dataset)
    assert len(blob) < 10_000, "a worker started by spawn must not receive the tokens themselves"
    assert torch.equal(pickle.loads(blob)[500][1], dataset[500][1])


# ---------------------------------------------------------------------------- user errors


def bad_configs(tmp_path: Path) -> dict[str, tuple[RunConfig, str]]:
    short = write_text(tmp_path, "short.txt", "tiny")
    write_text(tmp_path, "nosidecar.bin", "abcd")
    high = tmp_path / "high.bin"
    write_token_file(high, [np.array([1, 2, 300, 4] * 10)], vocab_size=512, tokenizer={"sha256": "0" * 64})
    images_for_lm = make_config("images", str(tmp_path))
    return {
        "no path": (make_config("files"), "needs data.path"),
        "missing": (make_config("files", str(tmp_path / "nope.bin")), "does not exist"),
        "empty glob": (make_config("files", str(tmp_path / "x" / "*.txt")), "matches no files"),
        "short file": (make_config("files", str(short)), "lower data.seq_len"),
        "no sidecar": (make_config("files", str(tmp_path / "nosidecar.bin")), "no sidecar"),
        "token above vocab": (make_config("files", str(high)), "model.vocab_size=301"),
        "images for an LM": (images_for_lm, "model.arch=deepseek needs tokens"),
        "missing image dir": (make_config("images", str(tmp_path / "nope")), "is not a directory"),
    }


def test_user_errors_are_one_line_data_errors(tmp_path: Path) -> None:
    configs = bad_configs(tmp_path)
    configs["missing image dir"][0].model = ResNetConfig()
    for name, (cfg, fix) in configs.items():
        with pytest.raises(DataError) as caught:
            build_dataset(cfg)
        assert fix in str(caught.value) and "\n" not in str(caught.value), name


def test_prepare_cli_reports_an_empty_glob_in_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "train.prepare",
            "--input",
            str(tmp_path / "*.txt"),
            "--output",
            str(tmp_path / "o.bin"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "matches no files" in result.stderr
    assert not (tmp_path / "o.bin").exists()


def test_loader_benchmark_prints_a_row_per_source_and_worker_count(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from train.benchmarks import data_loader

    config = write_text(tmp_path, "small.yaml", "data:\n  seq_len: 16\ntrain:\n  micro_batch: 2\n")
    argv = ["--config", str(config), "--sources", "synthetic", "--workers", "0", "--seconds", "0.2"]
    assert data_loader.main([*argv, "--step-tokens-per-sec", "1000"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("synthetic")]
    assert len(rows) == 1 and rows[0][1] == "0"
    rate, ratio = float(rows[0][3].replace(",", "")), float(rows[0][4].rstrip("×").replace(",", ""))
    assert rate > 0 and ratio == pytest.approx(rate / 1000, rel=0.01, abs=0.06)
    assert exit_code("data-loader", data_loader.main, [*argv, "--workers", "two"]) == 2
