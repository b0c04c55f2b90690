"""Assembling a run: the model on its device and wrapped, the optimizer, the schedule, the precision, and
the checkpoint parts; `setup` builds a `Run` once, and the trainer's loop (train/trainer.py) drives it.

Everything here is a pure function of the config and the process's place (DistInfo), so that a
resumed run builds the same run: the same seed gives the same initial weights on every rank, the
learning rate is a function of the step (nothing to save), and the checkpoint holds one Stateful part
per piece of state (train/checkpoint/: the checkpointer knows none of their contents).
"""

from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from train import activation_checkpointing, lora
from train.checkpoint import Checkpointer, ModelState, OptimizerState, RNGState
from train.config import RunConfig
from train.distributed import DistInfo, wrap_model
from train.models import build_model, get_spec
from train.weights import init_from


@dataclass
class Precision:
    name: str  # bf16, fp16 or fp32
    autocast_dtype: torch.dtype | None
    use_scaler: bool

    @classmethod
    def resolve(cls, requested: str, device: torch.device) -> Precision:
        name = requested
        if requested == "auto":
            name = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[name]
        return cls(name, dtype, use_scaler=name == "fp16")

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)


def lr_at(step: int, cfg: RunConfig) -> float:
    """Linear warmup to train.lr, then cosine decay to train.min_lr at train.lr_decay_steps (or train.steps)."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    horizon = t.lr_decay_steps or t.steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, horizon - t.warmup_steps))
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: RunConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the parameters that train (a LoRA run's adapters), fused on CUDA; no weight decay on norms,
    biases and balancing vectors."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # No empty group (a LoRA run's adapters are all matrices): DCP's optimizer state keeps no entry for one.
    groups = [group for group in groups if group["params"]]
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2), **extra)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def device_settings(cfg: RunConfig, device: torch.device) -> None:
    """TF32 and cuDNN autotuning as the config and the model family want them (CUDA only)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.train.tf32
        torch.backends.cudnn.allow_tf32 = cfg.train.tf32
        torch.backends.cudnn.benchmark = get_spec(cfg.model.arch).cudnn_benchmark


@dataclass
class Run:
    """Everything the loop touches, built once by `setup`."""

    cfg: RunConfig
    info: DistInfo
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: Any  # torch.amp.GradScaler (torch.cuda.amp's on older releases): Stateful already
    precision: Precision
    checkpointer: Checkpointer
    start_step: int
    parameters: tuple[int, int]  # (trainable, total): LoRA trains only its adapters
    # Turns each step's summed [loss, its named parts (the spec's loss_parts), stop votes] into means and the
    # vote count; made once: a copy from the host waits.
    stats_divisor: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        ranks = [float(self.info.world_size)] * (1 + len(get_spec(self.cfg.model.arch).loss_parts))
        self.stats_divisor = torch.tensor([*ranks, 1.0], device=self.info.device)


def setup(cfg: RunConfig, run_dir: Path, info: DistInfo) -> Run:
    seed_everything(cfg.train.seed)  # same seed on every rank: identical initial weights
    device_settings(cfg, info.device)
    precision = Precision.resolve(cfg.train.precision, info.device)
    model = build_model(cfg.model).to(info.device)
    init_from(model, cfg, run_dir)  # train.init_from: fine-tuning starts from those weights (not on resume)
    lora.apply(model, cfg, lora.base_dtype(cfg, precision.autocast_dtype))  # train.lora: the base frozen, adapters
    parameters = lora.parameter_counts(model)
    activation_checkpointing.apply(model, get_spec(cfg.model.arch), cfg.train.activation_checkpointing)
    fsdp_param_dtype = precision.autocast_dtype if cfg.train.strategy == "fsdp" else None
    model = wrap_model(model, cfg, info, fsdp_param_dtype)
    if cfg.train.compile:
        model = torch.compile(model, backend=cfg.train.compile_backend)
    optimizer = build_optimizer(model, cfg, info.device)
    scaler = torch.amp.GradScaler(info.device.type, enabled=precision.use_scaler)
    checkpointer = Checkpointer(
        run_dir,
        checkpoint_parts(model, optimizer, scaler, info),
        keep=cfg.train.keep_ckpts,
        rank=info.rank,
        world_size=info.world_size,
        strategy=cfg.train.strategy,
        config=resume_config(cfg, info),
    )
    # Parameters and AdamW's two moments of those that train, all ranks together (an FSDP parameter's numel is the
    # global one): a LoRA run's checkpoint is its base and its adapters' moments.
    sizes = [(p.numel() * p.element_size(), p.requires_grad) for p in model.parameters()]
    checkpointer.preflight(sum(size + 2 * size * trains for size, trains in sizes))
    # The saved config is checked against this one before any state is loaded (CheckpointError if resume breaks).
    start_step = checkpointer.load_latest() or 0
    return Run(cfg, info, model, optimizer, scaler, precision, checkpointer, start_step, parameters)


def resume_config(cfg: RunConfig, info: DistInfo) -> dict[str, Any]:
    """The config a checkpoint records, and a resume is checked against (train/checkpoint/resume.py)."""
    return {**cfg.to_dict(), "world_size": info.world_size}


def checkpoint_parts(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any, info: DistInfo) -> dict:
    """What a checkpoint holds: one entry per Stateful part. The step names the checkpoint and is also the
    data position (the sample stream is a pure function of it, train/data/stream.py) and fixes the learning
    rate (lr_at), so neither is stored beside it."""
    return {
        "model": ModelState(model),  # the MoE balancing biases are buffers of the model
        "optimizer": OptimizerState(model, optimizer),
        "scaler": scaler,  # a GradScaler is Stateful already
        "rng": RNGState(info.rank, info.world_size),
    }
