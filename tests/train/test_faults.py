"""Training that survives faults: exact resume, SIGTERM, a killed worker, a hung rank, NaN.

Every test runs real 2-rank jobs through train.launch on gloo, fp32, and compares against
an uninterrupted reference run of the same length: equality is bitwise.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.helpers.processes import pid_of
from tests.helpers.trainrun import (
    assert_states_equal,
    checkpoint_state,
    launch_train,
    metrics,
    start_job,
    train_command,
    wait_for_step,
)

pytestmark = pytest.mark.slow
STEPS = 12
# Every run decays the learning rate over STEPS, so a shorter first leg is the same run stopped early.
CKPT = ["train.ckpt_every=2", f"train.lr_decay_steps={STEPS}"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    result = launch_train(run_dir, 2, STEPS, *CKPT)
    assert result.returncode == 0, result.stderr
    return run_dir


def _assert_same_as_reference(run_dir: Path, reference: Path) -> None:
    params, optim, _ = checkpoint_state(run_dir)
    ref_params, ref_optim, _ = checkpoint_state(reference)
    assert_states_equal(params, ref_params, exact=True)
    for (_, a), (_, b) in zip(sorted(optim["state"].items()), sorted(ref_optim["state"].items()), strict=True):
        assert_states_equal(a, b, exact=True)
    by_step = {r["step"]: r["loss"] for r in metrics(run_dir)}
    assert by_step == {r["step"]: r["loss"] for r in metrics(reference)}


def test_stop_and_resume_is_bitwise_identical(reference, tmp_path) -> None:
    run_dir = tmp_path / "run"
    assert launch_train(run_dir, 2, STEPS // 2, *CKPT).returncode == 0
    resumed = launch_train(run_dir, 2, STEPS, *CKPT)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from step {STEPS // 2}" in resumed.stdout
    _assert_same_as_reference(run_dir, reference)


def test_sigterm_saves_at_the_step_boundary_exits_0_and_resumes_exactly(reference, tmp_path) -> None:
    run_dir = tmp_path / "run"
    # A pause per step (test-only) gives the signal a step boundary to land on before the end.
    proc = start_job(train_command(run_dir, 2, STEPS, *CKPT), env={**os.environ, "TORCHRIG_TEST_STEP_SLEEP": "0.3"})
    wait_for_step(run_dir, 3, proc, timeout=120)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    stopped_at = metrics(run_dir)[-1]["step"]
    assert 3 <= stopped_at < STEPS and f"checkpoint saved at step {stopped_at}" in out
    assert checkpoint_state(run_dir)[2]["step"] == stopped_at
    assert launch_train(run_dir, 2, STEPS, *CKPT).returncode == 0
    _assert_same_as_reference(run_dir, reference)


def test_a_killed_worker_restarts_the_group_and_finishes_identically(reference, tmp_path) -> None:
    run_dir = tmp_path / "run"
    command = train_command(run_dir, 2, STEPS, *CKPT, max_restarts=1)
    proc = start_job(command, env={**os.environ, "TORCHRIG_TEST_STEP_SLEEP": "0.3"})
    wait_for_step(run_dir, 5, proc, timeout=120)
    os.kill(pid_of("train.worker", run_dir, rank=1), signal.SIGKILL)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    assert "resuming from step" in out
    _assert_same_as_reference(run_dir, reference)


def test_a_truncated_newest_checkpoint_is_skipped_for_the_one_before(reference, tmp_path) -> None:
    run_dir = tmp_path / "run"
    assert launch_train(run_dir, 2, 6, *CKPT).returncode == 0
    entry = max(p for p in (run_dir / "checkpoints").iterdir() if p.is_dir())
    newest = max(entry.glob("*.distcp"), key=lambda p: p.stat().st_size)  # the tensors of the newest checkpoint
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    resumed = launch_train(run_dir, 2, STEPS, *CKPT)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from step 4" in resumed.stdout
    assert any("step-000006" in line for line in (resumed.stdout + resumed.stderr).splitlines())
    _assert_same_as_reference(run_dir, reference)


def test_a_hung_rank_ends_the_job_within_the_timeout_naming_the_rank(tmp_path) -> None:
    run_dir = tmp_path / "run"
    started = time.monotonic()
    result = launch_train(run_dir, 2, STEPS, *CKPT, "train.timeout_s=8", env={"TORCHRIG_TEST_HANG": "1:4"})
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    assert "rank 1 stopped answering" in result.stderr, result.stderr
    assert "last checkpoint (step 2" in result.stderr
    assert elapsed < 60, elapsed  # the 8 s timeout plus start-up, not NCCL's 30 minutes
    assert "Traceback" not in result.stderr


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path) -> None:
    import math
    import re

    run_dir = tmp_path / "run"
    assert launch_train(run_dir, 2, 4, *CKPT).returncode == 0
    # An absurd learning rate: the weights explode within a few steps, and the loss turns non-finite.
    blown = launch_train(run_dir, 2, STEPS, *CKPT, "train.lr=1e30", "train.min_lr=1e30", "train.grad_clip=1e30")
    assert blown.returncode != 0
    lines = [line for line in blown.stderr.splitlines() if line.startswith("torchrig:")]
    assert len(lines) == 1 and "Traceback" not in blown.stderr, blown.stderr
    found = re.search(r"loss became (nan|inf|-inf) at step (\d+);.* last checkpoint \(step (\d+),", lines[0])
    assert found, lines[0]
    bad_step, last_good = int(found[2]), int(found[3])
    assert 4 <= last_good < bad_step
    # The step whose loss was non-finite was neither taken, nor logged, nor checkpointed.
    assert all(r["step"] < bad_step and math.isfinite(r["loss"]) for r in metrics(run_dir))
    steps = sorted(int(p.stem.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*.json"))
    assert steps[-1] == last_good
    _, _, extra = checkpoint_state(run_dir)
    assert extra["step"] == last_good


def test_a_full_disk_under_the_metrics_stops_the_run_in_one_line_and_keeps_the_checkpoints(tmp_path) -> None:
    run_dir = tmp_path / "run"
    assert launch_train(run_dir, 2, 4, *CKPT).returncode == 0
    logged = (run_dir / "metrics.jsonl").read_text()
    (run_dir / "metrics.jsonl").unlink()
    (run_dir / "metrics.jsonl").symlink_to("/dev/full")  # every write there fails with ENOSPC
    full = launch_train(run_dir, 2, STEPS, *CKPT)
    assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr
    first = next(line for line in full.stderr.splitlines() if line.startswith("torchrig: "))
    assert first == (
        f"torchrig: writing {run_dir / 'metrics.jsonl'} failed (No space left on device): "
        "free space or set RUN_DIR elsewhere; checkpoints already written are intact"
    )
    _, _, extra = checkpoint_state(run_dir)
    assert extra["step"] == 4 and logged.count("\n") == 4
