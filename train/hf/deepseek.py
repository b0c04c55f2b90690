"""The deepseek family (train/models/deepseek.py) as transformers' DeepseekV3ForCausalLM (sigmoid routing) or
DeepseekV2ForCausalLM (softmax routing), the checkpoints DeepSeek publishes.

Names (no row permutation anywhere: torchrig rotates consecutive pairs, transformers' rope_interleave=True):

| torchrig | transformers |
|---|---|
| embed / norm / head | model.embed_tokens / model.norm / lm_head |
| layers.i.attn_norm / ffn_norm | model.layers.i.input_layernorm / post_attention_layernorm |
| attn.wq, wq_a, q_norm, wq_b | self_attn.q_proj, q_a_proj, q_a_layernorm, q_b_proj |
| attn.wkv_a, kv_norm, wkv_b, wo | self_attn.kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj |
| ffn.w1, w3, w2 (dense) | mlp.gate_proj, up_proj, down_proj |
| ffn.router.weight, expert_bias | mlp.gate.weight, mlp.gate.e_score_correction_bias (V3 only) |
| ffn.experts (experts_to_hf) | mlp.experts.e.gate_proj / up_proj / down_proj |
| ffn.shared_experts.w1, w3, w2 | mlp.shared_experts.gate_proj, up_proj, down_proj |
| mtp.d.hidden_norm, embed_norm, norm | model.layers.{N+d}.hnorm, enorm, shared_head.norm |
| mtp.d.proj | model.layers.{N+d}.eh_proj, its two column halves swapped |
| mtp.d.block.* | model.layers.{N+d}.* (as a layer) |

The MTP module follows DeepSeek-V3's checkpoints (N = num_hidden_layers): vLLM's MTP drafting reads it, with
copies of the embedding and head at model.layers.{N+d}.embed_tokens and shared_head.head; transformers builds
no MTP and reports these as unexpected. DeepSeek's eh_proj reads cat([enorm(embedding), hnorm(hidden)]), the
embedding first; torchrig's proj the hidden state first: hence the swap.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Any

import torch

from train.config import ModelConfig
from train.errors import ConfigError
from train.hf.mapping import HFMapping, State, hf_value, refuse, rope_settings, whole

V3, V2 = "deepseek_v3", "deepseek_v2"
ARCHITECTURES = {V3: "DeepseekV3ForCausalLM", V2: "DeepseekV2ForCausalLM"}
SCORING = {V3: "sigmoid", V2: "softmax"}
# V2's two routing methods: greedy top-k over all experts, or within the topk_group best groups.
V2_TOPK_METHODS = {"greedy": False, "group_limited_greedy": True}

# Options transformers gives a default to (4.57 and 5.x alike), for a config.json that leaves them out.
# The sizes themselves (REQUIRED) must be given: their defaults differ between releases.
DEFAULTS = {
    V3: {
        "n_shared_experts": 1, "n_routed_experts": 256, "routed_scaling_factor": 2.5, "kv_lora_rank": 512,
        "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": 8,
        "topk_group": 4, "num_experts_per_tok": 8, "first_k_dense_replace": 3, "norm_topk_prob": True,
        "max_position_embeddings": 4096, "initializer_range": 0.02, "rms_norm_eps": 1e-6, "rope_interleave": True,
        "moe_intermediate_size": 2048, "topk_method": "noaux_tc", "scoring_func": "sigmoid",
    },
    V2: {
        "n_shared_experts": 2, "n_routed_experts": 64, "routed_scaling_factor": 1.0, "kv_lora_rank": 512,
        "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": 1,
        "topk_group": 1, "first_k_dense_replace": 0, "norm_topk_prob": False, "max_position_embeddings": 2048,
        "initializer_range": 0.02, "rms_norm_eps": 1e-6, "moe_intermediate_size": 1407, "topk_method": "greedy",
        "scoring_func": "softmax",
    },
}  # fmt: skip
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
# YaRN keys of rope_scaling, their DeepSeek defaults (modeling_deepseek.py), and the model.* key of each.
YARN_KEYS = {
    "factor": ("rope_factor", None),
    "original_max_position_embeddings": ("original_seq_len", None),
    "beta_fast": ("beta_fast", 32.0),
    "beta_slow": ("beta_slow", 1.0),
    "mscale": ("mscale", 1.0),
    "mscale_all_dim": ("mscale_all_dim", 0.0),
}


# ---------------------------------------------------------------------------------------------
# config.json


def model_type(cfg: ModelConfig) -> str:
    return V3 if cfg.score_func == "sigmoid" else V2


def to_config(cfg: ModelConfig) -> dict[str, Any]:
    kind = model_type(cfg)
    grouped = cfg.n_expert_groups > 1
    config = {
        "model_type": kind,
        "architectures": [ARCHITECTURES[kind]],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.inter_dim,
        "moe_intermediate_size": cfg.moe_inter_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_heads,  # MLA: every head has its own key; V3's default would be 128
        "n_shared_experts": cfg.n_shared_experts,
        "n_routed_experts": cfg.n_routed_experts,
        "num_experts_per_tok": cfg.n_activated_experts,
        "n_group": cfg.n_expert_groups,
        "topk_group": cfg.n_limited_groups,
        "routed_scaling_factor": cfg.route_scale,
        "norm_topk_prob": cfg.norm_topk_prob,
        "scoring_func": SCORING[kind],
        "topk_method": "noaux_tc" if kind == V3 else "group_limited_greedy" if grouped else "greedy",
        "first_k_dense_replace": cfg.n_dense_layers if cfg.n_routed_experts else cfg.n_layers,
        "moe_layer_freq": 1,
        "q_lora_rank": cfg.q_lora_rank or None,
        "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": yarn_scaling(cfg),
        "rms_norm_eps": cfg.norm_eps,
        "initializer_range": cfg.init_std,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "use_cache": True,
        "num_nextn_predict_layers": cfg.mtp_depth,  # DeepSeek's own key: vLLM's MTP drafting reads it
    }
    if kind == V3:
        config["rope_interleave"] = True
    else:
        config["mlp_bias"] = False
    return config


def yarn_scaling(cfg: ModelConfig) -> dict[str, Any] | None:
    """rope_scaling as DeepSeek's checkpoints write it, or None when YaRN does not apply (the model's Yarn.of)."""
    if cfg.rope_factor <= 1 or cfg.max_seq_len <= cfg.original_seq_len:
        return None
    return {"type": "yarn", **{hf: getattr(cfg, key) for hf, (key, _) in YARN_KEYS.items()}}


def from_config(config: dict[str, Any], weights: Collection[str]) -> dict[str, Any]:
    kind = config["model_type"]
    defaults = DEFAULTS[kind]
    missing = [key for key in REQUIRED if config.get(key) is None]
    if missing:
        raise ConfigError(f"it has no {missing[0]}, which the model's size needs")
    _refuse_unsupported(config, kind)
    n_layers = whole(config, defaults, "num_hidden_layers")
    n_routed = whole(config, defaults, "n_routed_experts")
    grouped = kind == V3 or V2_TOPK_METHODS[hf_value(config, defaults, "topk_method")]
    keys = {
        "vocab_size": config["vocab_size"],
        "dim": config["hidden_size"],
        "inter_dim": config["intermediate_size"],
        "moe_inter_dim": hf_value(config, defaults, "moe_intermediate_size"),
        "n_layers": n_layers,
        "n_heads": config["num_attention_heads"],
        "n_routed_experts": n_routed,
        # explicit null: none (transformers crashes on it; DeepSeek's code reads it as none)
        "n_shared_experts": config.get("n_shared_experts", defaults["n_shared_experts"]) or 0,
        "n_activated_experts": _experts_per_token(config, n_routed),
        "n_dense_layers": min(whole(config, defaults, "first_k_dense_replace"), n_layers),
        "n_expert_groups": hf_value(config, defaults, "n_group") if grouped else 1,
        "n_limited_groups": hf_value(config, defaults, "topk_group") if grouped else 1,
        "route_scale": hf_value(config, defaults, "routed_scaling_factor"),
        "score_func": SCORING[kind],
        "norm_topk_prob": hf_value(config, defaults, "norm_topk_prob"),
        "q_lora_rank": config.get("q_lora_rank", defaults["q_lora_rank"]) or 0,  # null: a full-rank query
        "kv_lora_rank": hf_value(config, defaults, "kv_lora_rank"),
        "qk_nope_head_dim": hf_value(config, defaults, "qk_nope_head_dim"),
        "qk_rope_head_dim": hf_value(config, defaults, "qk_rope_head_dim"),
        "v_head_dim": hf_value(config, defaults, "v_head_dim"),
        "max_seq_len": hf_value(config, defaults, "max_position_embeddings"),
        "norm_eps": hf_value(config, defaults, "rms_norm_eps"),
        "init_std": hf_value(config, defaults, "initializer_range"),
        "mtp_depth": _mtp_layers_present(config, n_layers, weights),
    }
    theta, scaling = rope_settings(config)
    keys["rope_theta"] = theta
    if scaling is not None:
        if scaling["rope_type"] != "yarn":
            raise refuse("rope_scaling type", scaling["rope_type"], "deepseek reads yarn or none")
        original = scaling.get("original_max_position_embeddings") or keys["max_seq_len"]
        for hf, (key, default) in YARN_KEYS.items():
            value = scaling.get(hf)
            keys[key] = original if hf == "original_max_position_embeddings" else default if value is None else value
        if keys["rope_factor"] is None:
            raise ConfigError("rope_scaling has no factor, which YaRN needs")
    return keys


def _refuse_unsupported(config: dict[str, Any], kind: str) -> None:
    """The options this family does not compute as transformers would, each named with its value."""
    checks = [
        ("hidden_act", "silu", "deepseek computes SwiGLU with silu"),
        ("attention_bias", False, "deepseek's projections have no bias"),
        ("mlp_bias", False, "deepseek's feed-forwards have no bias"),
        ("tie_word_embeddings", False, "deepseek has an output head of its own"),
        ("moe_layer_freq", 1, "every layer after first_k_dense_replace is MoE"),
        ("scoring_func", SCORING[kind], f"{kind} routes by {SCORING[kind]}"),
    ]
    if kind == V3:
        checks += [
            ("rope_interleave", True, "torchrig rotates consecutive pairs"),
            ("topk_method", "noaux_tc", "deepseek_v3 routes with noaux_tc"),
        ]
    for key, supported, why in checks:
        if config.get(key) is not None and config[key] != supported:
            raise refuse(key, config[key], f"{why}: {key}={supported!r}")
    method = config.get("topk_method", DEFAULTS[kind]["topk_method"])
    if kind == V2 and method not in V2_TOPK_METHODS:
        raise refuse("topk_method", method, f"deepseek_v2 routes with {' or '.join(V2_TOPK_METHODS)}")


def _experts_per_token(config: dict[str, Any], n_routed: int) -> Any:
    value = config.get("num_experts_per_tok", DEFAULTS[config["model_type"]].get("num_experts_per_tok"))
    if value is None:
        if n_routed:
            raise ConfigError("it has no num_experts_per_tok, which routing needs")
        return 1
    return value


def _mtp_layers_present(config: dict[str, Any], n_layers: int, weights: Collection[str]) -> int:
    """MTP depths whose weights are there: num_nextn_predict_layers names them, and a checkpoint saved by
    transformers (which builds no MTP) says 1 while holding none."""
    declared = config.get("num_nextn_predict_layers") or 0
    if isinstance(declared, bool) or not isinstance(declared, int) or declared < 0:
        raise ConfigError(f"num_nextn_predict_layers={declared!r} is not a count")
    depth = 0
    while depth < declared and f"model.layers.{n_layers + depth}.eh_proj.weight" in weights:
        depth += 1
    return depth


# ---------------------------------------------------------------------------------------------
# The state dict

TOP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight", "head.weight": "lm_head.weight"}
# Inside a block (main layer or MTP block): torchrig module path -> transformers'.
BLOCK = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn.wq": "self_attn.q_proj",
    "attn.wq_a": "self_attn.q_a_proj",
    "attn.q_norm": "self_attn.q_a_layernorm",
    "attn.wq_b": "self_attn.q_b_proj",
    "attn.wkv_a": "self_attn.kv_a_proj_with_mqa",
    "attn.kv_norm": "self_attn.kv_a_layernorm",
    "attn.wkv_b": "self_attn.kv_b_proj",
    "attn.wo": "self_attn.o_proj",
    "ffn.w1": "mlp.gate_proj",
    "ffn.w3": "mlp.up_proj",
    "ffn.w2": "mlp.down_proj",
    "ffn.router.weight": "mlp.gate.weight",
    "ffn.router.expert_bias": "mlp.gate.e_score_correction_bias",
    "ffn.shared_experts.w1": "mlp.shared_experts.gate_proj",
    "ffn.shared_experts.w3": "mlp.shared_experts.up_proj",
    "ffn.shared_experts.w2": "mlp.shared_experts.down_proj",
}
BLOCK_BACK = {hf: ours for ours, hf in BLOCK.items()}
MTP_OWN = {
    "hidden_norm.weight": "hnorm.weight",
    "embed_norm.weight": "enorm.weight",
    "norm.weight": "shared_head.norm.weight",
    "proj.weight": "eh_proj.weight",
}
MTP_OWN_BACK = {hf: ours for ours, hf in MTP_OWN.items()}
# Copies DeepSeek's checkpoints carry in each MTP layer, of the embedding and the head (shared here).
MTP_COPIES = {"embed_tokens.weight": "embed.weight", "shared_head.head.weight": "head.weight"}
EXPERTS, HF_EXPERTS = "ffn.experts.", "mlp.experts."
EXPERT_PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
EXPERT_PROJ_BACK = {hf: ours for ours, hf in EXPERT_PROJ.items()}


def experts_to_hf(experts: State) -> State:
    """One MoE layer's routed experts, named below ffn.experts., torchrig holding each projection stacked
    [experts, out, in] ('w1.weight'), as Hugging Face names them below mlp.experts., one tensor per expert
    ('3.gate_proj.weight', a copy of its own: safetensors refuses shared memory). The one place that knows
    how torchrig lays the experts out."""
    out = {}
    for key, value in experts.items():
        proj, param = key.split(".")
        for index, tensor in enumerate(value.unbind(0)):
            out[f"{index}.{EXPERT_PROJ[proj]}.{param}"] = tensor.clone()
    return out


def experts_from_hf(experts: State) -> State:
    """experts_to_hf backwards: each projection's per-expert tensors stacked in expert order (the directory
    reader has checked every expert's tensor against the model before)."""
    grouped: dict[str, dict[int, torch.Tensor]] = {}
    for key, value in experts.items():
        expert, proj, param = key.split(".")
        grouped.setdefault(f"{EXPERT_PROJ_BACK[proj]}.{param}", {})[int(expert)] = value
    return {name: torch.stack([tensors[i] for i in sorted(tensors)]) for name, tensors in grouped.items()}


def _renamed(state: State, table: dict[str, str]) -> State:
    """Rename by the longest module path in table that prefixes each key."""
    out = {}
    for key, value in state.items():
        module = max((m for m in table if key == m or key.startswith(m + ".")), key=len, default=None)
        if module is None:
            raise KeyError(key)
        out[table[module] + key[len(module) :]] = value
    return out


def block_to_hf(block: State) -> State:
    experts = {k[len(EXPERTS) :]: v for k, v in block.items() if k.startswith(EXPERTS)}
    rest = {k: v for k, v in block.items() if not k.startswith(EXPERTS)}
    return _renamed(rest, BLOCK) | {HF_EXPERTS + k: v for k, v in experts_to_hf(experts).items()}


def block_from_hf(block: State) -> State:
    experts = {k[len(HF_EXPERTS) :]: v for k, v in block.items() if k.startswith(HF_EXPERTS)}
    rest = {k: v for k, v in block.items() if not k.startswith(HF_EXPERTS)}
    return _renamed(rest, BLOCK_BACK) | {EXPERTS + k: v for k, v in experts_from_hf(experts).items()}


def swap_halves(proj: torch.Tensor) -> torch.Tensor:
    """eh_proj [dim, 2 dim]: the column halves that read the hidden state and the embedding, exchanged."""
    half = proj.shape[1] // 2
    return torch.cat([proj[:, half:], proj[:, :half]], dim=1)


def _groups(state: State, pattern: str) -> dict[int, State]:
    """Keys matching `pattern` (with groups: index, rest), grouped by index, the rest as the key."""
    groups: dict[int, State] = {}
    for key, value in state.items():
        found = re.fullmatch(pattern, key)
        if found:
            groups.setdefault(int(found[1]), {})[found[2]] = value
    return groups


def to_state(cfg: ModelConfig, state: State) -> State:
    out = {TOP[key]: state[key] for key in TOP}
    for index, block in _groups(state, r"layers\.(\d+)\.(.+)").items():
        out |= {f"model.layers.{index}.{k}": v for k, v in block_to_hf(block).items()}
    for depth, module in _groups(state, r"mtp\.(\d+)\.(.+)").items():
        prefix = f"model.layers.{cfg.n_layers + depth}."
        own = {k: v for k, v in module.items() if not k.startswith("block.")}
        own["proj.weight"] = swap_halves(own["proj.weight"])
        out |= {prefix + MTP_OWN[k]: v for k, v in own.items()}
        block = {k[len("block.") :]: v for k, v in module.items() if k.startswith("block.")}
        out |= {prefix + k: v for k, v in block_to_hf(block).items()}
        # Copies: safetensors refuses two names for one storage.
        out |= {prefix + copy: state[ours].clone() for copy, ours in MTP_COPIES.items()}
    return out


def from_state(cfg: ModelConfig, state: State) -> State:
    out = {ours: state[hf] for ours, hf in TOP.items()}
    for index, layer in _groups(state, r"model\.layers\.(\d+)\.(.+)").items():
        if index < cfg.n_layers:
            out |= {f"layers.{index}.{k}": v for k, v in block_from_hf(layer).items()}
            continue
        prefix = f"mtp.{index - cfg.n_layers}."
        own = {k: v for k, v in layer.items() if k in MTP_OWN_BACK}
        own["eh_proj.weight"] = swap_halves(own["eh_proj.weight"])
        out |= {prefix + MTP_OWN_BACK[k]: v for k, v in own.items()}
        block = {k: v for k, v in layer.items() if k not in MTP_OWN_BACK and k not in MTP_COPIES}
        out |= {prefix + "block." + k: v for k, v in block_from_hf(block).items()}
    return out


def caveats(cfg: ModelConfig, state: State) -> list[str]:
    """Where transformers' DeepSeek classes compute otherwise than DeepSeek's code (and torchrig)."""
    notes = []
    if cfg.score_func == "softmax" and cfg.norm_topk_prob and cfg.n_activated_experts > 1:
        notes.append(
            "transformers' DeepseekV2 ignores norm_topk_prob=true (it scales the probabilities by "
            "routed_scaling_factor instead of normalising them, unlike DeepSeek's code): its logits differ"
        )
    if cfg.score_func == "softmax" and yarn_scaling(cfg) and cfg.mscale_all_dim:
        notes.append(
            "transformers 4.x's DeepseekV2 leaves out YaRN's softmax-scale correction (5.x and DeepSeek's code "
            "apply it): under 4.x its logits differ"
        )
    biases = [value for key, value in state.items() if key.endswith("router.expert_bias")]
    if cfg.n_expert_groups > 1 and any(bool((bias < 0).any()) for bias in biases):
        notes.append(
            "transformers 4.x's DeepseekV3 masks the dropped expert groups with 0.0, DeepSeek's code (and torchrig "
            "and transformers 5.x) with -inf: with negative balancing biases its routing can differ under 4.x"
        )
    return notes


MAPPING = HFMapping(
    model_types=(V3, V2),
    to_config=to_config,
    from_config=from_config,
    to_state=to_state,
    from_state=from_state,
    training_keys=("bias_update_speed", "mtp_weight"),
    caveats=caveats,
)
