"""A model of the user's own, registered from outside the project: TORCHRIG_MODELS=tests.helpers.toy_model.

It is what the README's "Bring your own model" asks for, and nothing more: one file exporting SPEC.
An embedding, n_layers residual ReLU layers and an output head, sized by its own model.* keys
(ToyConfig: vocab_size, dim, n_layers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from train.config import ModelConfig
from train.errors import ConfigError
from train.models.spec import ModelSpec, ParamCount


@dataclass
class ToyConfig(ModelConfig):
    arch: str = "toy"
    vocab_size: int = 256  # a token model's config has vocab_size: the data fills in model.vocab_size=auto
    dim: int = 64
    n_layers: int = 2


class ToyLM(nn.Module):
    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(nn.Linear(cfg.dim, cfg.dim) for _ in range(cfg.n_layers))
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.embed(inputs)
        for layer in self.layers:
            hidden = hidden + F.relu(layer(hidden))
        logits = self.head(hidden)
        if targets is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def count_params(cfg: ToyConfig) -> ParamCount:
    embedding = cfg.vocab_size * cfg.dim
    total = 2 * embedding + cfg.n_layers * (cfg.dim + 1) * cfg.dim
    return ParamCount(total=total, active=total - embedding, embedding=embedding)


def flops_per_sample(cfg: ToyConfig, seq_len: int) -> float:
    return 6.0 * (cfg.n_layers * cfg.dim + cfg.vocab_size) * cfg.dim * seq_len


def validate(cfg: ToyConfig) -> None:
    if cfg.n_layers < 1:
        raise ConfigError(f"model.n_layers={cfg.n_layers} must be at least 1")


SPEC = ModelSpec(
    name="toy",
    config=ToyConfig,
    build=ToyLM,
    count_params=count_params,
    flops_per_sample=flops_per_sample,
    inputs="tokens",
    shard_units=lambda model: list(model.layers),
    validate=validate,
)
