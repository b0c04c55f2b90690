"""Activation checkpointing: keep less for the backward and recompute the rest (train.activation_checkpointing).

A checkpointed module keeps only its inputs during the forward; the backward runs its forward again to get
what it would have saved. `apply` wraps, per mode, the modules the model's spec names (train/models/spec.py):

- none: nothing;
- full: every shard unit (the blocks FSDP2 shards one by one), so a block keeps only its input;
- selective: the spec's `selective_units`, one part of each block (DeepSeek and Llama: the feed-forward, MoE or
  dense, which keeps the most bytes per FLOP of recompute: `python -m train.benchmarks.plan` measures both).

Each wrapped module's `forward` becomes torch.utils.checkpoint's non-reentrant checkpoint of the original, set
on the instance: its class, parameter names and state_dict stay as they were, FSDP2's `fully_shard` hooks (on
the module, around `forward`) gather the weights before the forward and again before the recompute, DDP sees a
plain module, and torch.compile traces the checkpoint as its own operator.

The recompute must not change state the forward already changed: DeepSeek's MoE counts the tokens each
expert got (a buffer the balancing reads after the step), and a second count would double it. In eager mode
the recompute runs in a context that restores the module's buffers afterwards; under torch.compile the traced
backward never replays a buffer update (tests/test_activation_checkpointing.py checks both).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from train.models.spec import ModelSpec

MODES = ("none", "full", "selective")


def checkpointed_units(model: nn.Module, spec: ModelSpec, mode: str) -> list[nn.Module]:
    """The modules `mode` recomputes: none, the shard units (full), or the spec's selective units."""
    choose: dict[str, Callable[[nn.Module], list[nn.Module]]] = {
        "none": lambda _: [],
        "full": spec.shard_units,
        "selective": spec.selective_units or spec.shard_units,
    }
    return choose[mode](model)


def apply(model: nn.Module, spec: ModelSpec, mode: str) -> nn.Module:
    """Checkpoint the units of `mode` in place (before DDP/FSDP2 wrap the model and before torch.compile)."""
    for unit in checkpointed_units(model, spec, mode):
        checkpoint_module(unit)
    return model


def checkpoint_module(module: nn.Module) -> None:
    """Make `module` keep only its inputs and recompute its forward in the backward."""
    forward = module.forward

    def recomputed_in_backward(*args: Any, **kwargs: Any) -> Any:
        runs: list[bool] = []

        def run(*args: Any, **kwargs: Any) -> Any:
            # The first run is the forward; a later one is the backward's recompute, which must leave the
            # module's buffers (DeepSeek's expert counts) as the forward left them.
            restore = _buffers_restored(module) if runs else contextlib.nullcontext()
            runs.append(True)
            with restore:
                return forward(*args, **kwargs)

        return checkpoint(run, *args, use_reentrant=False, **kwargs)

    module.forward = recomputed_in_backward


@contextlib.contextmanager
def _buffers_restored(module: nn.Module) -> Iterator[None]:
    kept = [(buffer, buffer.clone()) for buffer in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in kept:
                buffer.copy_(value)
