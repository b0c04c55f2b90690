"""The llama family (train/models/llama.py) as transformers' LlamaForCausalLM.

The model computes as LlamaForCausalLM does (rotate_half RoPE, repeat_kv grouping), so the state dict is a
rename: embed / norm / head are model.embed_tokens / model.norm / lm_head; in layer i, attn_norm and ffn_norm
are input_layernorm and post_attention_layernorm, attn.wq/wk/wv/wo self_attn.q_proj/k_proj/v_proj/o_proj and
ffn.w1/w3/w2 mlp.gate_proj/up_proj/down_proj. A tied model has no lm_head in the file (tie_word_embeddings).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from train.config import ModelConfig
from train.errors import ConfigError
from train.hf.mapping import HFMapping, State, hf_value, refuse, rope_settings, whole

DEFAULTS = {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "initializer_range": 0.02}
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
TOP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight", "head.weight": "lm_head.weight"}
LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn.wq": "self_attn.q_proj",
    "attn.wk": "self_attn.k_proj",
    "attn.wv": "self_attn.v_proj",
    "attn.wo": "self_attn.o_proj",
    "ffn.w1": "mlp.gate_proj",
    "ffn.w3": "mlp.up_proj",
    "ffn.w2": "mlp.down_proj",
}


def to_config(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.inter_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "use_cache": True,
    }


def from_config(config: dict[str, Any], weights: Collection[str]) -> dict[str, Any]:
    missing = [key for key in REQUIRED if config.get(key) is None]
    if missing:
        raise ConfigError(f"it has no {missing[0]}, which the model's size needs")
    for key, supported, why in (
        ("hidden_act", "silu", "llama computes SwiGLU with silu"),
        ("attention_bias", False, "llama's projections have no bias"),
        ("mlp_bias", False, "llama's feed-forwards have no bias"),
    ):
        if config.get(key) is not None and config[key] != supported:
            raise refuse(key, config[key], f"{why}: {key}={supported!r}")
    heads, dim = whole(config, {}, "num_attention_heads"), whole(config, {}, "hidden_size")
    if config.get("head_dim") is not None and heads and config["head_dim"] * heads != dim:
        raise refuse("head_dim", config["head_dim"], f"llama's head_dim is hidden_size / num_attention_heads = "
                     f"{dim // heads}")  # fmt: skip
    theta, scaling = rope_settings(config)
    if scaling is not None:
        raise refuse("rope_scaling type", scaling["rope_type"], "llama reads plain RoPE only")
    return {
        "vocab_size": config["vocab_size"],
        "dim": dim,
        "inter_dim": config["intermediate_size"],
        "n_layers": config["num_hidden_layers"],
        "n_heads": heads,
        "n_kv_heads": config.get("num_key_value_heads") or heads,
        "max_seq_len": hf_value(config, DEFAULTS, "max_position_embeddings"),
        "norm_eps": hf_value(config, DEFAULTS, "rms_norm_eps"),
        "rope_theta": theta,
        "tie_embeddings": config.get("tie_word_embeddings", False),
        "init_std": hf_value(config, DEFAULTS, "initializer_range"),
    }


def _rename(state: State, top: dict[str, str], layer: dict[str, str], prefix: tuple[str, str]) -> State:
    out = {}
    for key, value in state.items():
        if key in top:
            out[top[key]] = value
            continue
        head, rest = key[len(prefix[0]) :].split(".", 1)  # "3", "attn.wq.weight"
        module = next(m for m in layer if rest.startswith(m + "."))
        out[f"{prefix[1]}{head}.{layer[module]}{rest[len(module) :]}"] = value
    return out


def to_state(cfg: ModelConfig, state: State) -> State:
    return _rename(state, TOP, LAYER, ("layers.", "model.layers."))


def from_state(cfg: ModelConfig, state: State) -> State:
    back = {hf: ours for ours, hf in LAYER.items()}
    return _rename(state, {hf: ours for ours, hf in TOP.items()}, back, ("model.layers.", "layers."))


MAPPING = HFMapping(
    model_types=("llama",),
    to_config=to_config,
    from_config=from_config,
    to_state=to_state,
    from_state=from_state,
)
