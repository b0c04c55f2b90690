"""What a user types at the make command line: bad input is one line and a non-zero exit."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from env.common.cli import CPU_DEFAULT_WORKERS, UserError, check_workers
from tests.conftest import ROOT

PY = sys.executable
needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed (the image leaves it out)")


def run(cmd: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **env}, timeout=300)


@needs_make
def test_make_help_lists_every_target_once() -> None:
    out = run(["make", "help"]).stdout
    targets = [
        "help",
        "setup",
        "build",
        "doctor",
        "nccl-test",
        "train",
        "bench",
        "shell",
        "test",
        "test-image",
        "lint",
        "clean",
        "compare",
    ]
    for target in targets:
        assert sum(line.split()[1] == target for line in out.splitlines()) == 1, target


@needs_make
@pytest.mark.parametrize("gpus", ["0", "abc", "-1", "99"])
def test_make_train_rejects_bad_gpus_at_once(gpus: str) -> None:
    result = run(["make", "train", f"GPUS={gpus}", "RUNTIME=local"])
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("torchrig make: GPUS")]
    assert len(ours) == 1 and "Traceback" not in result.stderr


def test_gpus_validation_against_visible_gpus() -> None:
    assert check_workers(2, 3) == 2
    assert check_workers(8, 0) == 8
    assert check_workers(None, 3) == 3 and check_workers(None, 0) == CPU_DEFAULT_WORKERS  # the one CPU default
    with pytest.raises(UserError, match="only 3"):
        check_workers(4, 3)
    with pytest.raises(UserError, match="at most 8"):
        check_workers(9, 0)


def test_unknown_runtime_is_one_line() -> None:
    result = run([PY, "-m", "env.rig.runtime", "train", "RUNTIME=podman"])
    assert result.returncode == 2 and result.stderr.strip() == "torchrig make: RUNTIME=podman is not docker or local"


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

    from env.machine.nvml import Snapshot
    from train import launch

    box = Snapshot.load(ROOT / "tests/fixtures/nvml/box_3x4090_pcie.json")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    # The names the launcher imported: what it reads the box through.
    monkeypatch.setattr(launch, "read_snapshot", lambda: box)
    monkeypatch.setattr(launch, "torch_copy_check", lambda src, dst: True)
    for var in ("NCCL_P2P_DISABLE", "CUDA_VISIBLE_DEVICES"):  # set first, so that undo restores their absence
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    decision = launch._p2p_decision()
    assert decision is not None and decision["disable"] is True and decision["source"] == "measured"
    assert os.environ["NCCL_P2P_DISABLE"] == "1"


def _fake_disk(monkeypatch, tmp_path, free_bytes: float) -> list[list[str]]:
    """env.rig.runtime rooted in tmp_path (no .venv yet), a disk with free_bytes, and a record of commands run."""
    import collections

    import env.rig.runtime as runtime

    monkeypatch.setattr(runtime, "ROOT", tmp_path)
    monkeypatch.setattr(runtime, "VENV", tmp_path / ".venv")
    monkeypatch.setattr(runtime, "STAMP", tmp_path / ".venv" / "stamp")
    monkeypatch.setattr(runtime.tempfile, "gettempdir", lambda: str(tmp_path))
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(runtime.shutil, "disk_usage", lambda _: usage(100e9, 100e9 - free_bytes, free_bytes))
    ran: list[list[str]] = []

    def fake_run(cmd: list[str], **_: object) -> subprocess.CompletedProcess:
        ran.append(cmd)  # making the venv works; pip fails
        return subprocess.CompletedProcess(cmd, 1 if "pip" in cmd else 0)

    monkeypatch.setattr(runtime.subprocess, "run", fake_run)
    return ran


def test_a_disk_too_full_for_the_venv_is_refused_before_pip_starts(monkeypatch, tmp_path) -> None:
    import env.rig.runtime as runtime

    ran = _fake_disk(monkeypatch, tmp_path, free_bytes=6e9)
    with pytest.raises(UserError) as err:
        runtime.ensure_venv()
    # The venv and pip's downloads share this disk: 5.5 + 3.0 GB are needed and 6 GB is not enough.
    assert "needs about 8.5 GB free" in str(err.value) and "has 6.0 GB" in str(err.value)
    assert "pip cache purge" in str(err.value) and "\n" not in str(err.value)
    assert ran == [] and not (tmp_path / ".venv").exists()


def test_a_disk_that_fills_during_the_install_is_named(monkeypatch, tmp_path) -> None:
    import env.rig.runtime as runtime

    ran = _fake_disk(monkeypatch, tmp_path, free_bytes=9e9)
    runtime.check_disk_for_venv()  # enough room to start
    monkeypatch.setattr(runtime, "check_disk_for_venv", lambda: None)
    full = runtime.shutil.disk_usage(tmp_path)._replace(free=0)
    monkeypatch.setattr(runtime.shutil, "disk_usage", lambda _: full)  # pip then fills the disk
    with pytest.raises(UserError, match=r"filled up while installing \.venv"):
        runtime.ensure_venv()
    assert ran and "pip" in ran[-1]
    assert not (tmp_path / ".venv" / "stamp").exists()  # the next make remakes the venv


def test_a_lock_update_of_an_existing_venv_skips_the_first_install_disk_check(monkeypatch, tmp_path) -> None:
    import env.rig.runtime as runtime

    ran = _fake_disk(monkeypatch, tmp_path, free_bytes=2e9)
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "python").touch()  # made before; its stamp names an older lock
    with pytest.raises(UserError, match="see pip's message above"):  # the fake pip fails, with room left
        runtime.ensure_venv()
    assert len(ran) == 1 and "pip" in ran[0]
