"""Helpers for tests that run real training jobs: launched exactly as `make train` does, or started in the
background to be signalled or killed once they reach a step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from tests.helpers.paths import ROOT
from train.checkpoint import Checkpointer, ModelState, OptimizerState
from train.config_loader import load_config
from train.models import build_model
from train.run import build_optimizer

# A tiny fp32 run that takes a fraction of a second per step on two CPU cores.
SMALL = [
    "model.n_layers=2",
    "model.dim=64",
    "model.inter_dim=128",
    "model.moe_inter_dim=32",
    "model.kv_lora_rank=32",
    "model.qk_nope_head_dim=16",
    "model.qk_rope_head_dim=8",
    "model.v_head_dim=16",
    "model.max_seq_len=64",
    "data.seq_len=32",
    "train.precision=fp32",
    "train.log_every=1",
    "train.warmup_steps=2",
    "data.num_workers=0",
]


def train_command(run_dir: Path, gpus: int, steps: int, *overrides: str, max_restarts: int = 0) -> list[str]:
    return [
        sys.executable, "-m", "train.launch", "--gpus", str(gpus), "--config", "tiny", "--run-dir", str(run_dir),
        "--steps", str(steps), "--max-restarts", str(max_restarts), *SMALL, *overrides,
    ]  # fmt: skip


def launch_train(
    run_dir: Path, gpus: int, steps: int, *overrides: str, env: dict[str, str] | None = None, timeout: float = 240
) -> subprocess.CompletedProcess:
    return subprocess.run(
        train_command(run_dir, gpus, steps, *overrides),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def start_job(command: list[str], env: dict[str, str] | None = None, as_terminal_job: bool = False) -> subprocess.Popen:
    """command started from the repository root with its output piped, for a test to signal; env: the whole environment.

    as_terminal_job: in a session of its own, as a terminal runs a foreground job, with SIGINT and SIGQUIT at
    their defaults (a suite run as a background job, `make test &`, has them ignored).
    """
    return subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=os.environ if env is None else env, start_new_session=as_terminal_job,
        preexec_fn=_terminal_signals if as_terminal_job else None,
    )  # fmt: skip


def _terminal_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Until the job has logged `step`; it failing or ending first fails the test with its output."""
    deadline = time.monotonic() + timeout
    path = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        rows = path.read_text().splitlines() if path.exists() else []
        if rows and json.loads(rows[-1])["step"] >= step:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached")


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> list[float]:
    return [record["loss"] for record in metrics(run_dir)]


def checkpoint_state(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(model parameters and buffers, optimizer state, {"step"}) of the newest valid checkpoint."""
    cfg = load_config("tiny", SMALL)
    model = build_model(cfg.model)
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    # Read in this one process: a checkpoint of either strategy loads at any world size.
    parts = {"model": ModelState(model), "optimizer": OptimizerState(model, optimizer)}
    step = Checkpointer(run_dir, parts, keep=100, rank=0, world_size=1, strategy=None).load_latest()
    assert step is not None, f"no checkpoint in {run_dir}"
    return {k: v.clone() for k, v in model.state_dict().items()}, optimizer.state_dict(), {"step": step}


def fsdp2_runs_here() -> bool:
    """FSDP2 trains here: on a GPU, or on CPU from torch 2.6 (its forward needs CUDA streams before)."""
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    return torch.cuda.is_available() or (major, minor) >= (2, 6)


def assert_states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], exact: bool) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:
            # Adam turns float-order noise in near-zero gradients into ~1e-5; a wrong reduction moves ~lr (1e-3).
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-4, msg=key)
