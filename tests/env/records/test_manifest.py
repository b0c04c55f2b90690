"""The run manifest (env/records/manifest.py): git state, the image commit, each launch, the socket interfaces."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from env.records import manifest

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


def test_the_manifest_records_the_socket_interfaces(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "eth0")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth1")
    data = json.loads(manifest.write_manifest(tmp_path / "run", kind="nccl-test").read_text())
    environment = data["environment"]
    assert environment["NCCL_SOCKET_IFNAME"] == "eth0" and environment["GLOO_SOCKET_IFNAME"] == "eth1"
