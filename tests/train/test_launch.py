"""The training launcher (train/launch.py) before its workers start: one-line preflight errors, the P2P decision."""

from __future__ import annotations

import os
import sys

import pytest

from tests.helpers.commands import run
from tests.helpers.nvml import box

PY = sys.executable


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--config", "tiny", "train.lrr=1"], "did you mean 'train.lr'"),
        (["--config", "nope"], "available: "),
        (["--config", "tiny", "data.source=files", "data.path=/no/such/*.txt"], "/no/such/*.txt"),
        (["--config", "tiny", "--micro-batch", "0"], "train.micro_batch"),
        # A node rank outside the job used to wait for the rendezvous forever; nccl-test shares these checks.
        (["--nnodes", "2", "--node-rank", "5", "--master-addr", "127.0.0.1"], "--node-rank 5 must be between 0 and 1"),
        (["--master-port", "70000"], "--master-port 70000 must be between 1 and 65535"),
        # The launcher's GPUS check is the dispatcher's (env.common.cli.check_workers), not torch's AssertionError.
        (["--gpus", "-1"], "--gpus '-1' is not a whole number"),
        (["--gpus", "0"], "--gpus 0 must be at least 1"),
    ],
)
def test_train_preflight_errors_are_one_line(args: list[str], expected: str, tmp_path) -> None:
    result = run([PY, "-m", "train.launch", "--gpus", "1", "--run-dir", str(tmp_path / "r"), *args])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in result.stderr


def test_training_takes_the_measured_p2p_decision_before_its_workers_start(monkeypatch) -> None:
    """On a 3x RTX 4090 PCIe box (recorded NVML answers) the launcher sets NCCL_P2P_DISABLE for the workers."""
    import torch

    from train import launch

    recorded = box("box_3x4090_pcie")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    # The names the launcher imported: what it reads the box through.
    monkeypatch.setattr(launch, "read_snapshot", lambda: recorded)
    monkeypatch.setattr(launch, "torch_copy_check", lambda src, dst: True)
    for var in ("NCCL_P2P_DISABLE", "CUDA_VISIBLE_DEVICES"):  # set first, so that undo restores their absence
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    decision = launch._p2p_decision()
    assert decision is not None and decision["disable"] is True and decision["source"] == "measured"
    assert os.environ["NCCL_P2P_DISABLE"] == "1"
