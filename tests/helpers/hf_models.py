"""Helpers for the Hugging Face tests (tests/train/hf/): tiny models of each family in both directions, and
what differs between transformers releases (hf.md's findings, each used where a test meets it).

transformers is a test dependency (hash-locked in CI): the pinned suite runs 4.57 on torch 2.4.1, `make
test-current` the newest (5.x). Where the two compute differently, V5 says which the test expects.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
import transformers

from tests.helpers.sampling import save_checkpoint
from train.config import RunConfig
from train.config_loader import load_config
from train.models import build_model

V5 = int(transformers.__version__.split(".")[0]) >= 5
# Logits of a tiny model with these weights reach a few units: fp32 rounding stays far below the 1e-5 compared.
INIT_STD = "model.init_std=0.08"
DEEPSEEK = [
    "model.dim=64",
    "model.n_layers=3",
    "model.n_heads=4",
    "model.inter_dim=96",
    "model.n_dense_layers=1",
    "model.n_routed_experts=8",
    "model.n_shared_experts=1",
    "model.n_activated_experts=2",
    "model.moe_inter_dim=32",
    "model.kv_lora_rank=32",
    "model.qk_nope_head_dim=16",
    "model.qk_rope_head_dim=8",
    "model.v_head_dim=16",
    "model.max_seq_len=64",
    "data.seq_len=32",
    "train.precision=fp32",
    INIT_STD,
]
LLAMA = [
    "model.dim=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.inter_dim=128",
    "model.max_seq_len=64",
    "data.seq_len=32",
    "train.precision=fp32",
    INIT_STD,
]
# The families' variants the parity tests cover: (config, overrides).
VARIANTS = {
    # DeepSeek-V3 style: full-rank query, 4 groups of which 2 are kept, a balancing bias, one MTP depth
    "v3": ("tiny", [*DEEPSEEK, "model.n_expert_groups=4", "model.n_limited_groups=2", "model.route_scale=2.5",
                    "model.mtp_depth=1"]),
    # with a low-rank query (q_lora_rank set, as DeepSeek-V3) and 2 groups keep 1, no MTP
    "v3-q-lora": ("tiny", [*DEEPSEEK, "model.q_lora_rank=24", "model.n_expert_groups=2", "model.n_limited_groups=1",
                           "model.route_scale=1.5", "model.mtp_depth=0", "model.norm_eps=1e-5"]),
    # DeepSeek-V2 style: softmax routing over the best 2 of 4 groups, YaRN x4 beyond 16 positions
    "v2-yarn": ("tiny", [*DEEPSEEK, "model.score_func=softmax", "model.norm_topk_prob=false",
                         "model.n_expert_groups=4", "model.n_limited_groups=2", "model.route_scale=1.5",
                         "model.mtp_depth=0", "model.rope_factor=4", "model.original_seq_len=16", "model.mscale=1.0",
                         "model.mscale_all_dim=0.707"]),
    # Llama with grouped-query attention (4 query heads, 2 key/value heads)
    "llama-gqa": ("llama-tiny", [*LLAMA, "model.n_kv_heads=2"]),
}  # fmt: skip


def variant_config(variant: str, *extra: str) -> RunConfig:
    name, overrides = VARIANTS[variant]
    return load_config(name, [*overrides, *extra])


def torchrig_model(cfg: RunConfig, seed: int = 0) -> torch.nn.Module:
    """A model of cfg in eval mode with every weight off its initial value: norms near 1, the balancing bias
    non-zero (positive: transformers 4.57 routes otherwise with negative biases, see
    tests/train/hf/test_deepseek_features.py)."""
    torch.manual_seed(seed)
    model = build_model(cfg.model).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
        for module in model.modules():
            bias = getattr(module, "expert_bias", None)
            if bias is not None:
                bias.copy_(0.1 * torch.rand_like(bias))
    return model


def saved_run(tmp_path: Path, variant: str, *extra: str) -> tuple[RunConfig, torch.nn.Module, Path]:
    """(config, model, run directory holding it as a checkpoint at step 3)."""
    cfg = variant_config(variant, *extra)
    model = torchrig_model(cfg)
    save_checkpoint(tmp_path / "run", model, cfg, step=3)
    return cfg, model, tmp_path / "run"


def extra_layer_keys(keys: list[str], n_layers: int) -> tuple[list[str], list[str]]:
    """(keys of layers n_layers.. (DeepSeek's MTP layers, which transformers does not build), the others)."""
    mtp = [k for k in keys if (m := re.match(r"model\.layers\.(\d+)\.", k)) and int(m[1]) >= n_layers]
    return mtp, [k for k in keys if k not in mtp]


def yarn_mscale(factor: float, mscale: float) -> float:
    """DeepSeek's yarn_get_mscale (modeling_deepseek.py), restated."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def add_v2_yarn_correction(hf_model: torch.nn.Module, config: dict) -> bool:
    """transformers 4.57's DeepseekV2Attention leaves YaRN's softmax-scale correction out (5.x and DeepSeek's code
    apply it, hf.md 0.1): apply it to a 4.57 V2 model's layers so it computes DeepSeek's attention. True if it
    changed anything."""
    scaling = config.get("rope_scaling")
    if V5 or config["model_type"] != "deepseek_v2" or not scaling or not scaling.get("mscale_all_dim"):
        return False
    factor = yarn_mscale(scaling["factor"], scaling["mscale_all_dim"]) ** 2
    for layer in hf_model.model.layers:
        layer.self_attn.scaling *= factor
    return True


def greedy_generate(hf_model: torch.nn.Module, ids: list[int], count: int) -> list[int]:
    """transformers' greedy generate of exactly `count` new tokens (eos does not stop it)."""
    inputs = torch.tensor([ids])
    with torch.no_grad():
        out = hf_model.generate(
            inputs, attention_mask=torch.ones_like(inputs), do_sample=False, max_new_tokens=count,
            min_new_tokens=count, pad_token_id=0,
        )  # fmt: skip
    return out[0, len(ids) :].tolist()
