"""What would make a run fit: each lever is the same plan with one thing changed, and its computed effect.

The levers, a table walked in order (each applies only where it changes something):

- LoRA: rank LORA_RANK adapters on the family's default targets (the attention projections), the base frozen;
- FSDP: STRATEGY=fsdp (parameters, gradients and optimizer states sharded over the GPUs);
- checkpointing: train.activation_checkpointing=selective, then full;
- bf16: PRECISION=bf16 instead of fp32;
- micro-batch: the largest MICRO_BATCH that fits (raise ACCUM to keep the global batch);
- shorter sequences: the longest data.seq_len (halving) that fits;
- more GPUs: the fewest GPUS that fit, sharded with FSDP2;
- all of LoRA, FSDP and full checkpointing together, when no single lever fits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from train.config import RunConfig
from train.models import get_spec
from train.plan.memory import (
    PRECISION_BYTES,
    Box,
    MemoryPlan,
    Model,
    Training,
    plan_memory,
    resolve_precision,
    with_changes,
)

LORA_RANK = 16
# Far more GPUs than one data-parallel run of this rig uses: the search for "more GPUs" stops here.
MAX_GPUS = 64


@dataclass(frozen=True)
class Lever:
    """One change (in words, and as make variables or config keys) and the plan it gives."""

    name: str
    change: str
    plan: MemoryPlan


@dataclass(frozen=True)
class _Planner:
    """Plans of one config's variants, sharing the meta models already built."""

    cfg: RunConfig
    box: Box
    training: Training
    models: dict[Training, Model]

    def plan(
        self, cfg: RunConfig | None = None, box: Box | None = None, training: Training | None = None
    ) -> MemoryPlan:
        training = training or self.training
        if training not in self.models:
            self.models[training] = Model.build(self.cfg, training)
        return plan_memory(cfg or self.cfg, box or self.box, training, self.models[training])


def lora(cfg: RunConfig) -> Training:
    """The LoRA lever's training: rank LORA_RANK on the family's default targets, the frozen base stored in the
    run's autocast dtype (issue 18's frozen bf16 base; float32 in an fp32 run)."""
    return Training(
        get_spec(cfg.model.arch).lora_targets, LORA_RANK, PRECISION_BYTES[resolve_precision(cfg.train.precision)]
    )


def _lora(p: _Planner, now: MemoryPlan) -> list[Lever]:
    targets = get_spec(p.cfg.model.arch).lora_targets
    if p.training.frozen_base or not targets:
        return []
    training = lora(p.cfg)
    name = f"LoRA rank {LORA_RANK} on {', '.join(targets)}, the base frozen ({8 * training.base_bytes}-bit)"
    return [Lever(name, f"train.lora.rank={LORA_RANK}", p.plan(training=training))]


def _fsdp(p: _Planner, now: MemoryPlan) -> list[Lever]:
    if p.cfg.train.strategy == "fsdp" or p.box.gpus == 1:
        return []
    return [
        Lever(
            "FSDP2: shard weights, gradients and AdamW", "STRATEGY=fsdp", p.plan(with_changes(p.cfg, strategy="fsdp"))
        )
    ]


def _checkpointing(p: _Planner, now: MemoryPlan) -> list[Lever]:
    modes = {"none": ("selective", "full"), "selective": ("full",), "full": ()}[p.cfg.train.activation_checkpointing]
    return [
        Lever(
            f"activation checkpointing: {mode}",
            f"train.activation_checkpointing={mode}",
            p.plan(with_changes(p.cfg, activation_checkpointing=mode)),
        )
        for mode in modes
    ]


def _bf16(p: _Planner, now: MemoryPlan) -> list[Lever]:
    if resolve_precision(p.cfg.train.precision) != "fp32":
        return []
    return [Lever("bf16 autocast instead of fp32", "PRECISION=bf16", p.plan(with_changes(p.cfg, precision="bf16")))]


def _micro_batch(p: _Planner, now: MemoryPlan) -> list[Lever]:
    size = now.max_micro_batch
    if now.fits or size < 1:
        return []
    accum = -(-p.cfg.train.micro_batch * p.cfg.train.accum // size)
    change = f"MICRO_BATCH={size} ACCUM={accum}"
    return [Lever(f"micro-batch {size} (accumulate {accum})", change, p.plan(with_changes(p.cfg, micro_batch=size)))]


def _shorter(p: _Planner, now: MemoryPlan) -> list[Lever]:
    seq_len = p.cfg.data.seq_len // 2
    while seq_len >= 1 and not now.fits:
        shorter = p.plan(replace(p.cfg, data=replace(p.cfg.data, seq_len=seq_len)))
        if shorter.fits:
            return [Lever(f"sequences of {seq_len} tokens", f"data.seq_len={seq_len}", shorter)]
        seq_len //= 2
    return []


def _more_gpus(p: _Planner, now: MemoryPlan) -> list[Lever]:
    if now.fits:
        return []
    sharded = with_changes(p.cfg, strategy="fsdp")
    for gpus in range(p.box.gpus + 1, MAX_GPUS + 1):
        more = p.plan(sharded, replace(p.box, gpus=gpus))
        if more.fits:
            return [Lever(f"{gpus} GPUs with FSDP2", f"GPUS={gpus} STRATEGY=fsdp", more)]
    return []


def _together(p: _Planner, now: MemoryPlan, found: list[Lever]) -> list[Lever]:
    if now.fits or any(lever.plan.fits for lever in found) or p.training.frozen_base:
        return []
    strategy = "fsdp" if p.box.gpus > 1 else p.cfg.train.strategy
    cfg = with_changes(p.cfg, strategy=strategy, activation_checkpointing="full")
    change = f"train.lora.rank={LORA_RANK} train.activation_checkpointing=full" + (
        " STRATEGY=fsdp" if strategy == "fsdp" else ""
    )
    return [Lever("LoRA, FSDP2 and full checkpointing together", change, p.plan(cfg, training=lora(p.cfg)))]


LEVERS: tuple[Callable[[_Planner, MemoryPlan], list[Lever]], ...] = (
    _lora,
    _fsdp,
    _checkpointing,
    _bf16,
    _micro_batch,
    _shorter,
    _more_gpus,
)


def levers(cfg: RunConfig, box: Box, training: Training, now: MemoryPlan, model: Model) -> list[Lever]:
    """Every lever that changes the plan of cfg on box, in LEVERS' order, then all of them together if none fits."""
    planner = _Planner(cfg, box, training, {training: model})
    found = [lever for make in LEVERS for lever in make(planner, now)]
    return found + _together(planner, now, found)
