"""The run manifest (env/records/manifest.py) and the comparison of two runs (env/records/compare.py)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from env.common.cli import exit_code
from env.machine import facts as machine
from env.records import compare, manifest
from tests.conftest import ROOT

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "-c", "commit.gpgsign=false"]


def _git(repo: Path, *args: str) -> str:
    return subprocess.run([*GIT, "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    if shutil.which("git") is None:
        pytest.skip("git is not installed (the image leaves it out)")
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "train.py").write_text("print('v1')\n")
    _git(repo, "add", "train.py")
    _git(repo, "commit", "-q", "-m", "first")
    return repo


@pytest.fixture(autouse=True)
def _no_gpu_load(monkeypatch) -> None:
    """A manifest must never run the doctor's GPU load; make it loud if it tries."""

    def refuse(*_: object) -> None:
        raise AssertionError("write_manifest ran the GPU load")

    monkeypatch.setattr(machine, "read_snapshot_under_load", refuse)


def test_manifest_in_a_git_repo(repo: Path, tmp_path: Path) -> None:
    config = {"model": {"dim": 128}, "train": {"steps": 5, "lr": 3e-4}}
    path = manifest.write_manifest(
        tmp_path / "run",
        kind="train",
        config=config,
        repo_dir=repo,
        p2p={"disable": True, "source": "measured"},
        extra={"world_size": 2},
    )
    data = json.loads(path.read_text())
    assert path == tmp_path / "run" / "manifest.json"
    assert data["git"] == {"commit": _git(repo, "rev-parse", "HEAD"), "dirty": False, "changed": [], "source": "git"}
    assert data["config"] == config and data["kind"] == "train" and data["extra"] == {"world_size": 2}
    assert data["p2p"]["disable"] is True
    packages = data["packages"]
    assert packages["sha256"] == hashlib.sha256("\n".join(packages["list"]).encode()).hexdigest()
    assert any(line.startswith("torch==") for line in packages["list"])
    assert packages["count"] == len(packages["list"])
    assert data["facts"]["pcie_load"].startswith("not run")
    assert {"snapshot", "torch_version", "shm_bytes", "ulimits"} <= set(data["facts"])
    assert os.listdir(tmp_path / "run") == ["manifest.json"]  # no temporary file left behind


def test_manifest_marks_a_dirty_tree(repo: Path, tmp_path: Path) -> None:
    (repo / "train.py").write_text("print('v2')\n")
    data = json.loads(manifest.write_manifest(tmp_path / "run", kind="bench", repo_dir=repo).read_text())
    assert data["git"]["dirty"] is True and data["git"]["changed"] == ["train.py"]


def test_manifest_without_git_uses_the_image_commit(tmp_path: Path, monkeypatch) -> None:
    not_a_repo = tmp_path / "plain"
    not_a_repo.mkdir()
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # do not find an enclosing repository
    monkeypatch.setenv("TORCHRIG_GIT_COMMIT", "abc123")
    monkeypatch.setenv("NCCL_DEBUG", "WARN")
    data = json.loads(manifest.write_manifest(tmp_path / "run", kind="nccl-test", repo_dir=not_a_repo).read_text())
    assert data["git"]["commit"] == "abc123" and data["git"]["source"] == "TORCHRIG_GIT_COMMIT"
    assert data["environment"]["NCCL_DEBUG"] == "WARN"
    monkeypatch.delenv("TORCHRIG_GIT_COMMIT")
    assert manifest.git_state(not_a_repo)["commit"] == "unknown"


def test_manifest_rejects_an_unknown_kind(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nccl-test"):
        manifest.write_manifest(tmp_path, kind="training")


def test_manifest_replaces_an_earlier_one_whole(repo: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    manifest.write_manifest(run, kind="train", config={"a": 1}, repo_dir=repo)
    manifest.write_manifest(run, kind="train", config={"a": 2}, repo_dir=repo)
    assert json.loads((run / "manifest.json").read_text())["config"] == {"a": 2}


# --- compare --------------------------------------------------------------------------------


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


def test_each_training_launch_is_appended_and_a_foreign_manifest_is_kept_aside(repo: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = manifest.build_manifest(run_dir, kind="train", config={"train": {"steps": 4}}, repo_dir=repo)
    second = manifest.build_manifest(run_dir, kind="train", config={"train": {"steps": 8}}, repo_dir=repo)
    manifest.record_launch(run_dir, first)
    path = manifest.record_launch(run_dir, second)
    data = json.loads(path.read_text())
    assert data["config"] == {"train": {"steps": 4}}  # the run that made the checkpoints
    assert [launch["config"]["train"]["steps"] for launch in data["launches"]] == [4, 8]
    assert data["launches"][1]["git"]["commit"] == _git(repo, "rev-parse", "HEAD")

    # Not ours (or an endless device at its name): kept under another name, never overwritten or read forever.
    for planted in ("not json", None):
        path.unlink()
        if planted is None:
            path.symlink_to("/dev/zero")
        else:
            path.write_text(planted)
        manifest.record_launch(run_dir, second)
        assert len(json.loads(path.read_text())["launches"]) == 1
    kept = sorted(p.name for p in run_dir.iterdir() if p.name.startswith("manifest.json.unreadable-"))
    assert len(kept) == 2 and Path("/dev/zero").exists()
