"""Helpers for tests that run real training jobs: launched exactly as `make train` does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.conftest import ROOT
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


def assert_states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], exact: bool) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:
            # Adam turns float-order noise in near-zero gradients into ~1e-5; a wrong reduction moves ~lr (1e-3).
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-4, msg=key)
