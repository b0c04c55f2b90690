"""The training step, the loop and the rates: AMP + DDP/FSDP2, accumulation, checkpoints, metrics.

`train(cfg, run_dir)` runs inside every worker that torchrun started. The step itself
(`train_step`) fits on one screen; the run it drives is assembled by train/run.py, and everything
around it is wiring of the modules that own each concern: data, distributed, checkpoint, sinks,
validation, watchdog.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from env.machine.peaks import PeakLookup, peak_flops
from env.records.manifest import MANIFEST_ENV, MANIFEST_NAME, build_manifest, record_launch
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
)
from train.eval import Evaluator
from train.metrics import MetricsLogger, StepClock, peak_memory_gb
from train.models import flops_per_sample, get_spec
from train.models.loss import counted_targets
from train.models.spec import mfu
from train.run import Run, lr_at, setup
from train.rundir import RunDirWriteError
from train.watchdog import Watchdog


class TrainingStopped(RuntimeError):
    """The run cannot go on (a non-finite loss); the message is one line with the fix."""


class StopRequest:
    """SIGTERM/SIGINT ask for a checkpoint at the next step boundary, then a clean exit.

    `requested` is this rank's signal; `agreed` is set by each step's all-reduce: some rank asked.
    `restore()` puts back what it replaced, Python's defaults and SIG_IGN included: a caller that trains in-process
    (a test, a notebook) gets its Ctrl-C and SIGTERM back. train() calls it after the process group is shut down,
    so a signal landing during that teardown is still only noted.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested = False
        self.agreed = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            if previous is not None:  # None: a handler not installed from Python, which cannot be put back
                signal.signal(sig, previous)


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

    def wrap(self, train_step: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
        """train_step itself when no fault is set (every normal run), else it with the faults around it."""
        if self.hang_step is None and not self.step_sleep:
            return train_step

        def with_faults(run: Run, batches: Iterator, watchdog: Watchdog, step: int, stop: StopRequest):
            while step == self.hang_step:
                time.sleep(1)
            figures = train_step(run, batches, watchdog, step, stop)
            time.sleep(self.step_sleep)
            return figures

        return with_faults


def train_step(
    run: Run, batches: Iterator, watchdog: Watchdog, step: int, stop: StopRequest, masked: bool = False
) -> dict[str, Any]:
    """One optimizer step over `accum` micro-batches; returns the globally reduced figures.

    The step waits for the device once, for the loss and the stop votes. grad_norm and the MoE loads
    stay tensors: reading them would wait for the optimizer step too, so they are read only when logged.
    masked: the data marks targets the loss ignores (chat); the loss is then the mean over the counted
    targets of the whole global batch (counted_in_step).
    """
    cfg, model, device = run.cfg, run.model, run.info.device
    accum = cfg.train.accum
    # The schedule is a pure function of the step (as in nanoGPT): nothing to save, and a changed
    # train.lr takes effect on resume.
    lr = lr_at(step - 1, cfg)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    part_names = get_spec(cfg.model.arch).loss_parts  # e.g. the next-token loss inside DeepSeek's MTP objective
    micro_batches = [next(batches) for _ in range(accum)]
    counted = counted_in_step(run, [targets for _, targets in micro_batches]) if masked else None
    # DDP and FSDP average gradients over ranks: each rank's share of the divisor makes the step's gradient
    # that of the mean over all counted targets, as one process with the whole global batch takes it; a
    # micro-batch's loss is then already its share of the step's (no division by accum).
    divisors = () if counted is None else (counted.clamp(min=1) / run.info.world_size,)
    share = accum if counted is None else 1
    # [loss, each named part] summed over the micro-batches
    sums = torch.zeros(1 + len(part_names), device=device)
    for micro, (inputs, targets) in enumerate(micro_batches):
        inputs = inputs.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        watchdog.mark(step, "start")
        with gradient_sync(model, enabled=micro == accum - 1):
            with run.precision.autocast(device):  # the forward only: backward follows its dtypes
                if part_names:
                    loss, parts = model(inputs, targets, *divisors, parts=True)
                else:
                    loss, parts = model(inputs, targets, *divisors), {}
                loss = loss / share
            watchdog.mark(step, "backward")
            run.scaler.scale(loss).backward()
        sums += torch.stack([loss.detach().float(), *(parts[name].float() / share for name in part_names)])
    # One small all-reduce per step: the global mean loss and its parts, and the stop request of any rank.
    watchdog.mark(step, "sync")
    # torch.full, not torch.tensor: no copy from the host, which would wait for the backward to finish.
    stats = torch.cat([sums, torch.full((1,), float(stop.requested), device=device)])
    all_reduce_sum(stats)
    means = (stats / run.stats_divisor).tolist()
    loss_mean, stop_votes = means[0], means[-1]
    stop.agreed = stop_votes > 0
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
    after_step = get_spec(cfg.model.arch).after_step  # e.g. DeepSeek's MoE balancing bias update
    extra = after_step(model, all_reduce_sum) if after_step is not None else {}
    named = dict(zip(part_names, means[1:-1], strict=True))
    if counted is not None:
        extra["counted_tokens"] = counted[0]  # the targets the step's loss is over, all ranks
    return {"loss": loss_mean, **named, "lr": lr, "grad_norm": grad_norm} | extra


def counted_in_step(run: Run, targets: list[torch.Tensor]) -> torch.Tensor:
    """Each loss term's counted targets (train/models/loss.py) in this step's micro-batches on all ranks,
    float32 [terms]: one small all-reduce before the first forward. A term with none divides by 1 (its loss
    and gradients are then 0)."""
    terms = get_spec(run.cfg.model.arch).loss_terms(run.cfg.model)
    counts = torch.stack([counted_targets(t, terms) for t in targets]).sum(dim=0).to(run.info.device)
    all_reduce_sum(counts)
    return counts.float()


def last_checkpoint_note(checkpointer: Checkpointer) -> str:
    step = checkpointer.latest_step()
    if step is None and checkpointer.saved:  # this run saved some, and they are gone (RUN_DIR/checkpoints removed?)
        last = checkpointer.saved[-1]
        return f"no checkpoint is left in {checkpointer.directory}: the last saved, step {last}, is gone"
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
        if info.is_main:  # the resume check passed: this launch trains, and is on record
            _record_launch(cfg, run_dir)
        return _loop(run, run_dir, watchdog, stop)
    finally:
        watchdog.stop()
        shutdown()
        stop.restore()


def _dump_flight_recorder(run_dir: Path, info: DistInfo) -> None:
    """Where torch provides it (NCCL), write the collective flight recorder into RUN_DIR."""
    dump = getattr(torch._C._distributed_c10d, "_dump_nccl_trace", None)
    if info.backend == "nccl" and dump is not None:
        (run_dir / f"nccl_trace_rank_{info.rank}").write_bytes(dump())


def _loop(run: Run, run_dir: Path, watchdog: Watchdog, stop: StopRequest) -> dict[str, Any]:
    cfg = run.cfg
    batches, rates, logger, take_step, evaluator = _start_loop(run, run_dir)
    clock = StepClock(run.info.device)
    step = run.start_step
    while step < cfg.train.steps:
        figures = take_step(run, batches, watchdog, step + 1, stop)
        step += 1
        clock.tick()
        with clock.paused():  # evaluating is not training throughput
            figures |= evaluator.after_step(step, stop.agreed)  # val_loss etc. on eval steps
        last = step == cfg.train.steps or stop.agreed
        if step == 1 or step % cfg.train.log_every == 0 or last or "val_loss" in figures:
            logger.log(rates.record(step, figures, clock.lap()))
        if step % cfg.train.ckpt_every == 0 or last:
            with clock.paused():  # saving is not training throughput
                watchdog.mark(step, "checkpoint")
                run.checkpointer.save(step)
        if stop.agreed:
            if run.info.is_main:
                print(f"torchrig: stop requested; checkpoint saved at step {step}, exiting cleanly", flush=True)
            break
    summary = logger.summary(rates.summary_fields() | {"stopped_early": step < cfg.train.steps})
    logger.close()
    return summary


@dataclass(frozen=True)
class Rates:
    """Turns a step's figures and its mean time into a metrics row: throughput, tokens, MFU, memory."""

    info: DistInfo
    global_batch: int
    tokens_per_sample: int
    flops: float
    peak: PeakLookup
    device_name: str
    precision: str
    strategy: str
    parameters: tuple[int, int]  # (trainable, total)

    def record(self, step: int, figures: dict[str, Any], step_s: float) -> dict[str, Any]:
        samples_per_sec = self.global_batch / step_s
        return {
            "step": step,
            # grad_norm and the MoE loads are device tensors, read only now: reading waits for the device
            **{k: float(v) if isinstance(v, torch.Tensor) else v for k, v in figures.items()},
            "tokens": step * self.global_batch * self.tokens_per_sample or None,  # seen so far
            "step_ms": step_s * 1000,
            "samples_per_sec": samples_per_sec,
            "tokens_per_sec": samples_per_sec * self.tokens_per_sample if self.tokens_per_sample else None,
            "mfu": mfu(self.flops, samples_per_sec, self.info.world_size, self.peak.flops),
            "peak_mem_gb": peak_memory_gb(self.info.device),
        }

    def summary_fields(self) -> dict[str, Any]:
        return {
            "world_size": self.info.world_size,
            "global_batch": self.global_batch,
            "precision": self.precision,
            "strategy": self.strategy,
            "device": self.device_name,
            "flops_per_sample": self.flops,
            "peak_flops": self.peak.flops,
            "mfu_note": self.peak.note,
            "trainable_parameters": self.parameters[0],
            "parameters": self.parameters[1],
        }


def _start_loop(
    run: Run, run_dir: Path
) -> tuple[Iterator, Rates, MetricsLogger, Callable[..., dict[str, Any]], Evaluator]:
    """What the loop needs besides the Run: the batches from the start step, the figures, the logger, the step,
    and the validation (train/eval.py), which checks its split before step 1."""
    cfg, info = run.cfg, run.info
    dataset = build_dataset(cfg)
    batches = iter(build_loader(dataset, cfg, info.rank, info.world_size, run.start_step))
    device_name = torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else "cpu"
    rates = Rates(
        info,
        global_batch=info.world_size * cfg.train.micro_batch * cfg.train.accum,
        tokens_per_sample=cfg.data.seq_len if get_spec(cfg.model.arch).inputs == "tokens" else 0,
        flops=flops_per_sample(cfg.model, cfg.data.seq_len),
        peak=peak_flops(device_name, run.precision.name),
        device_name=device_name,
        precision=run.precision.name,
        strategy=cfg.train.strategy,
        parameters=run.parameters,
    )
    logger = MetricsLogger(
        run_dir, info.is_main, cfg.train.steps, cfg.train.sinks, cfg.to_dict(), start_step=run.start_step
    )
    evaluator = Evaluator(run, run_dir, dataset)
    if info.is_main:
        print(f"torchrig: data: {describe(dataset)}", flush=True)
        print(f"torchrig: parameters: {_parameters_line(run)}", flush=True)
    if info.is_main and run.start_step:
        print(f"torchrig: resuming from step {run.start_step} of {cfg.train.steps}", flush=True)
    if info.is_main and rates.peak.flops is None:
        print(f"torchrig: mfu is null: {rates.peak.note}", flush=True)
    masked = bool(getattr(dataset, "masked", False))
    if info.is_main and masked:
        print(f"torchrig: loss: over the tokens {cfg.data.path}'s mask counts (the assistant's turns)", flush=True)
    step = functools.partial(train_step, masked=True) if masked else train_step
    return batches, rates, logger, FaultHooks.from_env(info.rank).wrap(step), evaluator


def _parameters_line(run: Run) -> str:
    trainable, total = run.parameters
    lora = run.cfg.train.lora
    what = f"LoRA rank {lora.rank} adapters, the base frozen" if lora.rank else "every parameter trains"
    return f"{trainable:,} trainable of {total:,} ({100 * trainable / max(1, total):.2f}%; {what})"


def _record_launch(cfg: RunConfig, run_dir: Path) -> None:
    """Add this launch to manifest.json: the launcher's record of it, or one made here (a bare torchrun)."""
    given = os.environ.get(MANIFEST_ENV)
    manifest = json.loads(given) if given else build_manifest(run_dir, kind="train", config=cfg.to_dict())
    try:
        record_launch(run_dir, manifest)
    except OSError as exc:
        raise RunDirWriteError(run_dir / MANIFEST_NAME, exc) from exc
