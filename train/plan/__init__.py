"""The memory plan of a training run (`make plan`, and `make train`'s check on a GPU).

train/plan/memory.py figures what one GPU needs by kind, train/plan/levers.py what would make a run fit, and
train/plan/__main__.py is `make plan`. Everything here is a pure function of the config and the box.
"""

from __future__ import annotations

import torch

from train import lora
from train.config import RunConfig
from train.errors import ConfigError
from train.models import get_spec
from train.plan.levers import Lever, levers
from train.plan.memory import FULL_FINE_TUNE, GIB, Box, MemoryPlan, Model, Training, frozen_base_bytes, plan_memory

__all__ = ["Box", "MemoryPlan", "Training", "check_fits", "plan_memory", "plan_run"]


def training_of(cfg: RunConfig) -> Training:
    """What the run trains: every parameter, or with train.lora.rank > 0 its adapters (the targets as the layers
    they adapt: train/lora.py layer_targets) on a frozen base stored as the run stores it (lora.base_dtype)."""
    if not cfg.train.lora.rank:
        return FULL_FINE_TUNE
    with torch.device("meta"):
        model = get_spec(cfg.model.arch).build(cfg.model)
    targets = tuple(lora.layer_targets(model, lora.targets_of(cfg)[0]))
    return Training(targets, cfg.train.lora.rank, frozen_base_bytes(cfg))


def plan_run(cfg: RunConfig, box: Box) -> tuple[MemoryPlan, list[Lever]]:
    """The run's plan on the box, and its levers (each a plan too)."""
    training = training_of(cfg)
    model = Model.build(cfg, training)
    now = plan_memory(cfg, box, training, model)
    return now, levers(cfg, box, training, now, model)


def gib(size: float) -> str:
    return f"{size / GIB:,.2f}"


def verdict(plan: MemoryPlan) -> str:
    """One line: fits or not, by how much, and the largest micro-batch that fits."""
    size = plan.max_micro_batch
    largest = f"the largest MICRO_BATCH that fits is {size}" if size else "not even MICRO_BATCH=1 fits"
    if plan.fits:
        return f"fits: {gib(plan.total)} of {gib(plan.vram)} GiB per GPU, {gib(plan.headroom)} GiB spare; {largest}"
    return f"does not fit: {gib(plan.total)} GiB per GPU, {gib(-plan.headroom)} GiB over {gib(plan.vram)}; {largest}"


def advice(found: list[Lever]) -> str:
    """The levers that make it fit, in a few words each (the refusal line of make train)."""
    fitting = [f"{lever.change} ({gib(lever.plan.total)} GiB)" for lever in found if lever.plan.fits]
    if not fitting:
        return "no lever fits alone or together"
    return "fits with " + " or ".join(fitting[:3])


def check_fits(cfg: RunConfig, box: Box) -> None:
    """make train's check on a GPU: a ConfigError, in one line with the plan's advice, for a run that cannot fit
    (the levers are planned only then). A family that does not say what its forward keeps is not planned."""
    if get_spec(cfg.model.arch).saved_for_backward is None:
        return
    training = training_of(cfg)
    model = Model.build(cfg, training)
    plan = plan_memory(cfg, box, training, model)
    if not plan.fits:
        found = levers(cfg, box, training, plan, model)
        raise ConfigError(
            f"make plan says this run {verdict(plan)}; {advice(found)}; `make plan` with this CONFIG and ARGS and "
            f"GPUS={box.gpus} VRAM={box.vram / GIB:.1f} shows each kind and lever"
        )
