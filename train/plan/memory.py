"""The memory one GPU needs to train a config, by kind, for a box of `gpus` GPUs of `vram` bytes each.

`plan_memory(cfg, box, training)` is a pure function: it builds the model on the meta device (no memory, no
weights) and reads every parameter's shape and dtype there, so the weights, gradients and optimizer states
are exact; the activations come from the model family's own account of what its forward keeps
(ModelSpec.saved_for_backward, train/models/activations.py), which train/benchmarks/plan.py measures against a real
forward. The figures, per GPU, as train/run.py and train/distributed.py set a run up:

- weights: the parameters as stored (float32), whole under DDP, a 1/gpus shard of every tensor under FSDP2
  (dim 0 padded to a multiple of gpus, as fully_shard pads it), and every buffer whole;
- gradients: float32, of the parameters that train, laid out as the weights (DDP's buckets are the
  gradients themselves: gradient_as_bucket_view);
- optimizer: AdamW's two float32 moments of every trainable parameter (and, fused on CUDA, a float32 step);
- weight copies: under DDP with bf16/fp16 autocast, the low-precision copy of every matrix a matmul reads,
  which autocast keeps until the forward ends and the backward keeps after it;
- all-gather and reduce-scatter: under FSDP2, the root's parameters (embedding, final norm, head, never
  resharded between forward and backward) and two shard units' (one computing, one prefetched) unsharded in
  the parameter dtype, and, in the backward, one unit's unsharded gradients with their float32
  reduce-scatter input and the root's unsharded gradients;
- activations: what micro_batch samples keep from the forward to the backward under the run's
  train.activation_checkpointing (and the figures of every mode, to compare);
- transient: the most the backward holds on top at one time: the loss's float32 gradient of the logits and
  its log-softmax gradient (two [tokens, vocab] tensors), or one unit's activations while it is recomputed;
- allowance: the CUDA context and, with more than one GPU, NCCL's buffers: measured figures of others
  (CUDA_CONTEXT_BYTES, NCCL_BYTES), which env/gpu_check.sh measures on the GPU it runs on.

Not counted: the caching allocator's fragmentation (reserved beyond allocated), the backward's gradient of
one operation at a time beyond the two above, and an optimizer step's temporaries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from train import lora
from train.config import LoRAConfig, RunConfig
from train.errors import ConfigError
from train.models import get_spec
from train.models.activations import MODES, Setting

GIB = 2**30
MIB = 2**20
# torch's CUDA context with lazy module loading (the default since CUDA 11.7 and torch 1.13): 287,047,680 bytes,
# measured in pytorch/pytorch#86509 (against 666,632,192 loaded eagerly).
CUDA_CONTEXT_BYTES = 287_047_680
# NCCL's buffers of one communicator after a 4 MB all-reduce, measured in NVIDIA/nccl#964 (4x A100, NVLink):
# 544 MB for a group of 2 GPUs, 688 MB for more. PCIe boxes use fewer channels, so less: this is a ceiling.
NCCL_BYTES = {2: 544 * MIB, 3: 688 * MIB}
FP32 = 4
# A float32 step count per parameter tensor: fused AdamW keeps it on the device.
ADAMW_STEP_BYTES = 4
PRECISION_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass(frozen=True)
class Box:
    """The machine planned for: GPUs per run (all data parallel) and each one's memory in bytes."""

    gpus: int
    vram: int

    def __post_init__(self) -> None:
        if self.gpus < 1 or self.vram <= 0:
            raise ConfigError(f"a box needs at least one GPU and some memory (gpus={self.gpus}, vram={self.vram})")


@dataclass(frozen=True)
class Training:
    """What trains: every parameter (a full fine-tune, the default), or LoRA adapters on a frozen base.

    adapters: LoRA's target modules (PEFT's target_modules list: a module whose name is a target or ends in
    "." + target), each of them given train/lora.py's adapter (rank x in (A) and out x rank (B) float32 trainable
    parameters, per expert for the stacked experts), while every parameter of the model is frozen and stored in
    `base_bytes` per number (a frozen bf16 base, 2; 0 keeps float32, as train/lora.py does today).
    """

    adapters: tuple[str, ...] = ()
    rank: int = 0
    base_bytes: int = 0

    @property
    def frozen_base(self) -> bool:
        return bool(self.adapters)

    def prepare(self, model: nn.Module) -> None:
        """Freeze the base (in its stored dtype) and add the adapters' parameters to a meta-device model."""
        if not self.adapters:
            return
        for parameter in model.parameters():
            parameter.requires_grad_(False)
            if self.base_bytes:
                parameter.data = parameter.data.to(_dtype(self.base_bytes))
        found = lora.adapted_modules(model, list(self.adapters), self.rank, each=False)
        lora.add_adapters(model, found, LoRAConfig(rank=self.rank))

    def describe(self) -> str:
        if not self.adapters:
            return "every parameter trains"
        stored = f"{8 * self.base_bytes}-bit" if self.base_bytes else "float32"
        return f"LoRA rank {self.rank} on {', '.join(self.adapters)}; the base frozen, stored {stored}"


FULL_FINE_TUNE = Training()


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per GPU by kind, for one run on one box; `total` against the box's `vram`."""

    config: str
    gpus: int
    vram: int
    strategy: str
    precision: str
    micro_batch: int
    seq_len: int
    activation_checkpointing: str
    training: str
    parameters: int  # all of the model's parameters (adapters included)
    trainable: int  # those that get gradients
    weights: int
    gradients: int
    optimizer: int
    weight_copies: int
    gather_buffers: int
    activations: int
    activations_by_mode: dict[str, int]
    transient: int
    allowance: int
    per_sample: int = field(repr=False)  # what one more sample of micro-batch adds (activations and transient)

    @property
    def total(self) -> int:
        kinds = (self.weights, self.gradients, self.optimizer, self.weight_copies, self.gather_buffers)
        return sum(kinds) + self.activations + self.transient + self.allowance

    @property
    def fits(self) -> bool:
        return self.total <= self.vram

    @property
    def headroom(self) -> int:
        """vram - total: negative by what it lacks."""
        return self.vram - self.total

    @property
    def max_micro_batch(self) -> int:
        """The largest micro_batch whose plan fits (0: not even one sample)."""
        fixed = self.total - self.micro_batch * self.per_sample
        return max(0, (self.vram - fixed) // self.per_sample) if self.per_sample else 0


def frozen_base_bytes(cfg: RunConfig) -> int:
    """Bytes per number of a LoRA run's frozen base on a GPU (train/lora.py base_dtype): autocast's, or 0 (float32)."""
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_precision(cfg.train.precision))
    dtype = lora.base_dtype(cfg, autocast)
    return dtype.itemsize if dtype is not None else 0


def resolve_precision(requested: str) -> str:
    """The precision a GPU run takes: auto is bf16 on every GPU since Ampere (train/run.py's Precision)."""
    return "bf16" if requested == "auto" else requested


def setting_for(cfg: RunConfig, training: Training, device: str = "cuda") -> Setting:
    """What the forward computes in: autocast's dtype; the parameters' dtype as the forward reads them (FSDP2's
    mixed precision casts them to autocast's; a frozen base may be stored in it)."""
    compute = PRECISION_BYTES[resolve_precision(cfg.train.precision)]
    params = compute if cfg.train.strategy == "fsdp" or training.base_bytes == compute else FP32
    return Setting(
        compute,
        params,
        device,
        frozen_base=training.frozen_base,
        adapters=training.adapters,
        adapter_rank=training.rank,
    )


def _shard_bytes(tensor: torch.Tensor, shards: int) -> int:
    """What one rank holds of a tensor fully_shard splits on dim 0 (padded to a multiple of `shards`)."""
    if shards == 1 or tensor.dim() == 0:
        return tensor.numel() * tensor.element_size()
    rows = math.ceil(tensor.shape[0] / shards)
    return rows * (tensor.numel() // max(1, tensor.shape[0])) * tensor.element_size()


def _bytes(params: list[nn.Parameter], per_number: int | None = None, shards: int = 1) -> int:
    sized = [p if per_number is None else p.new_empty(p.shape, dtype=_dtype(per_number)) for p in params]
    return sum(_shard_bytes(p, shards) for p in sized)


def _dtype(per_number: int) -> torch.dtype:
    return {2: torch.bfloat16, 4: torch.float32}[per_number]


def _matmul_weights(model: nn.Module, dtype: torch.dtype) -> list[nn.Parameter]:
    """Parameters autocast casts to `dtype` for a matmul: every one of two or more dimensions in another dtype,
    but an embedding table."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return [p for p in model.parameters() if p.dim() >= 2 and id(p) not in tables and p.dtype != dtype]


@dataclass(frozen=True)
class Model:
    """A config's meta-device model and its shard units: built once, planned for any batch, box or mode."""

    module: nn.Module
    units: list[nn.Module]

    @classmethod
    def build(cls, cfg: RunConfig, training: Training = FULL_FINE_TUNE) -> Model:
        spec = get_spec(cfg.model.arch)
        if spec.saved_for_backward is None:
            raise ConfigError(
                f"model.arch={cfg.model.arch} does not say what its forward keeps (ModelSpec.saved_for_backward); "
                "make plan needs it: add one to its spec"
            )
        spec.validate(cfg.model)
        with torch.device("meta"):
            module = spec.build(cfg.model)
        training.prepare(module)
        return cls(module, spec.shard_units(module))


def plan_memory(
    cfg: RunConfig, box: Box, training: Training = FULL_FINE_TUNE, model: Model | None = None
) -> MemoryPlan:
    """Per-GPU bytes of a training run of cfg on `box`, before it runs: a pure function of its arguments (`model`,
    Model.build(cfg, training), may be passed in to plan one model several ways without building it again)."""
    built = model or Model.build(cfg, training)
    model, t = built.module, cfg.train
    fsdp = t.strategy == "fsdp"
    shards = box.gpus if fsdp else 1
    precision = resolve_precision(t.precision)
    setting = setting_for(cfg, training)
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]

    weights = _bytes(params, shards=shards) + sum(b.numel() * b.element_size() for b in model.buffers())
    gradients = _bytes(trainable, FP32, shards)
    optimizer = 2 * _bytes(trainable, FP32, shards) + ADAMW_STEP_BYTES * len(trainable)
    weight_copies = 0 if fsdp else _bytes(_matmul_weights(model, _dtype(setting.compute)), setting.compute)
    gather = _gather_buffers(model, built.units, setting.params) if fsdp else 0

    acts = get_spec(cfg.model.arch).saved_for_backward(cfg.model, cfg.data.seq_len, setting)
    by_mode = {mode: round(t.micro_batch * acts.kept(mode)) for mode in MODES}
    transient_per_sample = max(_loss_transient(cfg), acts.recomputed(t.activation_checkpointing))
    per_sample = acts.kept(t.activation_checkpointing) + transient_per_sample
    allowance = CUDA_CONTEXT_BYTES + (NCCL_BYTES[min(box.gpus, 3)] if box.gpus > 1 else 0)
    return MemoryPlan(
        config=cfg.name,
        gpus=box.gpus,
        vram=box.vram,
        strategy=t.strategy,
        precision=precision,
        micro_batch=t.micro_batch,
        seq_len=cfg.data.seq_len,
        activation_checkpointing=t.activation_checkpointing,
        training=training.describe(),
        parameters=sum(p.numel() for p in params),
        trainable=sum(p.numel() for p in trainable),
        weights=weights,
        gradients=gradients,
        optimizer=optimizer,
        weight_copies=weight_copies,
        gather_buffers=gather,
        activations=by_mode[t.activation_checkpointing],
        activations_by_mode=by_mode,
        transient=round(t.micro_batch * transient_per_sample),
        allowance=allowance,
        per_sample=math.ceil(per_sample),
    )


def _gather_buffers(model: nn.Module, units: list[nn.Module], param_bytes: int) -> int:
    """FSDP2's unsharded copies: the root's parameters and two units' (gathered), one unit's and the root's
    gradients in the parameter dtype, and one unit's float32 reduce-scatter input."""
    in_units = {id(p) for unit in units for p in unit.parameters()}
    root = [p for p in model.parameters() if id(p) not in in_units]
    largest = max(units, key=lambda unit: _bytes(list(unit.parameters()), param_bytes), default=None)
    unit_params = list(largest.parameters()) if largest is not None else []
    unit_trainable = [p for p in unit_params if p.requires_grad]
    gathered = _bytes(root, param_bytes) + 2 * _bytes(unit_params, param_bytes)
    gradients = _bytes([p for p in root if p.requires_grad], param_bytes) + _bytes(unit_trainable, param_bytes)
    return gathered + gradients + _bytes(unit_trainable, FP32)


def _loss_transient(cfg: RunConfig) -> float:
    """Per sample: the float32 gradient of the log-probabilities and of the logits, at the top of the backward."""
    vocab = getattr(cfg.model, "vocab_size", 0)
    return 2 * FP32 * vocab * cfg.data.seq_len if vocab else 0.0


def with_changes(cfg: RunConfig, **train_changes: object) -> RunConfig:
    """cfg with some train.* values changed (a lever), the rest shared."""
    return replace(cfg, train=replace(cfg.train, **train_changes))
