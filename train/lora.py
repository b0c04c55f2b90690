"""LoRA (Hu et al., arXiv:2106.09685): low-rank adapters on a frozen base (train.lora).

An adapted matrix W computes y = W x + (alpha / r) * B A dropout(x), with A [r, in] drawn as PEFT draws it
(kaiming-uniform, a=sqrt(5)) and B [out, r] zeros, so that step 0 computes the base exactly. `apply(model, cfg)`
freezes every base parameter, stops the family's other updates of base state (`ModelSpec.freeze_state`:
DeepSeek's balancing biases), and puts an adapter on each module train.lora.targets names; the optimizer then
finds only the adapters trainable (train/run.py build_optimizer keeps parameters with requires_grad).

The adapters are our own layers, not peft's: peft wraps nn.Linear but not the stacked routed experts
(GroupedLinear [E, out, in]), and a layer of ours keeps the base's parameter names (`layers.0.attn.wq.weight`
beside `layers.0.attn.wq.lora_A`), so checkpoints, FSDP2's shard units and the Hugging Face mapping see the
base as it was. The on-disk format is peft's either way (train/hf/peft.py).

Targets are matched as PEFT's target_modules list is: a module whose name is the target or ends in "." + it. A
target naming a module that holds linear layers (experts, shared_experts, attn) adapts each linear layer in it.
Each adapter class is a row of ADAPTERS: the base layer kind, and the adapter that replaces it in place.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.torch_version import TorchVersion

from train.config import LoRAConfig, RunConfig
from train.errors import ConfigError
from train.models import get_spec
from train.models.deepseek import GroupedLinear, grouped_linear

LORA_A, LORA_B = "lora_A", "lora_B"
# FSDP2 accepts frozen parameters of another dtype than the trainable ones in one shard unit from torch 2.8
# (pytorch/pytorch#154103); before, a bf16 base beside float32 adapters fails its uniform-dtype assertion.
FSDP2_MIXED_DTYPES = TorchVersion(torch.__version__) >= (2, 8)


def _dropout(p: float) -> nn.Module:
    return nn.Dropout(p) if p > 0 else nn.Identity()


class LoRALinear(nn.Linear):
    """An nn.Linear with an adapter: the base's weight (frozen) under its own name, lora_A [r, in], lora_B [out, r]."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        nn.Module.__init__(self)  # not nn.Linear's: the weight is the base's own parameter, not a new one
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self.scaling = alpha / rank
        self.dropout = _dropout(dropout)
        device = base.weight.device  # float32, whatever the base's dtype: AdamW steps them
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling


class LoRAGroupedLinear(GroupedLinear):
    """The routed experts' GroupedLinear with one adapter per expert: lora_A [E, r, in], lora_B [E, out, r].

    Both of GroupedLinear's ways: forward(x, offsets), all experts' groups of rows at once, and per_expert()."""

    def __init__(self, base: GroupedLinear, rank: int, alpha: float, dropout: float):
        nn.Module.__init__(self)
        self.weight = base.weight
        experts, out_features, in_features = base.weight.shape
        self.scaling = alpha / rank
        self.dropout = _dropout(dropout)
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(experts, rank, in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(experts, out_features, rank, device=device, dtype=torch.float32))
        for expert_a in self.lora_A.detach():
            nn.init.kaiming_uniform_(expert_a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        low = grouped_linear(self.dropout(x), self.lora_A, offsets)  # [rows, r]
        return super().forward(x, offsets) + grouped_linear(low, self.lora_B, offsets) * self.scaling

    def per_expert(self) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        parts = zip(self.weight.unbind(0), self.lora_A.unbind(0), self.lora_B.unbind(0), strict=True)
        return [functools.partial(self._expert, weight=w, lora_a=a, lora_b=b) for w, a, b in parts]

    def _expert(self, x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor):
        return F.linear(x, weight) + F.linear(F.linear(self.dropout(x), lora_a), lora_b) * self.scaling


@dataclass(frozen=True)
class Adapter:
    base: type[nn.Module]  # the layer kind it adapts
    adapter: type[nn.Module]  # built as adapter(base_layer, rank, alpha, dropout)
    sizes: Callable[[nn.Module], tuple[int, int]]  # (in, out) of one adapted matrix


ADAPTERS = (
    Adapter(GroupedLinear, LoRAGroupedLinear, lambda m: (m.weight.shape[2], m.weight.shape[1])),
    Adapter(nn.Linear, LoRALinear, lambda m: (m.in_features, m.out_features)),
)


def _adapter_for(module: nn.Module) -> Adapter | None:
    return next((row for row in ADAPTERS if isinstance(module, row.base)), None)


def targets_of(cfg: RunConfig) -> tuple[list[str], bool]:
    """(train.lora.targets, True), or (the model family's default targets, False) when it is empty: each given
    target must match, while of the defaults only those the model has apply (deepseek has wq, or wq_a and wq_b)."""
    given = list(cfg.train.lora.targets)
    return (given, True) if given else (list(get_spec(cfg.model.arch).lora_targets), False)


def _named(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _expanded(modules: dict[str, nn.Module], target: str) -> dict[str, str]:
    """{adapted layer: the target as it names that layer}: a layer the target names, or, for a module holding
    layers, each layer in it (target "experts" names layers.1.ffn.experts.w1 as "experts.w1")."""
    hits = {}
    for name, module in modules.items():
        if name and _named(name, target):
            if _adapter_for(module):
                hits[name] = target
            else:
                hits |= {
                    f"{name}.{sub}": f"{target}.{sub}" for sub, m in module.named_modules() if sub and _adapter_for(m)
                }
    return hits


def layer_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """The targets as names of the layers they adapt (containers expanded: experts -> experts.w1, experts.w2, ...),
    matched as PEFT matches target_modules: what make plan's activations read (train/plan/)."""
    modules = dict(model.named_modules())
    return list(dict.fromkeys(named for target in targets for named in _expanded(modules, target).values()))


def adapted_modules(model: nn.Module, targets: list[str], rank: int, each: bool = True) -> dict[str, nn.Module]:
    """The layers the targets adapt, by name; a ConfigError for a target that adapts nothing (with `each`; without,
    for none adapting anything), naming the modules there are, or for a rank above an adapted matrix's smaller
    dimension."""
    modules = dict(model.named_modules())
    found: dict[str, nn.Module] = {}
    for target in targets:
        hits = {name: modules[name] for name in _expanded(modules, target)}
        if not hits and each:
            raise _no_match(target, modules)
        found |= hits
    if not found:
        raise _no_match(",".join(targets), modules)  # none of the family's defaults (or none it has)
    for name, module in found.items():
        in_features, out_features = _adapter_for(module).sizes(module)
        if rank > min(in_features, out_features):
            raise ConfigError(
                f"train.lora.rank={rank} exceeds the smaller dimension of {name} ({in_features} in, {out_features} "
                f"out); give a rank of at most {min(in_features, out_features)} or drop it from train.lora.targets"
            )
    return found


def _no_match(target: str, modules: dict[str, nn.Module]) -> ConfigError:
    """The error for a target that adapts nothing: the distinct names (not indices) of the linear layers there
    are, and of the modules holding them."""
    layers = [name for name, module in modules.items() if name and _adapter_for(module)]
    names = dict.fromkeys(_parts(name)[-1] for name in layers)
    holders = dict.fromkeys(holder for name in layers for holder in _parts(name)[:-1])
    given = (
        f"train.lora.targets={target} matches no linear layer of this model"
        if target
        else ("train.lora.targets is empty and this model family names no default targets")
    )
    inside = f", inside {', '.join(holders)}" if holders else ""
    return ConfigError(f"{given}; its linear layers are {', '.join(names)}{inside}; give some of these (a comma list)")


def _parts(name: str) -> list[str]:
    return [part for part in name.split(".") if not part.isdigit()]


def check(cfg: RunConfig) -> None:
    """The train.lora values against the model they adapt (built on the meta device): the config loader's check."""
    lora = cfg.train.lora
    if lora.rank < 0:
        raise ConfigError(f"train.lora.rank={lora.rank} must be 0 (off) or more, e.g. 16")
    if not lora.rank:
        return
    if not lora.alpha > 0:
        raise ConfigError(f"train.lora.alpha={lora.alpha} must be more than 0, e.g. 16 (twice the rank is usual)")
    scale = torch.tensor(lora.alpha / lora.rank, dtype=torch.float32)  # the adapters' scale, as they compute it
    if not 0 < float(scale) < float("inf"):
        raise ConfigError(
            f"train.lora.alpha={lora.alpha:g} with rank {lora.rank} gives a scale alpha/rank that float32 holds as "
            f"{float(scale):g}: the adapters would not train; give an alpha such as 16"
        )
    bracketed = [target for target in lora.targets if any(mark in target for mark in "[]()\"' ")]
    if bracketed:
        raise ConfigError(
            f"train.lora.targets has {bracketed[0]!r}: write module names alone, comma-separated, e.g. "
            "train.lora.targets=wq,wkv_b,experts"
        )
    if not 0 <= lora.dropout < 1:
        raise ConfigError(f"train.lora.dropout={lora.dropout} must be at least 0 and below 1, e.g. 0.05")
    from train.models import build_model

    with torch.device("meta"):
        model = build_model(cfg.model)
    targets, each = targets_of(cfg)
    adapted_modules(model, targets, lora.rank, each)


def base_dtype(cfg: RunConfig, autocast_dtype: torch.dtype | None) -> torch.dtype | None:
    """The dtype a LoRA run of cfg stores its frozen base in: autocast's (bf16, fp16), which every matmul reads it
    in anyway, halving the base's bytes; None (as built, float32) without autocast, and under FSDP2 on a torch that
    wants one dtype per shard unit."""
    return None if cfg.train.strategy == "fsdp" and not FSDP2_MIXED_DTYPES else autocast_dtype


def apply(model: nn.Module, cfg: RunConfig, dtype: torch.dtype | None = None) -> nn.Module:
    """With train.lora.rank > 0: freeze the base (stored in `dtype`, base_dtype's, when given) and put a float32
    adapter on each target, in place (after the weights are loaded, before activation checkpointing, DDP/FSDP2 and
    torch.compile). The adapters draw from the global RNG."""
    lora = cfg.train.lora
    if not lora.rank:
        return model
    targets, each = targets_of(cfg)
    found = adapted_modules(model, targets, lora.rank, each)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
        if dtype is not None:
            parameter.data = parameter.data.to(dtype)
    freeze_state = get_spec(cfg.model.arch).freeze_state
    if freeze_state is not None:
        freeze_state(model)
    add_adapters(model, found, lora)
    return model


def add_adapters(model: nn.Module, found: dict[str, nn.Module], settings: LoRAConfig) -> None:
    """Replace each of the found layers by its adapter, in place."""
    for name, module in found.items():
        parent_name, _, child = name.rpartition(".")
        adapter = _adapter_for(module).adapter(module, settings.rank, settings.alpha, settings.dropout)
        setattr(model.get_submodule(parent_name), child, adapter)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, adapters included."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def is_adapter_key(key: str) -> bool:
    return key.endswith((f".{LORA_A}", f".{LORA_B}"))


def adapter_modules(state: dict[str, torch.Tensor]) -> list[str]:
    """The names of the adapted modules in a state dict (those with a lora_A)."""
    return [key[: -len(LORA_A) - 1] for key in state if key.endswith(f".{LORA_A}")]


def merged(state: dict[str, torch.Tensor], lora: LoRAConfig) -> dict[str, torch.Tensor]:
    """A state dict of a LoRA model as the plain model's: each adapted weight W + alpha / r * B A, adapters dropped.
    The same function as base + adapter (dropout is training's only)."""
    out = {key: value for key, value in state.items() if not is_adapter_key(key)}
    for module in adapter_modules(state):
        weight = out[f"{module}.weight"]
        low_rank = state[f"{module}.{LORA_B}"].double() @ state[f"{module}.{LORA_A}"].double()  # [(E,) out, in]
        out[f"{module}.weight"] = (weight.double() + lora.alpha / lora.rank * low_rank).to(weight.dtype)
    return out
