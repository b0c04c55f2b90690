"""The training loop: AMP + DDP/FSDP2, accumulation, checkpoints, metrics — in one place.

`train(cfg, run_dir)` runs inside every worker that torchrun started. The step itself
(`_train_step`) fits on one screen; everything around it is wiring of the modules that
own each concern: data, model, distributed, checkpoint, metrics, watchdog.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from env.peaks import peak_flops
from train.checkpoint import Checkpointer
from train.config import RunConfig
from train.data import build_dataset, build_loader, describe
from train.distributed import (
    DistInfo,
    all_reduce_sum,
    attempt_prefix,
    backstop_timeout,
    connect_store,
    gradient_sync,
    init_distributed,
    shutdown,
    wrap_model,
)
from train.flops import flops_per_sample, mfu
from train.metrics import MetricsLogger, peak_memory_gb
from train.model import build_model, moe_balance_step
from train.watchdog import Watchdog
from train.weights import init_from


class TrainingStopped(RuntimeError):
    """The run cannot go on (a non-finite loss); the message is one line with the fix."""


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
    """AdamW, fused on CUDA; no weight decay on norms, biases and balancing vectors."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2), **extra)


class StopRequest:
    """SIGTERM/SIGINT ask for a checkpoint at the next step boundary, then a clean exit."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True


@dataclass(frozen=True)
class FaultHooks:
    """Faults that only the test suite sets, through the environment; never set in normal runs.

    TORCHRIG_TEST_HANG=rank:step — that rank stops answering before that step.
    TORCHRIG_TEST_STEP_SLEEP=seconds — a pause after each step, so a signal can land mid-run.
    """

    hang_step: int | None = None
    step_sleep: float = 0.0

    @classmethod
    def from_env(cls, rank: int) -> FaultHooks:
        hang_rank, _, hang_step = os.environ.get("TORCHRIG_TEST_HANG", "").partition(":")
        return cls(
            hang_step=int(hang_step) if hang_rank and int(hang_rank) == rank else None,
            step_sleep=float(os.environ.get("TORCHRIG_TEST_STEP_SLEEP", "0")),
        )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Run:
    """Everything the loop touches, built once by `setup`."""

    cfg: RunConfig
    info: DistInfo
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: Any
    precision: Precision
    checkpointer: Checkpointer
    start_step: int
    # Turns each step's summed [loss, stop votes] into [mean loss, stop votes]; made once: a copy from the host waits.
    stats_divisor: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.stats_divisor = torch.tensor([self.info.world_size, 1.0], device=self.info.device)


def setup(cfg: RunConfig, run_dir: Path, info: DistInfo) -> Run:
    seed_everything(cfg.train.seed)  # same seed on every rank: identical initial weights
    if info.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.train.tf32
        torch.backends.cudnn.allow_tf32 = cfg.train.tf32
        torch.backends.cudnn.benchmark = cfg.model.arch == "resnet50"
    precision = Precision.resolve(cfg.train.precision, info.device)
    model = build_model(cfg.model).to(info.device)
    init_from(model, cfg, run_dir)  # train.init_from: fine-tuning starts from those weights (not on resume)
    fsdp_param_dtype = precision.autocast_dtype if cfg.train.strategy == "fsdp" else None
    model = wrap_model(model, cfg, info, fsdp_param_dtype)
    if cfg.train.compile:
        model = torch.compile(model)
    optimizer = build_optimizer(model, cfg, info.device)
    scaler = torch.amp.GradScaler(info.device.type, enabled=precision.use_scaler)
    checkpointer = Checkpointer(
        run_dir, keep=cfg.train.keep_ckpts, rank=info.rank, world_size=info.world_size, strategy=cfg.train.strategy
    )
    # Parameters and AdamW's two moments, all ranks together (an FSDP parameter's numel is the global one).
    checkpointer.preflight(3 * sum(p.numel() * p.element_size() for p in model.parameters()))
    start_step = 0
    # The saved config is checked against this one before any state is loaded (CheckpointError if resume breaks).
    extra = checkpointer.load_latest(model, optimizer, config=_resume_config(cfg, info))
    if extra is not None:
        scaler.load_state_dict(extra["scaler"])
        start_step = int(extra["step"])
    return Run(cfg, info, model, optimizer, scaler, precision, checkpointer, start_step)


def _train_step(run: Run, batches, watchdog: Watchdog, step: int, stop: StopRequest) -> dict[str, Any]:
    """One optimizer step over `accum` micro-batches; returns the globally reduced figures.

    The step waits for the device once, for the loss and the stop votes. grad_norm and the MoE loads
    stay tensors: reading them would wait for the optimizer step too, so they are read only when logged.
    """
    cfg, model, device = run.cfg, run.model, run.info.device
    accum = cfg.train.accum
    # The schedule is a pure function of the step (as in nanoGPT): nothing to save, and a changed
    # train.lr takes effect on resume.
    lr = lr_at(step - 1, cfg)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), device=device)
    for micro in range(accum):
        inputs, targets = next(batches)
        inputs = inputs.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        watchdog.mark(step, "start")
        with gradient_sync(model, enabled=micro == accum - 1):
            with run.precision.autocast(device):  # the forward only: backward follows its dtypes
                loss = model(inputs, targets) / accum
            watchdog.mark(step, "backward")
            run.scaler.scale(loss).backward()
        loss_sum += loss.detach().float()
    # One small all-reduce per step: the global mean loss, and the stop request of any rank.
    watchdog.mark(step, "sync")
    # torch.full, not torch.tensor: no copy from the host, which would wait for the backward to finish.
    stats = torch.stack([loss_sum, torch.full((), float(stop.requested), device=device)])
    all_reduce_sum(stats)
    loss_mean, stop_votes = (stats / run.stats_divisor).tolist()
    if not math.isfinite(loss_mean):
        raise TrainingStopped(
            f"loss became {loss_mean} at step {step}; the optimizer step was not taken and "
            f"{last_checkpoint_note(run.checkpointer)}; lower train.lr, or use PRECISION=bf16 instead of fp16"
        )
    run.scaler.unscale_(run.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    balance = moe_balance_step(model, all_reduce_sum)
    figures = {"loss": loss_mean, "lr": lr, "grad_norm": grad_norm, "stop": stop_votes > 0}
    return figures | balance


def last_checkpoint_note(checkpointer: Checkpointer) -> str:
    step = checkpointer.latest_step()
    if step is None:
        return "no checkpoint was written yet"
    return f"the last checkpoint (step {step}, in {checkpointer.run_dir / 'checkpoints'}) is intact"


def train(cfg: RunConfig, run_dir: Path) -> dict[str, Any]:
    run: Run | None = None
    info: DistInfo | None = None
    store = connect_store(backstop_timeout(cfg))
    # Started before the process group exists: joining the group and the first collective share the
    # short timeout, so a hang in either is a setup problem reported fast.
    watchdog = Watchdog(
        dist.PrefixStore(attempt_prefix("watchdog"), store) if store is not None else None,
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
        cfg.train.first_timeout_s,
        cfg.train.timeout_s,
        last_checkpoint=lambda: last_checkpoint_note(run.checkpointer) if run else "no checkpoint was written yet",
        on_fire=lambda: _dump_flight_recorder(run_dir, info) if info else None,
    ).start()
    info = init_distributed(cfg, run_dir, store)
    stop = StopRequest()
    all_reduce_sum(torch.ones((), device=info.device))
    watchdog.first_collective_completed()
    try:
        run = setup(cfg, run_dir, info)
        return _loop(run, run_dir, watchdog, stop)
    finally:
        watchdog.stop()
        shutdown()


def _dump_flight_recorder(run_dir: Path, info: DistInfo) -> None:
    """Where torch provides it (NCCL), write the collective flight recorder into RUN_DIR."""
    dump = getattr(torch._C._distributed_c10d, "_dump_nccl_trace", None)
    if info.backend == "nccl" and dump is not None:
        (run_dir / f"nccl_trace_rank_{info.rank}").write_bytes(dump())


def _loop(run: Run, run_dir: Path, watchdog: Watchdog, stop: StopRequest) -> dict[str, Any]:
    cfg, info = run.cfg, run.info
    dataset = build_dataset(cfg)
    batches = iter(build_loader(dataset, cfg, info.rank, info.world_size, run.start_step))
    global_batch = info.world_size * cfg.train.micro_batch * cfg.train.accum
    tokens_per_sample = cfg.data.seq_len if cfg.model.arch == "deepseek" else 0
    flops = flops_per_sample(cfg.model, cfg.data.seq_len)
    device_name = torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else "cpu"
    peak = peak_flops(device_name, run.precision.name)
    hooks = FaultHooks.from_env(info.rank)
    logger = MetricsLogger(run_dir, info.is_main, cfg.train.steps, cfg.train.tensorboard)
    if info.is_main:
        print(f"torchrig: data: {describe(dataset)}", flush=True)
    if info.is_main and run.start_step:
        print(f"torchrig: resuming from step {run.start_step} of {cfg.train.steps}", flush=True)
    if info.is_main and peak.flops is None:
        print(f"torchrig: mfu is null: {peak.note}", flush=True)
    step = run.start_step
    # Step time is averaged over each logging window, so the GPU is synchronised only when logging.
    window_start, window_steps = time.perf_counter(), 0
    while step < cfg.train.steps:
        if step + 1 == hooks.hang_step:
            while True:
                time.sleep(1)
        figures = _train_step(run, batches, watchdog, step + 1, stop)
        step += 1
        time.sleep(hooks.step_sleep)
        window_steps += 1
        if step == 1 or step % cfg.train.log_every == 0 or step == cfg.train.steps or figures["stop"]:
            if info.device.type == "cuda":
                torch.cuda.synchronize(info.device)
            step_s = (time.perf_counter() - window_start) / window_steps
            samples_per_sec = global_batch / step_s
            logger.log(
                {
                    "step": step,
                    # grad_norm and the MoE loads are device tensors, read only now: reading waits for the device
                    **{k: float(v) if isinstance(v, torch.Tensor) else v for k, v in figures.items() if k != "stop"},
                    "step_ms": step_s * 1000,
                    "samples_per_sec": samples_per_sec,
                    "tokens_per_sec": samples_per_sec * tokens_per_sample if tokens_per_sample else None,
                    "mfu": mfu(flops, samples_per_sec, info.world_size, peak.flops),
                    "peak_mem_gb": peak_memory_gb(info.device),
                }
            )
            window_start, window_steps = time.perf_counter(), 0
        if step % cfg.train.ckpt_every == 0 or step == cfg.train.steps or figures["stop"]:
            saving_started = time.perf_counter()
            watchdog.mark(step, "checkpoint")
            run.checkpointer.save(step, run.model, run.optimizer, _extra_state(run, step))
            window_start += time.perf_counter() - saving_started  # saving is not training throughput
        if figures["stop"]:
            if info.is_main:
                print(f"torchrig: stop requested; checkpoint saved at step {step}, exiting cleanly", flush=True)
            break
    summary = logger.summary(
        {
            "world_size": info.world_size,
            "global_batch": global_batch,
            "precision": run.precision.name,
            "strategy": cfg.train.strategy,
            "device": device_name,
            "flops_per_sample": flops,
            "peak_flops": peak.flops,
            "mfu_note": peak.note,
            "stopped_early": step < cfg.train.steps,
        }
    )
    logger.close()
    return summary


def _resume_config(cfg: RunConfig, info: DistInfo) -> dict[str, Any]:
    """The config a checkpoint records, and a resume is checked against (train/checkpoint.py check_compatible)."""
    return {**cfg.to_dict(), "world_size": info.world_size}


def _extra_state(run: Run, step: int) -> dict[str, Any]:
    # The step is also the data position (the sample stream is a pure function of it, train/data.py)
    # and fixes the learning rate (lr_at), so neither is stored beside it.
    return {
        "step": step,
        "scaler": run.scaler.state_dict(),
        "config": _resume_config(run.cfg, run.info),
    }
