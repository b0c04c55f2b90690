"""What the last release wrote still works: a run directory and an export made by its code (a git worktree of
that commit, run in the same venv) resume, evaluate and sample under this code."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.paths import ROOT
from tests.helpers.trainrun import SMALL, launch_train, losses, metrics

# The last landing before the train/ ground floor (issue 15): config.py held the loader, data.py was one file.
PREVIOUS_RELEASE = "aeb043c"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def previous_release(tmp_path_factory) -> Path:
    """A checkout of PREVIOUS_RELEASE; skipped where the clone has no such history (a shallow clone)."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    found = subprocess.run(["git", "cat-file", "-e", f"{PREVIOUS_RELEASE}^{{commit}}"], cwd=ROOT, capture_output=True)
    if found.returncode != 0:
        pytest.skip(f"commit {PREVIOUS_RELEASE} is not in this clone's history (shallow clone?)")
    checkout = tmp_path_factory.mktemp("previous") / "tree"
    archive = subprocess.run(["git", "archive", PREVIOUS_RELEASE], cwd=ROOT, capture_output=True, check=True)
    checkout.mkdir()
    subprocess.run(["tar", "-x", "-C", str(checkout)], input=archive.stdout, check=True)
    return checkout


def _old(checkout: Path, module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TORCHRIG_DATA_DIR": str(ROOT / "data")}
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=checkout, env=env, capture_output=True, text=True, timeout=300
    )


def test_a_run_of_the_previous_release_resumes_evaluates_and_samples_here(previous_release: Path, tmp_path) -> None:
    old_run = tmp_path / "old"
    # Two steps with the old code, a checkpoint at step 2, the old config keys (train.tensorboard) in it.
    trained = _old(
        previous_release, "train.launch", "--gpus", "1", "--config", "tiny", "--run-dir", str(old_run),
        "--steps", "2", *SMALL, "train.ckpt_every=2", "train.eval_every=2",
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    old_export = tmp_path / "old-export"
    exported = _old(previous_release, "train.export", "--run-dir", str(old_run), "--output", str(old_export))
    assert exported.returncode == 0, exported.stderr
    resumed = launch_train(old_run, 1, 4, "train.ckpt_every=2", "train.eval_every=2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from step 2 of 4" in resumed.stdout
    fresh = tmp_path / "fresh"
    assert launch_train(fresh, 1, 4, "train.ckpt_every=2", "train.eval_every=2").returncode == 0
    # The same stream and the same weights at step 2: the continued run is the uninterrupted one.
    assert [r["step"] for r in metrics(old_run)] == [1, 2, 3, 4]
    assert losses(old_run) == pytest.approx(losses(fresh), rel=1e-5, abs=1e-6)
    evaluated = subprocess.run(
        [sys.executable, "-m", "train.eval", "--run-dir", str(old_run)], cwd=ROOT, capture_output=True, text=True
    )
    assert evaluated.returncode == 0, evaluated.stderr
    for source in (old_run, old_export):
        sampled = subprocess.run(
            [sys.executable, "-m", "train.sample", "--run-dir", str(source), "--tokens", "5", "--temperature", "0"],
            cwd=ROOT, capture_output=True, text=True,
        )  # fmt: skip
        assert sampled.returncode == 0, sampled.stderr
