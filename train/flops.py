"""Parameter and FLOP counts from the config alone (no model is built), and MFU.

Each model family counts itself, beside the model it mirrors (train/models/deepseek.py,
train/models/resnet.py: its spec's count_params and flops_per_sample); these functions ask the
registry for model.arch's spec. tests/test_flops.py checks the counts against built models'
parameters, against torch's FLOP counter, and against DeepSeek-V2-Lite's published size.
"""

from __future__ import annotations

from dataclasses import dataclass

from train.config import ModelConfig


@dataclass(frozen=True)
class ParamCount:
    """total: every parameter (MTP modules included). embedding: the input token-embedding table.
    active: what one token's forward computes with (DeepSeek's "activated" figure): total minus the
    embedding lookup and the routed experts the token is not sent to. The output head counts.
    """

    total: int
    active: int
    embedding: int


def count_params(cfg: ModelConfig) -> ParamCount:
    """Parameter counts of build_model(cfg), computed analytically by its registry spec."""
    from train.models import get_spec  # the registry imports ParamCount from here

    return get_spec(cfg.arch).count_params(cfg)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token of a token model: a sample is seq_len tokens."""
    from train.models import get_spec

    if get_spec(cfg.arch).inputs != "tokens":
        raise ValueError(f"flops_per_token is for token models, not {cfg.arch}; use flops_per_sample")
    return flops_per_sample(cfg, seq_len) / seq_len


def flops_per_sample(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per sample (a sequence of seq_len tokens, or one image), by the model's registry spec."""
    from train.models import get_spec

    return get_spec(cfg.arch).flops_per_sample(cfg, seq_len)


def mfu(flops_per_sample: float, samples_per_sec: float, n_devices: int, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the devices' combined peak; None when the peak is unknown."""
    if peak is None or peak <= 0 or n_devices < 1:
        return None
    return flops_per_sample * samples_per_sec / (n_devices * peak)
