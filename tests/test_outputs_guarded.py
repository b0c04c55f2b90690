"""What a hostile tester found in the second wave: outputs that replaced files, weights read from the wrong place,
hand-edited exports that crashed, a path too long for the system. Each is one line now, and nothing is lost."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from env.records.compare import CompareError, check_plot_path
from tests.conftest import ROOT
from tests.helpers.sampling import save_checkpoint, small_config, trained_in_process, write_export
from train.config_loader import load_config
from train.errors import ConfigError
from train.export import ExportError, export
from train.models import build_model
from train.prepare import prepare
from train.weights import WeightsError, build_loaded_model, check_weights


def test_the_compare_overlay_never_replaces_a_file_it_did_not_write(tmp_path: Path) -> None:
    records = tmp_path / "metrics.jsonl"
    records.write_text('{"step": 1}\n')
    with pytest.raises(CompareError, match=r"does not end in \.png"):
        check_plot_path(records)
    disguised = tmp_path / "notes.png"
    disguised.write_text("my notes")
    with pytest.raises(CompareError, match="is not a PNG"):
        check_plot_path(disguised)
    assert records.read_text() == '{"step": 1}\n' and disguised.read_text() == "my notes"
    earlier = tmp_path / "overlay.png"
    earlier.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 8)
    check_plot_path(earlier)  # an earlier overlay may be drawn again
    check_plot_path(tmp_path / "new.png")


def test_an_export_into_a_run_directory_is_refused(tmp_path: Path) -> None:
    cfg = small_config()
    save_checkpoint(tmp_path / "run", trained_in_process(cfg), cfg, step=2)
    with pytest.raises(ExportError, match="training run's directory"):
        export(tmp_path / "run", tmp_path / "run", force=True)
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_an_absurd_context_length_is_one_line_before_anything_is_built() -> None:
    with pytest.raises(ConfigError, match=r"model\.max_seq_len=1000000000000 exceeds"):
        load_config("tiny", ["model.max_seq_len=1000000000000"])


def test_weights_that_are_not_finite_or_not_floating_are_refused_naming_the_weight() -> None:
    cfg = small_config()
    expected = build_model(cfg.model).state_dict()
    key = next(k for k, v in expected.items() if v.is_floating_point())
    poisoned = {k: v.clone() for k, v in expected.items()}
    poisoned[key].view(-1)[0] = float("nan")
    with pytest.raises(WeightsError, match=f"'{key}' holds NaN"):
        check_weights(expected, poisoned, "export")
    integers = {k: v.clone() for k, v in expected.items()}
    integers[key] = integers[key].long()
    with pytest.raises(WeightsError, match=f"'{key}' is torch.int64"):
        check_weights(expected, integers, "export")


def test_a_hand_edited_export_whose_config_outgrows_its_weights_is_refused_unallocated(tmp_path: Path) -> None:
    cfg = small_config()
    model_config = {**json.loads(json.dumps(cfg.to_dict()["model"])), "dim": 4096}
    write_export(tmp_path / "e", trained_in_process(cfg), model_config)
    with pytest.raises(WeightsError, match="has shape"):
        build_loaded_model(tmp_path / "e", torch.device("cpu"))


def test_a_path_too_long_for_the_system_is_one_line() -> None:
    long = "/tmp/" + "a" * 5000
    result = subprocess.run(
        [sys.executable, "-m", "train.sample", "--run-dir", long], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("torchrig sample: ") and "too long" in lines[0]


def test_prepare_never_reads_its_own_outputs_as_input(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello world\n")
    (tmp_path / "b.txt").write_text("another file\n")
    output = str(tmp_path / "o.bin")
    first = prepare([str(tmp_path / "*")], output, "bytes", 0, force=False)
    again = prepare([str(tmp_path / "*")], output, "bytes", 0, force=True)  # the glob now matches o.bin and o.json
    assert first["files"] == again["files"] == 2
    assert first["count"] == again["count"]  # the text's bytes and a separator per file, both times
