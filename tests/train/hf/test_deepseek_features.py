"""The DeepSeek features real checkpoints use, each against DeepSeek's published formulas (restated below) and
against transformers' modules where they agree, with the deviations hf.md found asserted per release:

- routing: sigmoid with the balancing bias (V3) and softmax (V2, greedy and group_limited_greedy),
  norm_topk_prob, routed_scaling_factor, and the -inf mask of dropped groups;
- YaRN: the rotary frequencies, the scale of cos/sin, the attention's softmax-scale correction, and
  DeepSeek's condition for when it applies.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import CONFIG_MAPPING, DeepseekV2ForCausalLM, DeepseekV3ForCausalLM
from transformers.models.deepseek_v2 import modeling_deepseek_v2
from transformers.models.deepseek_v3 import modeling_deepseek_v3

from tests.helpers.hf_models import V5, yarn_mscale
from train.errors import ConfigError
from train.hf.deepseek import to_config
from train.models import build_model
from train.models.deepseek import DeepSeekConfig, Router, rope_cache, validate_decoder

DIM, EXPERTS, TOKENS = 16, 8, 256


def deepseek_gate(x, weight, bias, *, score_func, top_k, groups, keep, scale, norm):
    """DeepSeek's gate as published: DeepSeek-V3 inference/model.py Gate.forward for sigmoid (bias added to choose;
    groups ranked by their top-2 biased scores, by their best score without a bias; dropped groups masked with
    -inf; weights from the unbiased scores, normalised (norm_topk_prob in its Hugging Face code), times
    route_scale), and DeepSeek-V2 modeling_deepseek.py MoEGate.forward for softmax (groups ranked by their best
    probability, dropped ones masked with 0.0; with top_k > 1 and norm_topk_prob the weights are normalised
    (sum + 1e-20), otherwise multiplied by routed_scaling_factor)."""
    scores = x @ weight.T
    scores = scores.softmax(-1, dtype=torch.float32) if score_func == "softmax" else scores.sigmoid()
    original = scores
    if bias is not None:
        scores = scores + bias
    if groups > 1:
        grouped = scores.view(x.size(0), groups, -1)
        group_scores = grouped.amax(-1) if bias is None else grouped.topk(2, dim=-1)[0].sum(-1)
        best = group_scores.topk(keep, dim=-1)[1]
        dropped = torch.ones(x.size(0), groups, dtype=torch.bool).scatter_(1, best, False)
        fill = 0.0 if score_func == "softmax" else float("-inf")
        scores = grouped.masked_fill(dropped.unsqueeze(-1), fill).flatten(1)
    indices = scores.topk(top_k, dim=-1)[1]
    weights = original.gather(1, indices)
    if score_func == "sigmoid":
        weights = (weights / (weights.sum(-1, keepdim=True) + 1e-20) if norm else weights) * scale
    elif top_k > 1 and norm:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    else:
        weights = weights * scale
    return _sorted(indices, weights)


def _sorted(indices: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's experts in index order (transformers' topk is unsorted)."""
    order = indices.argsort(-1)
    return indices.gather(-1, order), weights.gather(-1, order)


def torchrig_gate(x, weight, bias, *, score_func, top_k, groups, keep, scale, norm):
    cfg = DeepSeekConfig(dim=DIM, n_routed_experts=EXPERTS, n_activated_experts=top_k, n_expert_groups=groups,
                         n_limited_groups=keep, route_scale=scale, score_func=score_func,
                         norm_topk_prob=norm)  # fmt: skip
    router = Router(cfg)
    with torch.no_grad():
        router.weight.copy_(weight)
        if bias is not None:
            router.expert_bias.copy_(bias)
    weights, indices = router(x)
    return _sorted(indices, weights)


def transformers_gate(x, weight, bias, *, score_func, top_k, groups, keep, scale, norm):
    common = dict(hidden_size=DIM, n_routed_experts=EXPERTS, num_experts_per_tok=top_k, n_group=groups,
                  topk_group=keep, norm_topk_prob=norm, routed_scaling_factor=scale)  # fmt: skip
    if score_func == "sigmoid":
        router = modeling_deepseek_v3.DeepseekV3TopkRouter(CONFIG_MAPPING["deepseek_v3"](**common))
        with torch.no_grad():
            router.weight.copy_(weight)
            router.e_score_correction_bias.copy_(bias)
        out = router(x)
    else:
        method = "group_limited_greedy" if groups > 1 else "greedy"
        config = CONFIG_MAPPING["deepseek_v2"](**common, num_attention_heads=4, topk_method=method)
        gate = (modeling_deepseek_v2.DeepseekV2TopkRouter if V5 else modeling_deepseek_v2.DeepseekV2MoEGate)(config)
        with torch.no_grad():
            gate.weight.copy_(weight)
        out = gate(x.view(1, *x.shape))
    # 4.57 returns (indices, weights); 5.x (logits, weights, indices)
    indices, weights = (out[2], out[1]) if V5 else out[:2]
    return _sorted(indices.view(x.size(0), -1), weights.view(x.size(0), -1))


def inputs(bias: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(TOKENS, DIM, generator=generator)
    weight = 0.3 * torch.randn(EXPERTS, DIM, generator=generator)
    biases = {"positive": 0.1 * torch.rand(EXPERTS, generator=generator), "negative": torch.full((EXPERTS,), -1.5)}
    return x, weight, biases.get(bias)


# (score_func, top_k, groups, keep, scale, norm, bias, transformers agrees (4.57, 5.x))
ROUTINGS = {
    "v3-groups": ("sigmoid", 2, 4, 2, 2.5, True, "positive", (True, True)),
    "v3-no-norm": ("sigmoid", 2, 1, 1, 1.0, False, "positive", (True, True)),
    # negative biased affinities: transformers 4.57 masks dropped groups with 0.0, which then win (hf.md 0.3)
    "v3-negative-bias": ("sigmoid", 2, 4, 2, 2.5, True, "negative", (False, True)),
    "v2-greedy": ("softmax", 2, 1, 1, 3.0, False, None, (True, True)),
    "v2-group-limited": ("softmax", 3, 4, 2, 1.5, False, None, (True, True)),
    # transformers' DeepseekV2 ignores norm_topk_prob (hf.md 0.2): probabilities times the scale
    "v2-norm": ("softmax", 2, 1, 1, 3.0, True, None, (False, False)),
    "v2-group-limited-norm": ("softmax", 3, 4, 2, 1.0, True, None, (False, False)),
}


@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_router_computes_deepseeks_gate(routing: str) -> None:
    score_func, top_k, groups, keep, scale, norm, bias_kind, _ = ROUTINGS[routing]
    x, weight, bias = inputs(bias_kind)
    kwargs = dict(score_func=score_func, top_k=top_k, groups=groups, keep=keep, scale=scale, norm=norm)
    want_indices, want_weights = deepseek_gate(x, weight, bias, **kwargs)
    got_indices, got_weights = torchrig_gate(x, weight, bias, **kwargs)
    assert torch.equal(got_indices, want_indices)
    torch.testing.assert_close(got_weights, want_weights, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_transformers_router_agrees_where_hf_md_says_it_does(routing: str) -> None:
    score_func, top_k, groups, keep, scale, norm, bias_kind, agrees = ROUTINGS[routing]
    x, weight, bias = inputs(bias_kind)
    kwargs = dict(score_func=score_func, top_k=top_k, groups=groups, keep=keep, scale=scale, norm=norm)
    theirs = transformers_gate(x, weight, bias, **kwargs)
    reference = deepseek_gate(x, weight, bias, **kwargs)
    same = torch.equal(theirs[0], reference[0]) and torch.allclose(theirs[1], reference[1], rtol=1e-6, atol=1e-7)
    assert same == agrees[V5]


def test_dropped_groups_are_masked_with_minus_infinity() -> None:
    """With every biased affinity negative, an expert of a dropped group must still never be chosen."""
    x, weight, bias = inputs("negative")
    indices, _ = torchrig_gate(x, weight, bias, score_func="sigmoid", top_k=2, groups=4, keep=2, scale=1.0, norm=True)
    scores = (x @ weight.T).sigmoid() + bias
    group_scores = scores.view(TOKENS, 4, -1).topk(2, dim=-1)[0].sum(-1)
    kept = group_scores.topk(2, dim=-1)[1]
    assert all(set((indices[t] // 2).tolist()) <= set(kept[t].tolist()) for t in range(TOKENS))


def test_softmax_routing_has_no_balancing_bias_to_checkpoint() -> None:
    model = build_model(DeepSeekConfig(score_func="softmax", n_routed_experts=4, n_activated_experts=2))
    assert not [key for key in model.state_dict() if "expert_bias" in key]


# ---------------------------------------------------------------------------------------------
# YaRN


def deepseek_yarn(dim, seqlen, base, factor, original, beta_fast, beta_slow, mscale, mscale_all_dim):
    """DeepSeek's YaRN as published: inference/model.py precompute_freqs_cis (frequencies, applied when
    max_seq_len > original_seq_len) and, from its Hugging Face modeling_deepseek.py, the cos/sin scale
    yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim) and the softmax scale's factor
    yarn_get_mscale(factor, mscale_all_dim) ** 2. Returns (inv_freq, cos, sin, softmax factor)."""

    def correction_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if seqlen > original:
        low = max(math.floor(correction_dim(beta_fast)), 0)
        high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
        high = high + 0.001 if low == high else high
        smooth = 1 - torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        freqs = freqs / factor * (1 - smooth) + freqs * smooth
    angles = torch.outer(torch.arange(seqlen, dtype=torch.float32), freqs)
    scale = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim) if seqlen > original else 1.0
    softmax = yarn_mscale(factor, mscale_all_dim) ** 2 if seqlen > original and mscale_all_dim else 1.0
    return freqs, angles.cos() * scale, angles.sin() * scale, softmax


# (rope_factor, original_seq_len, mscale, mscale_all_dim, beta_fast, beta_slow)
YARNS = {
    "v2-lite": (40.0, 64, 0.707, 0.707, 32.0, 1.0),
    "v3": (40.0, 64, 1.0, 1.0, 32.0, 1.0),
    "mscale-differs": (8.0, 32, 1.0, 0.707, 16.0, 2.0),
}


def yarn_model_config(yarn: str, score_func: str = "sigmoid") -> DeepSeekConfig:
    factor, original, mscale, mscale_all_dim, beta_fast, beta_slow = YARNS[yarn]
    return DeepSeekConfig(dim=64, n_layers=1, n_heads=4, n_routed_experts=0, kv_lora_rank=16, qk_nope_head_dim=32,
                          qk_rope_head_dim=32, v_head_dim=32, max_seq_len=256, rope_theta=10000.0,
                          rope_factor=factor, original_seq_len=original, mscale=mscale, mscale_all_dim=mscale_all_dim,
                          beta_fast=beta_fast, beta_slow=beta_slow, score_func=score_func)  # fmt: skip


@pytest.mark.parametrize("yarn", list(YARNS))
def test_yarn_tables_and_softmax_scale_are_deepseeks(yarn: str) -> None:
    m = yarn_model_config(yarn)
    factor, original, mscale, mscale_all_dim, beta_fast, beta_slow = YARNS[yarn]
    _, cos, sin, softmax = deepseek_yarn(m.qk_rope_head_dim, m.max_seq_len, m.rope_theta, factor, original,
                                         beta_fast, beta_slow, mscale, mscale_all_dim)  # fmt: skip
    model = build_model(m)
    torch.testing.assert_close(model.rope_cos, cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.rope_sin, sin, rtol=0, atol=1e-6)
    qk = m.qk_nope_head_dim + m.qk_rope_head_dim
    assert model.layers[0].attn.softmax_scale == pytest.approx(qk**-0.5 * softmax, rel=1e-12)
    assert softmax > 1.0  # the correction is there to check


@pytest.mark.parametrize("yarn", list(YARNS))
@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_transformers_yarn_matches_where_hf_md_says_it_does(yarn: str, score_func: str) -> None:
    """Frequencies and the cos/sin scale: transformers equals DeepSeek in V3 and V2. The softmax-scale correction:
    V3 has it in both releases, V2 only from 5.x (hf.md 0.1)."""
    m = yarn_model_config(yarn, score_func)
    config = to_config(m)
    model_class = DeepseekV3ForCausalLM if score_func == "sigmoid" else DeepseekV2ForCausalLM
    hf = model_class(CONFIG_MAPPING[config.pop("model_type")](**config))
    factor, original, mscale, mscale_all_dim, beta_fast, beta_slow = YARNS[yarn]
    freqs, _, _, softmax = deepseek_yarn(m.qk_rope_head_dim, m.max_seq_len, m.rope_theta, factor, original,
                                         beta_fast, beta_slow, mscale, mscale_all_dim)  # fmt: skip
    torch.testing.assert_close(hf.model.rotary_emb.inv_freq, freqs, rtol=1e-6, atol=0)
    assert hf.model.rotary_emb.attention_scaling == pytest.approx(yarn_mscale(factor, mscale) / yarn_mscale(
        factor, mscale_all_dim))  # fmt: skip
    qk = m.qk_nope_head_dim + m.qk_rope_head_dim
    corrected = hf.model.layers[0].self_attn.scaling == pytest.approx(qk**-0.5 * softmax)
    assert corrected == (score_func == "sigmoid" or V5)


def test_yarn_applies_only_beyond_the_original_context() -> None:
    """DeepSeek's condition (`if seqlen > args.original_seq_len`): a factor that could not apply is refused."""
    plain = build_model(DeepSeekConfig(n_routed_experts=0, max_seq_len=128))
    cos, sin = rope_cache(plain.cfg.qk_rope_head_dim, 128, plain.cfg.rope_theta)
    assert torch.equal(plain.rope_cos, cos) and torch.equal(plain.rope_sin, sin)
    with pytest.raises(ConfigError, match=r"model.rope_factor=4.0 has no effect: YaRN applies only when model"):
        validate_decoder(DeepSeekConfig(rope_factor=4.0, original_seq_len=4096, max_seq_len=256))


def test_latent_norms_use_deepseeks_epsilon_whatever_norm_eps_says() -> None:
    model = build_model(DeepSeekConfig(n_routed_experts=0, q_lora_rank=16, norm_eps=1e-5))
    attention = model.layers[0].attn
    assert attention.q_norm.eps == attention.kv_norm.eps == 1e-6 and model.layers[0].attn_norm.eps == 1e-5


def test_the_reference_gate_is_the_formula_it_restates() -> None:
    """A check of the reference itself on one token by hand: sigmoid, bias, top-2 of 4 experts."""
    x = torch.tensor([[1.0, 0.0]])
    weight = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 0.0], [-1.0, 0.0]])
    bias = torch.tensor([0.0, 0.5, 0.0, 0.0])
    indices, weights = deepseek_gate(x, weight, bias, score_func="sigmoid", top_k=2, groups=1, keep=1, scale=2.0,
                                     norm=True)  # fmt: skip
    assert indices.tolist() == [[0, 1]]  # 0.881 and 0.731 + 0.5 beat 0.5 + 0 and 0.269
    s = torch.sigmoid(torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(weights, (s / s.sum() * 2.0).view(1, 2))
