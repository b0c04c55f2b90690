"""Issue 16 class 5: a tokenizer is checked against its data, by every consumer of token ids.

Each of these exited 0 with wrong figures or files: a BPE data.path with a byte data.val_path;
`make eval DATA=<byte tokens>` on a BPE run; eval of text without the run's tokenizer (bytes, silently);
init_from a BPE run into a byte run; `make prepare TOKENIZER=<one that cannot encode the text>` (0
tokens, or 90% [UNK]); data.val_path equal to data.path. Every token file records its tokenizer.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.paths import ROOT
from tests.helpers.sampling import save_checkpoint, small_config, trained_in_process
from train import prepare
from train.data import build_dataset, validation_set
from train.errors import DataError
from train.weights import WeightsError, init_from

TEXT = "def f(x):\n    return x + 1\n\nclass A:\n    pass\n" * 200


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Text, its byte token file, and BPE token files of two different tokenizers."""
    root = tmp_path_factory.mktemp("data")
    (root / "text").mkdir()
    (root / "text" / "a.txt").write_text(TEXT)
    (root / "other").mkdir()
    (root / "other" / "b.txt").write_text(TEXT.replace("x", "y") * 2)
    files = {"text": root / "text" / "a.txt", "bytes": root / "bytes.bin", "bpe": root / "bpe.bin"}
    files["bpe_other"] = root / "bpe_other.bin"
    prepare.main(["--procs", "1", "--input", str(files["text"]), "--output", str(files["bytes"])])
    prepare.main(
        [
            "--procs",
            "1",
            "--input",
            str(files["text"]),
            "--output",
            str(files["bpe"]),
            "--tokenizer",
            "bpe",
            "--vocab",
            "300",
        ]
    )
    other = ["--input", str(root / "other" / "b.txt"), "--output", str(files["bpe_other"])]
    prepare.main(["--procs", "1", *other, "--tokenizer", "bpe", "--vocab", "300"])
    return files


def test_every_token_file_records_its_tokenizer(data: dict[str, Path]) -> None:
    assert json.loads(data["bytes"].with_suffix(".json").read_text())["tokenizer"]["kind"] == "bytes"
    record = json.loads(data["bpe"].with_suffix(".json").read_text())["tokenizer"]
    assert record["kind"] == "bpe" and len(record["sha256"]) == 64 and record["file"] == "bpe.tokenizer.json"


@pytest.mark.parametrize("val", ["bytes", "bpe_other"])
def test_a_validation_set_of_another_tokenizer_is_refused(data: dict[str, Path], val: str) -> None:
    cfg = small_config(f"data.path={data['bpe']}", f"data.val_path={data[val]}", "model.vocab_size=auto")
    with pytest.raises(DataError, match=r"data\.val_path=.* holds ids of .* but the training data .* those of"):
        validation_set(build_dataset(cfg), cfg)


def test_a_validation_set_that_is_the_training_data_is_refused(data: dict[str, Path], tmp_path: Path) -> None:
    for val in (str(data["bpe"]), str(Path(data["bpe"]).parent / "." / data["bpe"].name)):
        cfg = small_config(f"data.path={data['bpe']}", f"data.val_path={val}", "model.vocab_size=auto")
        with pytest.raises(DataError, match=r"shares 1 file.* validation would be on training data"):
            validation_set(build_dataset(cfg), cfg)
    glob = str(data["text"].parent / "*.txt")
    cfg = small_config(f"data.path={glob}", f"data.val_path={data['text']}")
    with pytest.raises(DataError, match="shares 1 file"):
        validation_set(build_dataset(cfg), cfg)


def test_a_validation_set_of_the_same_tokenizer_and_other_data_is_taken(data: dict[str, Path], tmp_path: Path) -> None:
    held_out = tmp_path / "held.txt"
    held_out.write_text(TEXT.replace("A", "B"))
    cfg = small_config(f"data.path={data['text']}", f"data.val_path={held_out}")
    dataset, indices = validation_set(build_dataset(cfg), cfg)
    assert len(indices) == len(dataset) > 0


@pytest.fixture(scope="module")
def bpe_run(data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run trained (in this process) on the BPE token file, with its tokenizer in RUN_DIR as training copies it."""
    cfg = small_config(f"data.path={data['bpe']}", "model.vocab_size=auto", "train.eval_batches=2")
    run_dir = tmp_path_factory.mktemp("bpe-run")
    save_checkpoint(run_dir, trained_in_process(cfg, steps=1), cfg, step=1)
    shutil.copy(data["bpe"].with_name("bpe.tokenizer.json"), run_dir / "tokenizer.json")
    return run_dir


def make_eval(run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "train.eval", "--run-dir", str(run_dir), *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_eval_of_a_token_file_of_another_tokenizer_is_refused(bpe_run: Path, data: dict[str, Path]) -> None:
    for other in ("bytes", "bpe_other"):
        result = make_eval(bpe_run, "--data", str(data[other]))
        assert result.returncode == 2, result.stdout + result.stderr
        assert f"DATA={data[other]} holds ids of" in result.stderr and "but the run reads ids of" in result.stderr
    assert not (bpe_run / "eval.json").exists()


def test_eval_of_text_without_the_runs_tokenizer_is_refused_never_bytes(
    bpe_run: Path, data: dict[str, Path], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(bpe_run, run)
    (run / "tokenizer.json").unlink()
    moved = data["bpe"].with_name("bpe.tokenizer.json")
    hidden = moved.with_name("hidden.json")
    moved.rename(hidden)  # the tokenizer beside the run's token file is gone too
    try:
        result = make_eval(run, "--data", str(data["text"]))
    finally:
        hidden.rename(moved)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "is text, and the run reads ids of the tokenizer with sha256" in result.stderr
    assert "RUN_DIR has no tokenizer.json" in result.stderr and not (run / "eval.json").exists()


def test_eval_of_text_with_the_runs_tokenizer_is_taken(bpe_run: Path, data: dict[str, Path]) -> None:
    result = make_eval(bpe_run, "--data", str(data["text"]))
    assert result.returncode == 0, result.stderr
    assert json.loads((bpe_run / "eval.json").read_text())["data"] == str(data["text"])


def test_init_from_a_bpe_run_into_a_byte_run_is_refused(bpe_run: Path) -> None:
    cfg = small_config(f"train.init_from={bpe_run}")  # the corpus: bytes; the model comes from init_from
    model = torch.nn.Module()
    model.register_parameter("p", torch.nn.Parameter(torch.zeros(1)))
    with pytest.raises(
        WeightsError, match=r"was trained on ids of the tokenizer with sha256 .* but this run's data is bytes"
    ):
        init_from(model, cfg, bpe_run.parent / "fresh-run")


def test_a_resume_on_data_of_another_tokenizer_is_refused(bpe_run: Path, data: dict[str, Path]) -> None:
    from train.eval import record_tokenizer

    cfg = small_config(f"data.path={data['bpe_other']}", "model.vocab_size=auto")
    with pytest.raises(DataError, match=r"checkpoints were trained on ids of .* resume on data of the run's tokenizer"):
        record_tokenizer(cfg, bpe_run, True, resumed=True)


def tokenizer_file(path: Path, unknown: bool) -> Path:
    """A valid tokenizer.json that cannot encode Python: a two-letter BPE (text becomes no token at all),
    or a word-level one that knows two words (text becomes [UNK])."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    if unknown:
        tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, "def": 1, "<|endoftext|>": 2}, unk_token="[UNK]"))
        tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    else:
        tokenizer = Tokenizer(models.BPE(vocab={"q": 0, "z": 1}, merges=[]))
    tokenizer.save(str(path))
    return path


@pytest.mark.parametrize(
    ("unknown", "expected"),
    [
        (False, r"encodes [\d,]+ bytes of text into 0 tokens"),
        (True, r"turns \d+\.\d% of the text's [\d,]+ tokens into its unknown token"),
    ],
    ids=["no token", "mostly unknown"],
)
def test_prepare_with_a_tokenizer_that_cannot_encode_the_text_is_refused(
    data: dict[str, Path], tmp_path: Path, unknown: bool, expected: str
) -> None:
    given = tokenizer_file(tmp_path / "given.json", unknown)
    output = tmp_path / "out.bin"
    with pytest.raises(DataError, match=expected):
        prepare.main(["--procs", "1", "--input", str(data["text"]), "--output", str(output), "--tokenizer", str(given)])
    assert not output.exists()  # no token set published: at most the manifest of an unfinished one
    manifest = output.with_suffix(".json")
    assert not manifest.exists() or json.loads(manifest.read_text())["complete"] is False
