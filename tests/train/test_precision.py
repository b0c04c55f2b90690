"""Mixed precision on the real training step: bf16 autocast, fp16 with a GradScaler that skips overflow."""

from __future__ import annotations

import math
import signal
import types

import pytest
import torch

from tests.helpers.trainrun import SMALL
from train.config_loader import load_config
from train.data import build_dataset, build_loader
from train.distributed import DistInfo
from train.run import setup
from train.trainer import train, train_step
from train.watchdog import Watchdog

CPU = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend="gloo")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_train_and_report_it(tmp_path, precision: str) -> None:
    cfg = load_config("tiny", [*SMALL, f"train.precision={precision}", "train.steps=3", "train.micro_batch=2"])
    summary = train(cfg, tmp_path / precision)
    assert summary["precision"] == precision and summary["steps"] == 3
    assert math.isfinite(summary["final_loss"]) and summary["final_loss"] < summary["first_loss"] + 1.0


def mine(signum, frame) -> None:
    raise AssertionError("not called")


@pytest.mark.parametrize(
    "handlers",
    [(mine, mine), (signal.SIG_DFL, signal.default_int_handler), (signal.SIG_IGN, signal.SIG_IGN)],
    ids=["the caller's own", "Python's defaults", "ignored"],
)
def test_training_in_process_gives_back_the_signal_handlers_it_took(tmp_path, handlers) -> None:
    # A handler left behind would only take note: Ctrl-C and SIGTERM would no longer stop the caller (a notebook),
    # and a process it forks afterwards would inherit that deafness.
    signals = (signal.SIGTERM, signal.SIGINT)
    before = {sig: signal.signal(sig, handler) for sig, handler in zip(signals, handlers, strict=True)}
    try:
        train(load_config("tiny", [*SMALL, "train.steps=1", "train.micro_batch=2"]), tmp_path / "run")
        assert tuple(signal.getsignal(sig) for sig in signals) == handlers
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_the_fp16_scaler_skips_a_step_whose_gradients_overflow_and_backs_off(tmp_path) -> None:
    cfg = load_config("tiny", [*SMALL, "train.precision=fp16", "train.micro_batch=2"])
    run = setup(cfg, tmp_path, CPU)
    batches = iter(build_loader(build_dataset(cfg), cfg, 0, 1, 0))
    watchdog = Watchdog(None, 0, 1, 60, 60, last_checkpoint=lambda: "")
    no_stop = types.SimpleNamespace(requested=False)

    before = {name: p.detach().clone() for name, p in run.model.named_parameters()}
    run.scaler.scale(torch.ones(()))  # the scaler makes its scale on first use
    run.scaler.update(new_scale=2.0**120)  # scaled fp16 gradients overflow to inf
    figures = train_step(run, batches, watchdog, 1, no_stop)
    assert math.isfinite(figures["loss"])  # the loss itself was fine: only the scaled gradients overflowed
    assert all(torch.equal(p, before[name]) for name, p in run.model.named_parameters()), "the step was taken"
    assert run.scaler.get_scale() == 2.0**119

    run.scaler.update(new_scale=2.0**10)
    train_step(run, batches, watchdog, 2, no_stop)
    assert any(not torch.equal(p, before[name]) for name, p in run.model.named_parameters()), "no step was taken"
