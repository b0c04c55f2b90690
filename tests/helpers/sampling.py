"""Helpers for the sampling and export tests: small models saved as checkpoints or exports, and make's output."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import torch

from tests.helpers.trainrun import SMALL
from train.checkpoint import Checkpointer
from train.config import RunConfig
from train.config_loader import load_config
from train.distributed import DistInfo
from train.models import build_model
from train.run import build_optimizer, checkpoint_parts
from train.weights import init_source_config


def small_config(*overrides: str) -> RunConfig:
    """The tiny config with SMALL and the overrides, read as a run reads it (train.init_from's model included)."""
    return load_config("tiny", [*SMALL, *overrides], init_source_config)


def trained_in_process(cfg: RunConfig, steps: int = 2, seed: int = 3) -> torch.nn.Module:
    """A model of cfg after a few AdamW steps on random tokens: weights and routing biases off their init."""
    from train.models.deepseek import moe_balance_step

    torch.manual_seed(seed)
    model = build_model(cfg.model)
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    for _ in range(steps):
        tokens = torch.randint(0, cfg.model.vocab_size, (4, cfg.data.seq_len + 1))
        model(tokens[:, :-1], tokens[:, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        moe_balance_step(model)
    return model


def save_checkpoint(run_dir: Path, model: torch.nn.Module, cfg: RunConfig, step: int, strategy: str = "ddp") -> None:
    """A checkpoint as training writes it (one process), with the config the trainer records."""
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    info = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend="gloo")
    parts = checkpoint_parts(model, optimizer, scaler, info)
    config = {**cfg.to_dict(), "world_size": 1}
    Checkpointer(run_dir, parts, keep=3, rank=0, world_size=1, strategy=strategy, config=config).save(step)


def write_export(directory: Path, model: torch.nn.Module, model_config: dict) -> None:
    """An export directory written by hand (not by train.export), for inputs export would never make."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps({"model": model_config, "export": {"step": 0}}))


def tool_lines(result: subprocess.CompletedProcess) -> list[str]:
    """The lines a tool wrote to stderr, without the dispatcher's runtime line and make's own line."""
    return [
        line
        for line in result.stderr.splitlines()
        if not line.startswith("torchrig: runtime=") and not line.startswith("make: ***")
    ]
