"""What the rig knows of a model family: its spec, its counts, and the protocols its model may offer.

A `ModelSpec` says everything the rest of train/ needs, so that nothing outside train/models/ switches
on a model's name: the config dataclass (the keys of the `model:` section), how to build and check it,
its parameter and FLOP counts from the config alone, the batch it takes, its FSDP2 shard units, a hook
run after every optimizer step (DeepSeek's MoE balancing), how to decode with it (`Decoder`), and how it
is a Hugging Face transformers model (`hf`, train/hf/mapping.py: exports, and checkpoints read as they are).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass
from typing import Protocol

import torch
from torch import nn

from train.config import ModelConfig
from train.errors import ConfigError
from train.hf.mapping import HFMapping
from train.models.activations import Activations, Setting

# What a model's batch holds: (inputs, targets) of token ids [batch, seq] and next tokens, or of
# images [batch, 3, H, W] and class labels. train/data/ says which sources give which.
INPUT_KINDS = ("tokens", "images")
# The model.* keys the data needs of each kind: a token model's vocabulary (model.vocab_size=auto takes
# it from the data), an image model's classes and input size.
INPUT_KEYS = {"tokens": ("vocab_size",), "images": ("num_classes", "image_size")}
# An in-place SUM over ranks (train/distributed.py all_reduce_sum), or None in a single process.
AllReduce = Callable[[torch.Tensor], None]


@dataclass(frozen=True)
class ParamCount:
    """total: every parameter (MTP modules included). embedding: the input token-embedding table.
    active: what one token's forward computes with (DeepSeek's "activated" figure): total minus the
    embedding lookup and the routed experts the token is not sent to. The output head counts.
    """

    total: int
    active: int
    embedding: int


class Cache(Protocol):
    """A decoder's state between forwards: the positions it holds so far."""

    position: int

    def rollback(self, position: int) -> None:
        """Forget the positions from `position` on (a rejected draft); the next write overwrites them."""

    def bytes_per_token(self) -> int:
        """Bytes one token's entries take, all layers together."""

    def describe(self) -> str:
        """One line: what the cache holds per token, against a cache of full keys and values."""


class CachePositions:
    """The position bookkeeping every family's cache shares: `capacity` positions, `position` written so far."""

    capacity: int
    position: int

    def advance(self, count: int) -> None:
        if self.position + count > self.capacity:
            raise ValueError(f"the cache holds {self.capacity} positions; {self.position} + {count} do not fit")
        self.position += count

    def rollback(self, position: int) -> None:
        if not 0 <= position <= self.position:
            raise ValueError(f"cannot roll back to position {position} from {self.position}")
        self.position = position


class Decoder(Protocol):
    """What sampling drives (train/sample.py): prefill and decode at a cache's position.

    forward_cached(inputs [batch, seq], cache) -> (logits [batch, seq, vocab], hidden [batch, seq, dim]),
    reading and advancing the cache by seq. A model whose can_draft is True is also a Drafter.
    """

    max_seq_len: int
    can_draft: bool

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        """inputs [batch, seq] -> logits [batch, seq, vocab], without a cache."""

    def new_cache(self, batch: int = 1, dtype: torch.dtype | None = None) -> Cache: ...

    def forward_cached(self, inputs: torch.Tensor, cache: Cache) -> tuple[torch.Tensor, torch.Tensor]: ...


class Drafter(Decoder, Protocol):
    """A decoder that drafts the token after next for speculative decoding (DeepSeek's MTP module):
    draft_cached(hidden, next_tokens, draft_cache) -> logits of the token after each next token."""

    def new_draft_cache(self, batch: int = 1, dtype: torch.dtype | None = None) -> Cache: ...

    def draft_cached(self, hidden: torch.Tensor, next_tokens: torch.Tensor, cache: Cache) -> torch.Tensor: ...


def _no_checks(cfg: ModelConfig) -> None:
    """For a model whose sizes cannot be wrong in a way the builder would not say clearly."""


@dataclass(frozen=True)
class ModelSpec:
    """One model family. The model built must take `forward(inputs, targets) -> scalar loss`, and
    `forward(inputs) -> logits` (or class scores) for evaluation. A token model trained on masked data
    (chat) also takes `forward(inputs, targets, divisors)`: targets of IGNORE_INDEX are not counted, and
    each of its loss_terms is its sum over its divisor (train/models/loss.py)."""

    name: str  # the model.arch value that selects it
    # The `model:` section: a dataclass subclassing train.config.ModelConfig, defaults for every key.
    config: type[ModelConfig]
    # The model, its weights drawn from the global torch RNG (the trainer seeds it first), on the CPU.
    build: Callable[[ModelConfig], nn.Module]
    # Parameter counts from the config alone, without building.
    count_params: Callable[[ModelConfig], ParamCount]
    # Training FLOPs (forward + backward) of one sample, given data.seq_len: for MFU.
    flops_per_sample: Callable[[ModelConfig, int], float]
    inputs: str  # one of INPUT_KINDS
    # The submodules FSDP2 shards one by one before the root (train/distributed.py wrap_model).
    shard_units: Callable[[nn.Module], list[nn.Module]]
    # Checks of the model section, each a ConfigError with the fix (run before every build).
    validate: Callable[[ModelConfig], None] = _no_checks
    # The ModelConfig field that bounds data.seq_len (a token model's position table), if any.
    seq_len_limit: str | None = None
    # cuDNN autotuning pays for convolutions at fixed shapes; it only costs time elsewhere.
    cudnn_benchmark: bool = False
    # Run on every rank after every optimizer step, with the all-reduce (None alone); returns figures to log,
    # as 0-dim tensors read only when a step is logged (DeepSeek: the MoE balancing bias update).
    after_step: Callable[[nn.Module, AllReduce | None], dict[str, torch.Tensor]] | None = None
    # The terms of a token model's loss, each predicting targets[:, k:] for k = 0, 1, ...: the next token, and
    # further ones (DeepSeek's MTP depths); the trainer counts each term's targets for masked data.
    loss_terms: Callable[[ModelConfig], int] = lambda cfg: 1
    # The model (unwrapped, in eval mode) as a Decoder, for make sample; None: the family does not decode.
    decoder: Callable[[nn.Module], Decoder] | None = None
    # Its transformers twin (model types, config.json and state dict both ways); None: make export writes
    # torchrig's own format, and no Hugging Face directory builds it.
    hf: HFMapping | None = None
    # The part of each block that train.activation_checkpointing=selective recomputes
    # (train/activation_checkpointing.py); None: selective recomputes the whole shard units, as full does.
    selective_units: Callable[[nn.Module], list[nn.Module]] | None = None
    # Bytes one sample keeps for the backward, unit by unit, from the config alone: (cfg, seq_len, setting) ->
    # Activations (train/models/activations.py); make plan's activations. None: the plan cannot size them.
    saved_for_backward: Callable[[ModelConfig, int, Setting], Activations] | None = None
    # The modules LoRA adapts unless told otherwise (PEFT's target_modules: a module named so, or ending in "." +
    # one): the attention projections. make plan's LoRA lever plans them.
    lora_targets: tuple[str, ...] = ()
    # The nn.Modules build() makes, from the config alone: building each costs memory and time, so a config of
    # millions of tiny experts is refused before any is built (train/memory_bound.py). None: a few, not counted.
    count_modules: Callable[[ModelConfig], int] | None = None
    # Named parts of the loss the model reports when called forward(inputs, targets, parts=True), which then
    # returns (loss, {name: 0-dim tensor}); the trainer logs each beside the loss (DeepSeek: the next-token
    # loss without the MTP term, the figure comparable with val_loss). Empty: forward takes no `parts`.
    loss_parts: tuple[str, ...] = ()
    # Numbers one sample (seq_len tokens, or one image) holds at once, from the config alone: (cfg, seq_len,
    # training: kept for the backward) -> count. A lower bound (train/memory_bound.py). None: not estimated.
    activations: Callable[[ModelConfig, int, bool], float] | None = None
    # Stops the training-time updates of base state that are not parameters (DeepSeek: the MoE balancing biases),
    # so that a LoRA run (train/lora.py) leaves its base as it found it; None: the family has none.
    freeze_state: Callable[[nn.Module], None] | None = None

    def __post_init__(self) -> None:
        where = f"model spec {self.name!r}"
        if not (isinstance(self.config, type) and issubclass(self.config, ModelConfig) and is_dataclass(self.config)):
            raise ConfigError(
                f"{where}: config={self.config!r} is not a dataclass subclassing train.config.ModelConfig"
            )
        if self.inputs not in INPUT_KINDS:
            kinds = " or ".join(INPUT_KINDS)
            raise ConfigError(f"{where}: inputs={self.inputs!r} is not {kinds}")
        keys = {f.name for f in fields(self.config)}
        needed = [key for key in (*INPUT_KEYS[self.inputs], self.seq_len_limit) if key and key not in keys]
        if needed:
            raise ConfigError(f"{where}: its config {self.config.__name__} has no field {needed[0]!r}")

    def new_config(self) -> ModelConfig:
        """This model's `model:` section at its defaults."""
        return self.config(arch=self.name)


def mfu(flops_per_sample: float, samples_per_sec: float, n_devices: int, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the devices' combined peak; None when the peak is unknown."""
    if peak is None or peak <= 0 or n_devices < 1:
        return None
    return flops_per_sample * samples_per_sec / (n_devices * peak)
