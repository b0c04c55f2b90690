"""Signals through `make train RUNTIME=local`: what a preempted or killed job says, and what the shell sees."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers.make import needs_make, pinned_venv, user_environment
from tests.helpers.processes import pid_of
from tests.helpers.trainrun import SMALL, start_job, wait_for_step

pytestmark = [pytest.mark.slow, needs_make, pinned_venv]
STEPS = 40


def make_train(run_dir: Path) -> list[str]:
    return ["make", "--no-print-directory", "train", "RUNTIME=local", "CONFIG=tiny", "GPUS=2", f"STEPS={STEPS}",
            "MICRO_BATCH=2", f"RUN_DIR={run_dir}", f"ARGS={' '.join(SMALL)} train.ckpt_every=100"]  # fmt: skip


def start_make_train(run_dir: Path) -> subprocess.Popen:
    """make train in a session of its own, as a terminal runs it in a foreground process group."""
    # A pause per step (test-only): time to signal.
    return start_job(
        make_train(run_dir), {**user_environment(), "TORCHRIG_TEST_STEP_SLEEP": "0.3"}, as_terminal_job=True
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_signal_through_make_saves_and_the_shell_sees_make_die_by_it(tmp_path: Path, sig: signal.Signals) -> None:
    """The README's promise: the job saves and exits 0; GNU make then dies by the signal (143 or 130 in a shell)."""
    run_dir = tmp_path / "run"
    proc = start_make_train(run_dir)
    wait_for_step(run_dir, 2, proc)
    os.killpg(proc.pid, sig)  # what the terminal does for Ctrl-C, and a scheduler's kill of the job's group
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == -sig, err  # a shell reports 128 + signal
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped_early"] is True
    assert "checkpoint saved at step" in out and "exiting cleanly" in out, out
    assert "Traceback" not in err


def test_more_signals_during_the_shutdown_neither_hang_it_nor_print_a_traceback(tmp_path: Path) -> None:
    """GNU make passes on a SIGTERM the group's SIGTERM already reached the launcher with; Ctrl-C pressed twice."""
    run_dir = tmp_path / "run"
    proc = start_make_train(run_dir)
    wait_for_step(run_dir, 2, proc)
    launcher = pid_of("train.launch", run_dir)
    os.killpg(proc.pid, signal.SIGTERM)
    for _ in range(5):
        time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.kill(launcher, signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == -signal.SIGTERM, err
    assert "checkpoint saved at step" in out, out
    assert "Traceback" not in err and "Logging error" not in err and "death signal" not in err, err


def test_a_sigkilled_worker_is_named_with_the_signal_and_where_to_look(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = start_make_train(run_dir)
    wait_for_step(run_dir, 2, proc)
    os.kill(pid_of("train.worker", run_dir, rank=1), signal.SIGKILL)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 2, err  # make's own status for a failed recipe
    assert "worker rank 1 was killed by signal 9 (SIGKILL)" in err and "dmesg" in err, err
    assert "its output above says why" not in err
