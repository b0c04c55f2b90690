"""make prepare (train/prepare.py): text to a token file, bytes or a byte-level BPE trained on the input, with
progress; it never replaces a file it did not write and names an input it cannot read."""

from __future__ import annotations

import io
import math
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.helpers.commands import one_line_error, run_module
from tests.helpers.corpus import write_corpus
from tests.helpers.make import needs_make
from tests.helpers.paths import ROOT
from tests.helpers.trainrun import launch_train, metrics
from train.config_loader import load_config
from train.data import build_dataset, read_token_file
from train.errors import DataError
from train.prepare import prepare
from train.tokenizer import load_tokenizer


def test_progress_shows_throughput_and_an_eta(monkeypatch: pytest.MonkeyPatch) -> None:
    from train import prepare

    monkeypatch.setattr(prepare, "PROGRESS_EVERY_S", 0.0)
    out = io.StringIO()
    prepare.Progress("tokenized", 4 * 2**20, out).add(2**20)
    assert "tokenized 1.0 of 4.0 MiB (25%)" in out.getvalue() and "MiB/s, eta" in out.getvalue()


def prepare_bpe(folder: Path, output: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_module(
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
        run_module(
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
        line = one_line_error(run_module("train.prepare", *args, "--vocab", "300"))
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
    real_open = os.open

    def open_file(path: Any, *args: Any, **kwargs: Any) -> int:  # what a non-root user meets without read permission
        if Path(path) == texts[1]:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_file)
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


@needs_make
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


def test_prepare_never_reads_its_own_outputs_as_input(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello world\n")
    (tmp_path / "b.txt").write_text("another file\n")
    output = str(tmp_path / "o.bin")
    first = prepare([str(tmp_path / "*")], output, "bytes", 0, force=False)
    again = prepare([str(tmp_path / "*")], output, "bytes", 0, force=True)  # the glob now matches o.bin and o.json
    assert first["files"] == again["files"] == 2
    assert first["count"] == again["count"]  # the text's bytes and a separator per file, both times


def test_a_copied_tokenizer_is_readable_by_no_one_its_source_was_not(tmp_path: Path) -> None:
    from train.tokenizer import train_bpe

    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("def f(x):\n    return x + 1\n" * 200)
    given = tmp_path / "private" / "tokenizer.json"
    given.parent.mkdir()
    given.write_text(train_bpe(["def f(x):\n    return x + 1\n" * 50], 300).to_str())
    given.chmod(0o600)
    output = tmp_path / "data" / "x.bin"
    prepare([str(tmp_path / "text" / "a.txt")], str(output), str(given), procs=1)
    copy = output.with_name("x.tokenizer.json")
    assert copy.read_bytes() == given.read_bytes() and copy.stat().st_mode & 0o777 == 0o600
