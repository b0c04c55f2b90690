"""A LoRA run's adapters as peft writes them: `adapter_model.safetensors` + `adapter_config.json`, which
`peft.PeftModel.from_pretrained(<the transformers model of the base>, DIR)` loads (make export of a LoRA run).

Keys: `base_model.model.<transformers module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r], the module
named as the family's mapping (ModelSpec.hf) names its weight; the stacked routed experts' adapters [E, r, in]
and [E, out, r] become one adapter per expert (mlp.experts.{e}.gate_proj), as transformers 4.x builds the experts
as linear layers (transformers 5.x fuses them, and peft then adapts them otherwise: an adapter on experts is
for 4.x; one on the attention loads in both). The adapters are mapped by running the family's to_state on the
base's meta state with each adapted weight replaced by its A (then its B): renames and per-expert splits apply
alike, and the tensors that come out real are the adapters. target_modules lists, for each adapted module, the
shortest ending of its name that only adapted modules have.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from train import lora
from train.config import LoRAConfig, ModelConfig
from train.hf.files import write_json
from train.models import build_model, get_spec

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


def adapter_tensors(model: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft's adapter state dict from a LoRA model's torchrig state (adapter keys beside the base's)."""
    spec = get_spec(model.arch)
    with torch.device("meta"):
        base = build_model(model).state_dict()
    modules = lora.adapter_modules(state)
    out = {}
    for part in (lora.LORA_A, lora.LORA_B):
        marked = base | {f"{module}.weight": state[f"{module}.{part}"] for module in modules}
        for key, value in spec.hf.to_state(model, marked).items():
            if value.device.type != "meta":
                out[f"{PREFIX}{key.removesuffix('.weight')}.{part}.weight"] = value.contiguous()
    return out


def target_modules(model: ModelConfig, tensors: dict[str, torch.Tensor]) -> list[str]:
    """peft's target_modules for the adapted transformers modules: for each, its shortest ending (q_proj,
    experts.3.gate_proj) that no module without an adapter shares, as peft matches a list (name == target or
    name ending in "." + target)."""
    with torch.device("meta"):
        every = get_spec(model.arch).hf.to_state(model, build_model(model).state_dict())
    adapted = {key[len(PREFIX) :].rsplit(".", 2)[0] for key in tensors}
    plain = Counter(end for key in every if key.endswith(".weight") for end in _endings(key.removesuffix(".weight")))
    mine = Counter(end for name in adapted for end in _endings(name))
    return sorted({next(end for end in _endings(name) if plain[end] == mine[end]) for name in adapted})


def _endings(name: str) -> list[str]:
    """model.layers.0.self_attn.q_proj -> q_proj, self_attn.q_proj, layers.0.self_attn.q_proj, the whole name (none
    beginning with an index)."""
    parts = name.split(".")
    return [".".join(parts[-k:]) for k in range(1, len(parts) + 1) if k == len(parts) or not parts[-k].isdigit()]


def adapter_config(targets: list[str], settings: LoRAConfig, base: str | None) -> dict[str, Any]:
    """adapter_config.json: the keys peft reads (it fills the rest with its defaults)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": settings.rank,
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def write_adapter(
    folder: Any,
    model: ModelConfig,
    state: dict[str, torch.Tensor],
    settings: LoRAConfig,
    base: str | None,
    dtype: torch.dtype,
) -> list[str]:
    """Write the adapter files into folder; the file names written."""
    from safetensors.torch import save_file

    tensors = {key: value.to(dtype) for key, value in adapter_tensors(model, state).items()}
    save_file(tensors, folder / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    write_json(folder / ADAPTER_CONFIG, adapter_config(target_modules(model, tensors), settings, base))
    return [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
