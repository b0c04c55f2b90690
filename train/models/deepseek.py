"""The DeepSeek-V3-style decoder (MLA + DeepSeekMoE + MTP) as a registry spec.

The model is train/model.py's Transformer, its shape checks train/config.py's validate_decoder and
its counts train/flops.py's decoder counters; each moves into this file once the branches that edit
those modules have merged.
"""

from __future__ import annotations

from torch import nn

from train.config import ModelConfig, validate_decoder
from train.flops import decoder_flops_per_token, decoder_params
from train.model import Transformer
from train.models import ModelSpec


def flops_per_sample(cfg: ModelConfig, seq_len: int) -> float:
    """A sample is a sequence of seq_len tokens."""
    return decoder_flops_per_token(cfg, seq_len) * seq_len


def shard_units(model: nn.Module) -> list[nn.Module]:
    """Each block, main and multi-token prediction: one all-gather per block in forward and backward."""
    return [*model.layers, *model.mtp]


SPEC = ModelSpec(
    name="deepseek",
    build=Transformer,
    count_params=decoder_params,
    flops_per_sample=flops_per_sample,
    inputs="tokens",
    shard_units=shard_units,
    validate=validate_decoder,
    seq_len_limit="max_seq_len",
)
