"""Issue 16 class 2: every file a user names or could plant is read by the one bounded reader.

A FIFO, a link to /dev/zero or a 100,000-deep JSON planted as config.json, manifest.json, a sidecar,
a tokenizer.json or a config YAML is one line naming the file, never a hang, 8 GiB of memory or a
RecursionError. A hang is caught by an alarm: the test fails instead of waiting forever.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from env.common.cli import UserError, load_json
from env.records import compare
from tests.helpers.processes import alarm_after
from tests.helpers.sampling import save_checkpoint, small_config, trained_in_process, write_export
from train.config_loader import load_config
from train.data.tokens import read_token_file
from train.errors import ConfigError, DataError
from train.tokenizer import load_tokenizer
from train.weights import WeightsError, load_model_weights

DEEP = "[" * 100_000 + "]" * 100_000


@pytest.fixture(autouse=True)
def no_hang() -> Iterator[None]:
    """A read that blocks (a FIFO opened without O_NONBLOCK) fails the test after 60 s instead of hanging it."""
    with alarm_after(60, "the read blocked: the reader opened a FIFO without O_NONBLOCK"):
        yield


def plant(path: Path, kind: str) -> None:
    """Put a FIFO, a link to /dev/zero, or a 100,000-deep JSON array at path."""
    path.unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "zero":
        path.symlink_to("/dev/zero")
    else:
        path.write_text(DEEP)


PLANTED = ["fifo", "zero", "deep"]
WORDS = {"fifo": "FIFO", "zero": "device", "deep": "levels deep"}


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and "Traceback" not in text
    return text


# ---------------------------------------------------------------------------- the reader itself


def byte_token_file(path: Path) -> None:
    """A 100-token byte file and its sidecar, written by hand (the format of train/data/tokens.py)."""
    (np.arange(100) % 256).astype(np.uint8).tofile(path)
    sidecar = {"dtype": "uint8", "vocab_size": 256, "count": 100, "tokenizer": {"kind": "bytes"}}
    path.with_suffix(".json").write_text(json.dumps(sidecar))


def test_the_reader_refuses_what_is_not_a_bounded_regular_file(tmp_path: Path) -> None:
    from env.common.readfile import ReadRefused, read_bounded

    for kind in ("fifo", "zero"):
        plant(tmp_path / kind, kind)
        with pytest.raises(ReadRefused, match=WORDS[kind]):
            read_bounded(tmp_path / kind, 1 << 20)
    with pytest.raises(ReadRefused, match="is a directory"):
        read_bounded(tmp_path, 1 << 20)
    (tmp_path / "big").write_bytes(b"x" * 2048)
    with pytest.raises(ReadRefused, match="over the 1,024 bytes"):
        read_bounded(tmp_path / "big", 1024)
    with pytest.raises(ReadRefused) as missing:
        read_bounded(tmp_path / "absent", 10)
    assert missing.value.missing
    (tmp_path / "dangling").symlink_to(tmp_path / "absent")
    with pytest.raises(ReadRefused, match="symlink to nothing"):
        read_bounded(tmp_path / "dangling", 10)
    (tmp_path / "ok").write_bytes(b"hello")
    (tmp_path / "link").symlink_to(tmp_path / "ok")
    assert read_bounded(tmp_path / "link", 10) == b"hello"
    with pytest.raises(ReadRefused, match="is a symlink"):
        read_bounded(tmp_path / "link", 10, follow=False)


def test_json_depth_is_counted_on_the_text_before_parsing(tmp_path: Path) -> None:
    from env.common.readfile import MAX_JSON_DEPTH, ReadRefused, json_depth, read_json

    assert json_depth(b'{"a": [1, {"b": "[[[[[[[[[["}], "c": "\\"]]]"}') == 3
    (tmp_path / "deep.json").write_text(DEEP)
    with pytest.raises(ReadRefused, match=r"nested 100,000 levels deep, deeper than the 32"):
        read_json(tmp_path / "deep.json", 1 << 20)
    (tmp_path / "ok.json").write_text("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH)
    assert read_json(tmp_path / "ok.json", 1 << 20) is not None


@pytest.mark.parametrize("kind", PLANTED)
def test_load_json_refuses_a_planted_file_in_one_line(tmp_path: Path, kind: str) -> None:
    """cli.load_json's size check saw 0 bytes for /dev/zero, then read it whole."""
    plant(tmp_path / "baseline.json", kind)
    with pytest.raises(UserError) as caught:
        load_json(tmp_path / "baseline.json", "BASELINE", "give a bench.json")
    assert WORDS[kind] in one_line(caught.value) and "give a bench.json" in str(caught.value)


# ---------------------------------------------------------------------------- where the files are read


@pytest.mark.parametrize("kind", PLANTED)
def test_an_exports_config_json(tmp_path: Path, kind: str) -> None:
    cfg = small_config()
    write_export(tmp_path / "export", trained_in_process(cfg, steps=0), cfg.to_dict()["model"])
    plant(tmp_path / "export" / "config.json", kind)
    with pytest.raises(WeightsError) as caught:
        load_model_weights(tmp_path / "export")
    assert WORDS[kind] in one_line(caught.value) and "config.json" in str(caught.value)


@pytest.mark.parametrize("kind", PLANTED)
def test_a_runs_manifest_for_compare(tmp_path: Path, kind: str) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text(json.dumps({"packages": {"list": []}}))
    plant(tmp_path / "b" / "manifest.json", kind)
    with pytest.raises(compare.CompareError) as caught:
        compare.main([str(tmp_path / "a"), str(tmp_path / "b")])
    assert WORDS[kind] in one_line(caught.value)


def test_compare_output_that_is_a_fifo_is_left_alone(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "x.png")
    with pytest.raises(compare.CompareError, match="exists and is not a PNG"):
        compare.check_plot_path(tmp_path / "x.png")


@pytest.mark.parametrize("kind", ["fifo", "zero"])
def test_a_config_yaml(tmp_path: Path, kind: str) -> None:
    plant(tmp_path / "mine.yaml", kind)
    with pytest.raises(ConfigError) as caught:
        load_config(str(tmp_path / "mine.yaml"))
    assert WORDS[kind] in one_line(caught.value)


@pytest.mark.parametrize("kind", PLANTED)
def test_a_token_files_sidecar(tmp_path: Path, kind: str) -> None:
    byte_token_file(tmp_path / "x.bin")
    plant(tmp_path / "x.json", kind)
    with pytest.raises(DataError) as caught:
        read_token_file(tmp_path / "x.bin")
    assert WORDS[kind] in one_line(caught.value)


@pytest.mark.parametrize("kind", ["fifo", "zero"])
def test_a_token_file_itself(tmp_path: Path, kind: str) -> None:
    byte_token_file(tmp_path / "x.bin")
    plant(tmp_path / "x.bin", kind)
    with pytest.raises(DataError, match=WORDS[kind]):
        read_token_file(tmp_path / "x.bin")


@pytest.mark.parametrize("kind", PLANTED)
def test_a_tokenizer_json(tmp_path: Path, kind: str) -> None:
    plant(tmp_path / "tokenizer.json", kind)
    with pytest.raises(DataError) as caught:
        load_tokenizer(tmp_path / "tokenizer.json")
    assert WORDS[kind] in one_line(caught.value)


@pytest.mark.parametrize("kind", PLANTED)
def test_a_tokenizer_planted_in_an_export_for_make_sample(tmp_path: Path, kind: str) -> None:
    from train.sample import make_codec

    cfg = small_config()
    write_export(tmp_path / "export", trained_in_process(cfg, steps=0), cfg.to_dict()["model"])
    plant(tmp_path / "export" / "tokenizer.json", kind)
    with pytest.raises(UserError) as caught:
        make_codec(tmp_path / "export", {"model": cfg.to_dict()["model"]}, 256)
    assert WORDS[kind] in one_line(caught.value)


@pytest.mark.parametrize("kind", PLANTED)
def test_prepares_sidecar_check(tmp_path: Path, kind: str) -> None:
    from train import prepare

    (tmp_path / "doc.txt").write_text("def f(x):\n    return x\n" * 20)
    plant(tmp_path / "x.json", kind)
    with pytest.raises(DataError, match="was not written by prepare"):
        prepare.main(["--procs", "1", "--input", str(tmp_path / "doc.txt"), "--output", str(tmp_path / "x.bin")])


@pytest.mark.parametrize("kind", PLANTED)
def test_a_checkpoint_sidecar_is_skipped_not_waited_on(tmp_path: Path, kind: str) -> None:
    cfg = small_config()
    model = trained_in_process(cfg, steps=1)
    save_checkpoint(tmp_path, model, cfg, step=1)
    save_checkpoint(tmp_path, model, cfg, step=2)
    plant(tmp_path / "checkpoints" / "step-000002.json", kind)
    _, _, step = load_model_weights(tmp_path)
    assert step == 1


@pytest.mark.parametrize(
    "write",
    [
        lambda path: os.mkfifo(path),
        lambda path: path.symlink_to("/dev/zero"),
    ],
    ids=["fifo", "zero"],
)
def test_a_summary_planted_for_the_launcher(tmp_path: Path, write: Callable[[Path], None]) -> None:
    from train.launch import _stopped_cleanly

    write(tmp_path / "summary.json")
    assert _stopped_cleanly(tmp_path, 0.0) is False
