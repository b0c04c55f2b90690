"""The comparison of two runs (env/records/compare.py): what changed between their manifests, and their figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from env.common.cli import exit_code
from env.records import compare
from env.records.compare import CompareError, check_plot_path
from tests.helpers.paths import ROOT


def _run_dir(path: Path, manifest_data: dict, summary: dict | None = None) -> Path:
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps(manifest_data))
    if summary is not None:
        (path / "summary.json").write_text(json.dumps(summary))
    return path


def _manifest(**changes: object) -> dict:
    base = {
        "schema": 1,
        "kind": "train",
        "created_utc": "2026-01-01T00:00:00+00:00",
        "created_unix": 1.0,
        "config": {"train": {"micro_batch": 8, "steps": 100}},
        "packages": {"sha256": "x", "count": 3, "list": ["numpy==2.0.2", "pyyaml==6.0.2", "torch==2.4.1"]},
        "facts": {"snapshot": {"gpus": [{"name": "RTX 4090", "temperature_c": 40}]}},
    }
    base.update(changes)
    return base


def test_compare_shows_config_and_package_changes_and_figures(tmp_path: Path, capsys) -> None:
    a = _run_dir(tmp_path / "a", _manifest(), {"samples_per_sec": 1200.0, "mfu": 0.4, "note": "x"})
    b_manifest = _manifest(
        created_utc="2026-02-02T00:00:00+00:00",
        created_unix=2.0,
        config={"train": {"micro_batch": 16, "steps": 100}},
        packages={"sha256": "y", "count": 3, "list": ["numpy==2.0.2", "torch==2.6.0", "triton==3.2.0"]},
        facts={"snapshot": {"gpus": [{"name": "RTX 4090", "temperature_c": 71}]}},
    )
    b = _run_dir(tmp_path / "b", b_manifest, {"samples_per_sec": 2300.0, "mfu": 0.38, "tokens_per_sec": 9.0})
    assert compare.main([str(a), str(b / "manifest.json")]) == 0
    out = capsys.readouterr().out
    assert "config.train.micro_batch" in out and "config.train.steps" not in out
    assert "created" not in out and "temperature" not in out
    assert "+ triton==3.2.0" in out and "- pyyaml==6.0.2" in out and "~ torch 2.4.1 -> 2.6.0" in out
    table = out.split("figures (summary.json):\n", 1)[1].split("\n\n", 1)[0]  # up to the plot line
    figures = {line.split()[0]: line.split()[1:] for line in table.splitlines()[1:]}
    assert set(figures) == {"samples_per_sec", "mfu"}
    assert figures["samples_per_sec"][-1] == f"{2300 / 1200:.3f}"


def test_compare_of_identical_runs_says_so(tmp_path: Path, capsys) -> None:
    a = _run_dir(tmp_path / "a", _manifest())
    b = _run_dir(tmp_path / "b", _manifest(created_unix=9.0))
    assert compare.main([str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "no differences" in out and "packages: the same" in out and "no summary.json" in out


def test_diff_manifests_flattens_nested_lists() -> None:
    a = {"facts": {"snapshot": {"gpus": [{"name": "A100"}, {"name": "A100"}]}}}
    b = {"facts": {"snapshot": {"gpus": [{"name": "A100"}, {"name": "H100"}]}}}
    assert compare.diff_manifests(a, b) == [("facts.snapshot.gpus.1.name", "A100", "H100")]


@pytest.mark.parametrize("missing", ["nowhere", "empty_dir"])
def test_compare_missing_path_is_one_line_and_exit_2(tmp_path: Path, missing: str, capsys) -> None:
    a = _run_dir(tmp_path / "a", _manifest())
    (tmp_path / "empty_dir").mkdir()
    assert exit_code("compare", compare.main, [str(a), str(tmp_path / missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and missing in err


def test_compare_cli_runs_as_a_module(tmp_path: Path) -> None:
    a = _run_dir(tmp_path / "a", _manifest())
    done = subprocess.run(
        [sys.executable, "-m", "env.records.compare", str(a), str(tmp_path / "b")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr


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
