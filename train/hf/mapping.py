"""What a model family registers on its ModelSpec to be a transformers model (`ModelSpec.hf`).

A mapping is pure data conversion, both ways, so that an export loads in transformers unchanged and a
transformers checkpoint builds the same model here:

- to_config(model config) -> config.json's keys (model_type, architectures and every key transformers reads);
- from_config(config.json, names of the weights present) -> the model.* keys, a ConfigError naming the key
  for anything this family cannot compute as transformers would;
- to_state / from_state: the state dict renamed (and where a layout differs, rearranged) between torchrig's
  names and transformers'. to_state also runs on meta tensors: the reader compares the names, shapes and kinds
  it gives with a checkpoint's headers before reading a byte of the weights.

training_keys are the model.* keys that shape neither the weights nor the forward (a loss weight, a
balancing speed, an initialisation): config.json has no place for them, torchrig.json keeps them, and a
fine-tuning run (train.init_from) may set them freely.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import torch

from train.config import ModelConfig
from train.errors import ConfigError

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class HFMapping:
    model_types: tuple[str, ...]  # config.json model_type values this family reads (and writes)
    to_config: Callable[[ModelConfig], dict[str, Any]]
    from_config: Callable[[dict[str, Any], Collection[str]], dict[str, Any]]
    to_state: Callable[[ModelConfig, State], State]
    from_state: Callable[[ModelConfig, State], State]
    training_keys: tuple[str, ...] = ()
    # Where transformers computes this model (config and weights) otherwise than torchrig and the model's
    # reference code: one sentence each, which make export prints.
    caveats: Callable[[ModelConfig, State], list[str]] = lambda cfg, state: []


def hf_value(config: dict[str, Any], defaults: dict[str, Any], key: str) -> Any:
    """config.json's value of key, or transformers' default for it (save_pretrained leaves out some defaults).

    null counts as absent, as transformers' config classes treat it for the keys read through here.
    """
    value = config.get(key)
    return defaults[key] if value is None else value


def whole(config: dict[str, Any], defaults: dict[str, Any], key: str) -> int:
    """hf_value of a key the mapping computes with: a whole number, or a ConfigError naming it."""
    value = hf_value(config, defaults, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise ConfigError(f"{key}={value!r} is not a whole number")
    return int(value)


def refuse(key: str, value: Any, supported: str) -> ConfigError:
    return ConfigError(f"{key}={value!r} is not supported ({supported})")


def rope_settings(config: dict[str, Any]) -> tuple[Any, dict[str, Any] | None]:
    """(rope_theta, the rope scaling dict with its "rope_type", or None) from either form: transformers 4.x writes
    rope_theta and rope_scaling {"type" or "rope_type": ...}; 5.x writes only rope_parameters {"rope_type",
    "rope_theta", ...}. transformers reads both; so does this."""
    for key in ("rope_scaling", "rope_parameters"):
        if config.get(key) is not None and not isinstance(config[key], dict):
            raise ConfigError(f"{key}={config[key]!r} is not a mapping")
    parameters = config.get("rope_parameters") or {}
    theta = config.get("rope_theta", parameters.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling") or parameters
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    return theta, (None if kind == "default" else {**scaling, "rope_type": kind})
