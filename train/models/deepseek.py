"""A DeepSeek-V3-style decoder: Multi-head Latent Attention, DeepSeekMoE, multi-token prediction.

The whole family in one file: the model, its shape checks, its parameter and FLOP counts, and the
registry SPEC (train/models/__init__.py). Reads top to bottom like the paper (DeepSeek-V3 technical
report, arXiv:2412.19437):

- MLA (section 2.1.1, `MultiHeadLatentAttention`): keys and values come from one low-rank latent
  c_kv = W_dkv x, normalised and expanded per head by W_ukv. Positions enter through a small
  decoupled RoPE part (`rope_cache`, `apply_rope`): each head has its own rotated query slice, while
  the rotated key slice k_rope is one vector shared by all heads. The query may be low-rank too
  (q_lora_rank > 0).
- DeepSeekMoE (2.1.2, `Router`, `MoE`): a few shared experts see every token, routed experts see
  the top-k tokens by sigmoid affinity (V3), or by softmax probability (DeepSeek-V2, arXiv:2405.04434,
  section 2.2; model.score_func=softmax). Group-limited routing first keeps the best
  n_limited_groups expert groups. Dense layers and shared experts are `SwiGLU`; the routed experts'
  weights are stacked (`GroupedExperts`: [experts, out, in]) so that they run in a few grouped
  matmuls (`grouped_linear`) with no host sync where torch._grouped_mm runs; exports and Hugging
  Face checkpoints hold one tensor per expert (`split_experts`, `stack_experts`). `Block` is one layer.
- Auxiliary-loss-free balancing (2.1.2): a per-expert bias is added to the sigmoid affinities only
  to choose experts; after each optimizer step `moe_balance_step` nudges it toward the experts that
  got fewer tokens than average. Softmax routing (V2) has no such bias.
- YaRN context extension (`Yarn`; DeepSeek-V2 report appendix, used by V2 and V3): the rotary
  frequencies are interpolated between original_seq_len and max_seq_len, the rotation tables scaled
  and the attention's softmax scale corrected, as DeepSeek's code computes them.
- Multi-token prediction (2.2, `MTPModule`): D extra blocks, the d-th combining the previous depth's
  hidden state at position i with the embedding of token i+d to predict token i+d+1.
- Decoding with the latent KV cache (DeepSeek-V3 inference/model.py, attn_impl="absorb"):
  `LatentKVCache` keeps per layer only the normalised latent c_kv and the rotated shared key
  k_rope; `MultiHeadLatentAttention.forward_absorbed` folds W_UK into the query and W_UV into
  the output, so keys and values are never expanded per head. `Transformer.new_cache` makes one,
  `Transformer.forward_cached` and `MTPModule.forward_cached` run a prompt or the next tokens at
  the cache's position, and `Transformer.draft_cached` drafts with the first MTP depth for
  speculative decoding (report section 2.2: MTP modules can serve it); train/sample.py drives them.

`DeepSeekConfig`, first, is the `model:` section. After the model: `validate_decoder`, the model.*
checks the config runs before every build; `decoder_params` and `decoder_flops_per_token`, the
counts from the config alone, block by block as the classes above build it (tests/train/models/test_counts.py
checks them against a built model, torch's FLOP counter and DeepSeek-V2-Lite's published size);
and SPEC.

Initialisation: the constructor draws every weight from the global torch RNG (N(0, init_std),
norms at 1), so `torch.manual_seed(seed)` before `train.models.build_model(cfg)` makes it deterministic.
`model.init_weights()` re-draws the same way (e.g. after materialising a meta-device model).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.torch_version import TorchVersion
from torch.utils import flop_counter
from torch.utils.flop_counter import register_flop_formula

from train.config import ModelConfig
from train.errors import ConfigError, require_positive
from train.hf import deepseek as hf_deepseek
from train.models.activations import (
    FP32,
    INDEX,
    Activations,
    Setting,
    Unit,
    attention_core,
    rms_norm,
    swiglu_inner,
)
from train.models.loss import token_loss
from train.models.spec import AllReduce, CachePositions, ModelSpec, ParamCount

# More layers than any model this rig trains (DeepSeek-V3 has 61): a bigger figure is a typo, and
# counting its parameters alone would take minutes.
MAX_LAYERS = 4096
# Far more routed experts than any MoE this rig trains (DeepSeek-V3 has 256): where torch._grouped_mm does not run
# the experts are a loop, one step per expert, and millions of tiny ones would hang every forward.
MAX_EXPERTS = 4096
# A context far past any this rig trains (DeepSeek-V3: 128K); sampling's cache is sized by it.
MAX_SEQ_LEN = 1 << 20
# The epsilon of the query and key-value latent norms: DeepSeek's code builds them at RMSNorm's default
# (inference/model.py `RMSNorm(self.kv_lora_rank)`), whatever rms_norm_eps says, and transformers does the same.
LATENT_NORM_EPS = 1e-6


@dataclass
class DeepSeekConfig(ModelConfig):
    """The decoder's `model:` keys (model.arch=deepseek); the sizes of train/configs/*.yaml."""

    vocab_size: int = 256
    """Token ids the model embeds and predicts; 256 is byte-level. auto: the data's (256 for bytes, a token
    file's sidecar vocab_size)."""
    max_seq_len: int = 256
    """Positions the model has (its RoPE table and sampling's cache); data.seq_len may not exceed it."""
    dim: int = 128
    """Hidden size of every layer."""
    n_layers: int = 4
    """Transformer blocks (MTP modules come on top)."""
    n_heads: int = 4
    """Attention heads."""
    norm_eps: float = 1e-6
    """RMSNorm's epsilon."""
    inter_dim: int = 384
    """Width of the dense SwiGLU feed-forward of the first n_dense_layers layers (all layers without MoE)."""
    n_dense_layers: int = 1
    """Leading layers with a dense feed-forward instead of MoE."""
    n_routed_experts: int = 8
    """DeepSeekMoE's routed experts per MoE layer; 0 makes a dense model."""
    n_shared_experts: int = 1
    """Experts every token goes through, beside the routed ones."""
    n_activated_experts: int = 2
    """Routed experts each token is sent to (top-k)."""
    moe_inter_dim: int = 96
    """Width of one expert's SwiGLU."""
    n_expert_groups: int = 1
    """Groups the routed experts are split into for group-limited routing (1: no grouping)."""
    n_limited_groups: int = 1
    """Groups a token may route into: the best ones by the sum of their top-2 affinities."""
    route_scale: float = 1.0
    """Factor on the gate weights of the routed experts (DeepSeek's routed_scaling_factor); see norm_topk_prob."""
    score_func: Literal["sigmoid", "softmax"] = "sigmoid"
    """How the router scores the routed experts: sigmoid, each affinity on its own, with the balancing bias steering
    the choice (DeepSeek-V3; exported as deepseek_v3), or softmax over all of them, without a bias (DeepSeek-V2;
    exported as deepseek_v2). Groups rank by their top-2 biased affinities (sigmoid) or their best probability
    (softmax)."""
    norm_topk_prob: bool = True
    """Divide the chosen experts' gate weights by their sum. sigmoid: then times route_scale, as DeepSeek-V3 does.
    softmax: in place of route_scale, as DeepSeek-V2's code does (with more than one expert chosen); off, the
    probabilities are taken times route_scale."""
    bias_update_speed: float = 0.001
    """Auxiliary-loss-free balancing: the step by which each expert's selection bias moves after every
    optimizer step."""
    q_lora_rank: int = 0
    """Multi-head Latent Attention: rank of the low-rank query projection; 0 is a full-rank query."""
    kv_lora_rank: int = 64
    """MLA: size of the key-value latent (what sampling's cache holds per layer, with the rope key)."""
    qk_nope_head_dim: int = 32
    """MLA: per-head query/key size without position information."""
    qk_rope_head_dim: int = 16
    """MLA: per-head size of the decoupled rotary query/key part (even)."""
    v_head_dim: int = 32
    """MLA: per-head value size."""
    rope_theta: float = 10000.0
    """RoPE's base."""
    rope_factor: float = 1.0
    """YaRN: the factor by which the context was extended beyond original_seq_len (DeepSeek-V2/V3: 40); 1 is plain
    RoPE. As in DeepSeek's code, YaRN applies only when max_seq_len exceeds original_seq_len."""
    original_seq_len: int = 4096
    """YaRN: the context the rotary frequencies were trained for before the extension (transformers'
    original_max_position_embeddings)."""
    beta_fast: float = 32.0
    """YaRN: frequencies that turn more than beta_fast times over original_seq_len keep their value."""
    beta_slow: float = 1.0
    """YaRN: frequencies that turn fewer than beta_slow times are divided by rope_factor; those between, a blend."""
    mscale: float = 1.0
    """YaRN: the rotation tables are scaled by (0.1 mscale ln(rope_factor) + 1) / (0.1 mscale_all_dim
    ln(rope_factor) + 1) (DeepSeek-V2-Lite: 0.707)."""
    mscale_all_dim: float = 1.0
    """YaRN: the attention's softmax scale is multiplied by (0.1 mscale_all_dim ln(rope_factor) + 1)^2; 0 leaves it
    (DeepSeek-V2-Lite: 0.707, V3: 1)."""
    mtp_depth: int = 0
    """Multi-token prediction modules: depth d predicts token t+d+1 (0 turns it off; 1 also lets sampling
    speculate)."""
    mtp_weight: float = 0.3
    """Weight of the mean MTP loss added to the next-token loss."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation of every linear and embedding weight."""

    def is_dense_layer(self, layer_id: int) -> bool:
        """Layers before n_dense_layers (all of them without routed experts) use the dense SwiGLU."""
        return self.n_routed_experts == 0 or layer_id < self.n_dense_layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32: bf16 sums of squares lose too much precision.
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class SwiGLU(nn.Module):
    """The feed-forward of every layer and of every expert: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def yarn_mscale(factor: float, mscale: float) -> float:
    """YaRN's magnitude correction for a context extended `factor` times (DeepSeek's yarn_get_mscale)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclass(frozen=True)
class Yarn:
    """YaRN rope scaling as DeepSeek's code computes it (inference/model.py precompute_freqs_cis and MLA; the
    mscale/mscale_all_dim split of its Hugging Face modeling_deepseek.py, which transformers follows).

    `Yarn.of(cfg)` is None, plain RoPE, unless rope_factor > 1 and max_seq_len > original_seq_len: DeepSeek's
    condition (`if seqlen > args.original_seq_len`); with rope_factor 1 YaRN would change nothing.
    """

    factor: float
    original_seq_len: int
    beta_fast: float
    beta_slow: float
    mscale: float
    mscale_all_dim: float

    @classmethod
    def of(cls, cfg: DeepSeekConfig) -> Yarn | None:
        if cfg.rope_factor <= 1 or cfg.max_seq_len <= cfg.original_seq_len:
            return None
        return cls(cfg.rope_factor, cfg.original_seq_len, cfg.beta_fast, cfg.beta_slow, cfg.mscale, cfg.mscale_all_dim)

    def inv_freq(self, freqs: torch.Tensor, rope_dim: int, theta: float) -> torch.Tensor:
        """The plain frequencies [rope_dim / 2] blended toward freqs / factor: kept where they turn more than
        beta_fast times over original_seq_len, divided where fewer than beta_slow, linearly in between."""

        def dim_turning(turns: float) -> float:  # the dimension whose frequency turns `turns` times
            return rope_dim * math.log(self.original_seq_len / (turns * 2 * math.pi)) / (2 * math.log(theta))

        low = max(math.floor(dim_turning(self.beta_fast)), 0)
        high = min(math.ceil(dim_turning(self.beta_slow)), rope_dim - 1)
        high = high + 0.001 if low == high else high
        ramp = ((torch.arange(rope_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        keep = 1 - ramp
        return freqs / self.factor * (1 - keep) + freqs * keep

    @property
    def table_scale(self) -> float:
        """The factor on cos and sin (1 when mscale == mscale_all_dim, as in DeepSeek's inference code)."""
        return yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor, self.mscale_all_dim)

    @property
    def softmax_factor(self) -> float:
        """The factor on the attention's softmax scale 1/sqrt(qk_head_dim)."""
        return yarn_mscale(self.factor, self.mscale_all_dim) ** 2


def rope_cache(
    rope_dim: int, max_seq_len: int, theta: float, yarn: Yarn | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles, each [max_seq_len, rope_dim / 2], YaRN-scaled when given."""
    inv_freq = 1.0 / theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim)
    scale = 1.0
    if yarn is not None:
        inv_freq, scale = yarn.inv_freq(inv_freq, rope_dim, theta), yarn.table_scale
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    if scale == 1.0:
        return angles.cos(), angles.sin()
    return angles.cos() * scale, angles.sin() * scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) of x [..., seq, rope_dim] by the position's angle."""
    seq_len = x.shape[-2]
    cos, sin = cos[:seq_len], sin[:seq_len]
    x32 = x.float()
    even, odd = x32[..., 0::2], x32[..., 1::2]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, cfg: DeepSeekConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qk_nope_head_dim = cfg.qk_nope_head_dim
        self.qk_rope_head_dim = cfg.qk_rope_head_dim
        self.qk_head_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        self.v_head_dim = cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        yarn = Yarn.of(cfg)
        self.softmax_scale = 1.0 / math.sqrt(self.qk_head_dim) * (yarn.softmax_factor if yarn else 1.0)

        if cfg.q_lora_rank == 0:
            self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.qk_head_dim, bias=False)
        else:
            self.wq_a = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.wq_b = nn.Linear(cfg.q_lora_rank, cfg.n_heads * self.qk_head_dim, bias=False)
        # One down-projection yields the KV latent and the shared rotary key.
        self.wkv_a = nn.Linear(cfg.dim, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, LATENT_NORM_EPS)
        self.wkv_b = nn.Linear(cfg.kv_lora_rank, cfg.n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.v_head_dim, cfg.dim, bias=False)

    def query(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "wq"):
            return self.wq(x)
        return self.wq_b(self.q_norm(self.wq_a(x)))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        heads = self.n_heads

        q = self.query(x).view(batch, seq_len, heads, self.qk_head_dim).transpose(1, 2)
        q_nope, q_rope = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q = torch.cat([q_nope, apply_rope(q_rope, cos, sin)], dim=-1)

        kv_latent, k_rope = self.wkv_a(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        k_rope = apply_rope(k_rope.unsqueeze(1), cos, sin)  # [batch, 1, seq, rope]: one for all heads
        kv = self.wkv_b(self.kv_norm(kv_latent))
        kv = kv.view(batch, seq_len, heads, self.qk_nope_head_dim + self.v_head_dim).transpose(1, 2)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(-1, heads, -1, -1)], dim=-1)

        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        return self.wo(out.transpose(1, 2).reshape(batch, seq_len, heads * self.v_head_dim))

    def forward_absorbed(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        latent: torch.Tensor,
        rope_key: torch.Tensor,
        start: int,
    ) -> torch.Tensor:
        """The same attention for x at positions start.. (cos/sin: the full tables), reading and
        extending the cache `latent` [batch, capacity, kv_lora_rank] and `rope_key` [batch, capacity, rope].

        As DeepSeek-V3's "absorb" mode: q_nope . (W_UK c) = (q_nope W_UK) . c, and
        sum_t p_t (W_UV c_t) = W_UV (sum_t p_t c_t), so scores and outputs are taken against the
        latent itself and per-head keys and values are never made.
        """
        batch, seq_len, _ = x.shape
        heads, nope = self.n_heads, self.qk_nope_head_dim
        end = start + seq_len
        cos, sin = cos[start:end], sin[start:end]

        q = self.query(x).view(batch, seq_len, heads, self.qk_head_dim).transpose(1, 2)
        q_nope, q_rope = q.split([nope, self.qk_rope_head_dim], dim=-1)
        q_rope = apply_rope(q_rope, cos, sin)  # [batch, heads, seq, rope]

        kv_latent, k_rope = self.wkv_a(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        latent[:batch, start:end] = self.kv_norm(kv_latent)
        rope_key[:batch, start:end] = apply_rope(k_rope, cos, sin)
        cached, cached_rope = latent[:batch, :end], rope_key[:batch, :end]

        wkv_b = self.wkv_b.weight.view(heads, nope + self.v_head_dim, self.kv_lora_rank)
        q_latent = torch.einsum("bhsd,hdc->bhsc", q_nope, wkv_b[:, :nope].to(q_nope.dtype))
        scores = torch.einsum("bhsc,btc->bhst", q_latent, cached.to(q_latent.dtype))
        scores = (scores + torch.einsum("bhsr,btr->bhst", q_rope, cached_rope.to(q_rope.dtype))) * self.softmax_scale
        # Query i sits at position start+i and sees the positions up to its own.
        future = torch.arange(end, device=x.device) > torch.arange(start, end, device=x.device).unsqueeze(1)
        probs = scores.float().masked_fill(future, float("-inf")).softmax(dim=-1).type_as(scores)
        out = torch.einsum("bhst,btc->bhsc", probs, cached.to(probs.dtype))
        out = torch.einsum("bhsc,hdc->bshd", out, wkv_b[:, nope:].to(out.dtype))
        return self.wo(out.reshape(batch, seq_len, heads * self.v_head_dim))


class LatentKVCache(CachePositions):
    """The decoding state of MLA: per layer the normalised latent c_kv and the rotated shared key.

    Per token and layer that is kv_lora_rank + qk_rope_head_dim numbers, where a plain KV cache
    holds n_heads * (qk_nope_head_dim + qk_rope_head_dim) for keys plus n_heads * v_head_dim for
    values (`describe`). `position` counts the positions filled; `rollback` forgets
    those after a point (a rejected speculative draft), which the next write overwrites.
    """

    def __init__(self, cfg: DeepSeekConfig, layers: int, batch: int, device: torch.device, dtype: torch.dtype) -> None:
        self.cfg = cfg
        self.capacity = cfg.max_seq_len
        shape = (batch, self.capacity)
        self.latent = [torch.zeros(*shape, cfg.kv_lora_rank, device=device, dtype=dtype) for _ in range(layers)]
        self.rope_key = [torch.zeros(*shape, cfg.qk_rope_head_dim, device=device, dtype=dtype) for _ in range(layers)]
        self.position = 0

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.latent[index], self.rope_key[index]

    def bytes_per_token(self) -> int:
        """Bytes one token's entries take, all layers together, measured on the tensors held."""
        tensors = [*self.latent, *self.rope_key]
        return sum(t.element_size() * t.shape[-1] for t in tensors)

    def describe(self) -> str:
        """One line: the latent bytes per token against a cache of full per-head keys and values."""
        cfg, layers = self.cfg, len(self.latent)
        size = self.latent[0].element_size()
        naive = layers * cfg.n_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) * size
        latent = self.bytes_per_token()
        return (
            f"KV cache per token: {latent:,} bytes latent ({layers} layers x (kv_lora_rank {cfg.kv_lora_rank} + "
            f"rope {cfg.qk_rope_head_dim}) x {size} B) vs {naive:,} bytes for full keys and values ({layers} x "
            f"{cfg.n_heads} heads x (k {cfg.qk_nope_head_dim + cfg.qk_rope_head_dim} + v {cfg.v_head_dim}) "
            f"x {size} B): {naive / latent:.1f}x smaller"
        )


# The router's expert affinities from its float32 logits [tokens, experts], by model.score_func.
ROUTER_SCORES = {"sigmoid": torch.sigmoid, "softmax": lambda logits: logits.softmax(dim=-1)}


class Router(nn.Module):
    """Expert affinities (ROUTER_SCORES), a group-limited top-k choice, and the chosen experts' gate weights.

    sigmoid (V3): the choice adds the balancing bias `expert_bias` and ranks groups by their top-2 biased
    affinities; softmax (V2): no bias, groups rank by their best probability. Experts of dropped groups are
    masked with -inf, as DeepSeek's inference/model.py does (transformers 4.57's V3 uses 0.0, which differs when
    a biased affinity is negative; docs/models.md). Gate weights: see DeepSeekConfig.norm_topk_prob.
    """

    def __init__(self, cfg: DeepSeekConfig):
        super().__init__()
        self.top_k = cfg.n_activated_experts
        self.n_groups = cfg.n_expert_groups
        self.n_limited_groups = cfg.n_limited_groups
        self.route_scale = cfg.route_scale
        self.score = ROUTER_SCORES[cfg.score_func]
        # DeepSeek-V2's code normalises instead of scaling, and only a choice of several experts.
        self.normalise = cfg.norm_topk_prob and (cfg.score_func == "sigmoid" or cfg.n_activated_experts > 1)
        self.scale_after_norm = cfg.score_func == "sigmoid"
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))
        # Persistent (checkpointed) and float32: updates of ~1e-3 vanish in bf16. None under softmax routing.
        bias = torch.zeros(cfg.n_routed_experts, dtype=torch.float32) if cfg.score_func == "sigmoid" else None
        self.register_buffer("expert_bias", bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [tokens, dim] -> (gate weights [tokens, k] float32, expert indices [tokens, k])."""
        scores = self.score(F.linear(x, self.weight).float())
        choice = scores if self.expert_bias is None else scores + self.expert_bias  # the bias steers the choice only
        if self.n_groups > 1:
            choice = self.keep_best_groups(choice)
        indices = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(-1, indices)
        if self.normalise:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        if self.scale_after_norm or not self.normalise:
            weights = weights * self.route_scale
        return weights, indices

    def keep_best_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """Mask every expert outside the n_limited_groups best groups: by the sum of their top-2 biased
        affinities, or by their best probability without a bias (DeepSeek's Gate)."""
        grouped = choice.view(choice.shape[0], self.n_groups, -1)  # [tokens, groups, experts per group]
        if self.expert_bias is None:
            group_scores = grouped.amax(dim=-1)
        else:
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)
        best_groups = group_scores.topk(self.n_limited_groups, dim=-1).indices
        dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, False)
        return grouped.masked_fill(dropped.unsqueeze(-1), float("-inf")).flatten(1)


# torch._grouped_mm: on CUDA in bf16 from torch 2.8, on compute capability 9.0 (a kernel without a host
# sync); from 2.9 also 8.0+ (a loop inside the op that reads the offsets itself: still one op, so no
# Python loop and no graph break), and the CPU.
_TORCH = TorchVersion(torch.__version__)
_GROUPED_MM = hasattr(torch, "_grouped_mm")
_GROUPED_MM_ON_CPU = _GROUPED_MM and _TORCH >= (2, 9)


@torch.compiler.assume_constant_result
def _cuda_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def _grouped_mm_runs(device: torch.device, dtype: torch.dtype, sizes: tuple[int, ...]) -> bool:
    """Whether torch._grouped_mm computes matmuls of these row and column sizes here, from offsets on
    the device. Every row and matrix stride must be a multiple of 16 bytes."""
    return _grouped_mm_takes(device.type, dtype, sizes, lambda: _cuda_major(device.index or 0))


def _grouped_mm_takes(
    device_type: str, dtype: torch.dtype, sizes: tuple[int, ...], cuda_major: Callable[[], int | None]
) -> bool:
    """_grouped_mm_runs for a device type; cuda_major() None: a GPU not at hand (a plan made on a CPU),
    taken to be Ampere or later, as every GPU this rig plans for is."""
    if not _GROUPED_MM or any(size * dtype.itemsize % 16 for size in sizes):
        return False
    if device_type == "cuda":
        major = cuda_major()
        return dtype == torch.bfloat16 and (major == 9 or (_TORCH >= (2, 9) and (major or 8) >= 8))
    return device_type == "cpu" and _GROUPED_MM_ON_CPU


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, groups: torch.Tensor | list[int]) -> torch.Tensor:
    """x [rows, in] sorted into E groups, weight [E, out, in] -> [rows, out]: group e's rows times weight[e]^T.

    `groups`: the groups' end offsets as an int32 tensor on the device (torch._grouped_mm, where it
    runs these sizes), or their sizes as a host list (one F.linear per group).
    """
    if isinstance(groups, torch.Tensor):
        if _grouped_mm_runs(x.device, x.dtype, weight.shape[-2:]):
            if x.dtype == torch.float32:
                return _grouped_mm_float32(x, weight, groups)
            return torch._grouped_mm(x, weight.to(x.dtype).transpose(-2, -1), offs=groups)
        groups = groups.diff(prepend=groups.new_zeros(1)).tolist()  # a size grouped_mm cannot take: a host read
    rows = x.split(groups)
    return torch.cat([F.linear(r, w) for r, w in zip(rows, weight.unbind(0), strict=True)])


if _GROUPED_MM:
    # torch._grouped_mm runs float32 on the CPU, but its fake kernel (what torch.compile traces with)
    # takes bf16 and fp16 only: in float32 it is wrapped as an op of ours, which compiles as one
    # opaque call, its backward two more.

    @torch.library.custom_op("torchrig::grouped_mm_float32", mutates_args=())
    def _grouped_mm_float32(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return torch._grouped_mm(x, weight.transpose(-2, -1), offs=offsets)

    @_grouped_mm_float32.register_fake
    def _(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[0], weight.shape[-2])

    @torch.library.custom_op("torchrig::grouped_mm_float32_weight_grad", mutates_args=())
    def _grouped_weight_grad(grad: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """[E, out, in]: group e's grad rows^T times its x rows (zeros for an empty group)."""
        return torch._grouped_mm(grad.transpose(0, 1), x, offs=offsets)

    @_grouped_weight_grad.register_fake
    def _(grad: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return grad.new_empty(offsets.shape[0], grad.shape[1], x.shape[1])

    def _save_grouped_inputs(ctx: Any, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        ctx.save_for_backward(*inputs)

    def _grouped_mm_float32_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        x, weight, offsets = ctx.saved_tensors
        grad = grad.contiguous()  # the kernel refuses the zero strides of an expanded gradient
        grad_x = _grouped_mm_float32(grad, weight.transpose(-2, -1), offsets)
        return grad_x, _grouped_weight_grad(grad, x, offsets), None

    _grouped_mm_float32.register_autograd(_grouped_mm_float32_backward, setup_context=_save_grouped_inputs)

    # torch's FLOP counter (FlopCounterMode) knows nothing of ops of ours: every row is one matmul row.
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.torchrig.grouped_mm_float32)
    def _(x_shape: torch.Size, weight_shape: torch.Size, *args: Any, **kwargs: Any) -> int:
        return 2 * x_shape[0] * x_shape[1] * weight_shape[-2]

    @register_flop_formula(torch.ops.torchrig.grouped_mm_float32_weight_grad)
    def _(grad_shape: torch.Size, x_shape: torch.Size, *args: Any, **kwargs: Any) -> int:
        return 2 * grad_shape[0] * grad_shape[1] * x_shape[1]


class GroupedLinear(nn.Module):
    """E bias-free linear layers in one [E, out, in] weight, initialised as E nn.Linear layers would be.

    Applied in one of two ways, both of which a wrapper of it (an adapter such as LoRA) provides:
    `forward(x, offsets)`, each expert on its own group of rows, all at once (grouped_linear); and
    `per_expert()`, one function per expert, for the loop where torch._grouped_mm does not run.
    """

    def __init__(self, n_experts: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, out_features, in_features))
        for expert_weight in self.weight.detach():
            nn.init.kaiming_uniform_(expert_weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return grouped_linear(x, self.weight, offsets)

    def per_expert(self) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        # unbind: one gradient for the whole weight in backward, not one full-size gradient per expert
        return [functools.partial(F.linear, weight=weight) for weight in self.weight.unbind(0)]


# Where torch._grouped_mm does not run (torch 2.4.1, the pinned image, among others), the experts'
# SwiGLU runs as one function of ours: inside it, the layer's one host read of the counts, then expert
# by expert. Its backward is written out (the matmuls autograd would run) and keeps h1 and h3 rather
# than every intermediate; it splits its rows by the forward's copy of the counts on the host, so it
# reads nothing more. Eager runs it as an autograd.Function; torch.compile sees it as one opaque op
# (torchrig::expert_swiglu), so the sizes that the data decides never reach its tracer: a compiled MoE
# block has no graph break and compiles once, whatever the routing. (torch 2.4's custom-op call costs
# about a millisecond of Python each time: more than tiny's whole expert loop, so eager goes around it.)


def _swiglu_forward(
    x: torch.Tensor, counts: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [rows, dim] sorted by expert, counts [E], w1 and w3 [E, hidden, dim], w2 [E, dim, hidden] ->
    out [rows, dim]; h1 = x w1^T and h3 = x w3^T [rows, hidden], each group of rows by its expert's
    weights; and the counts, copied to the host."""
    sizes = counts.tolist()
    rows, hidden = x.shape[0], w1.shape[1]
    out, h1, h3 = x.new_empty(rows, w2.shape[1]), x.new_empty(rows, hidden), x.new_empty(rows, hidden)
    with torch.autocast(x.device.type, enabled=False):  # the caller chose the dtype
        for expert, (r, a, b, y) in enumerate(zip(*(t.split(sizes) for t in (x, h1, h3, out)), strict=True)):
            torch.mm(r, w1[expert].t(), out=a)
            torch.mm(r, w3[expert].t(), out=b)
            torch.mm(F.silu(a) * b, w2[expert].t(), out=y)
    return out, h1, h3, torch.tensor(sizes, dtype=torch.int64)


def _swiglu_inference(
    x: torch.Tensor, counts: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """_swiglu_forward's output alone, for a forward without gradients: one expert's h1 and h3 at a time."""
    sizes = counts.tolist()
    out = x.new_empty(x.shape[0], w2.shape[1])
    with torch.autocast(x.device.type, enabled=False):
        for expert, (r, y) in enumerate(zip(x.split(sizes), out.split(sizes), strict=True)):
            torch.mm(F.silu(r @ w1[expert].t()) * (r @ w3[expert].t()), w2[expert].t(), out=y)
    return out


def _swiglu_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    sizes: torch.Tensor,
    w1: torch.Tensor,
    w3: torch.Tensor,
    w2: torch.Tensor,
    h1: torch.Tensor,
    h3: torch.Tensor,
    input_grad: bool,
    weight_grads: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d x, d w1, d w3, d w2), `sizes` the rows of each expert on the host. d x is empty when input_grad
    is False. When weight_grads is False (a frozen base), x is not kept (an empty tensor) and the weights'
    gradients are empty; else an expert with no rows gets zeros."""
    dx = h1.new_empty((h1.shape[0], w1.shape[2]) if input_grad else (0,))
    dw1, dw3, dw2 = (torch.zeros_like(w) if weight_grads else w.new_empty(0) for w in (w1, w3, w2))
    bounds = sizes.cumsum(0)[:-1]  # on the host: tensor_split reads it there, no device to wait on
    rows = torch.tensor_split(x, bounds) if weight_grads else [x] * len(sizes)
    into = torch.tensor_split(dx, bounds) if input_grad else [dx] * len(sizes)
    groups = zip(*(torch.tensor_split(t, bounds) for t in (grad, h1, h3)), into, rows, strict=True)
    with torch.autocast(h1.device.type, enabled=False):
        for expert, (dy, a, b, dr, r) in enumerate(groups):
            act = F.silu(a)
            dact = dy @ w2[expert]  # d(silu(h1) * h3)
            dh3 = dact * act
            dh1 = torch.ops.aten.silu_backward(dact * b, a)
            if input_grad:
                torch.mm(dh1, w1[expert], out=dr)
                dr += dh3 @ w3[expert]
            if weight_grads:
                torch.mm(dy.t(), act * b, out=dw2[expert])
                torch.mm(dh1.t(), r, out=dw1[expert])
                torch.mm(dh3.t(), r, out=dw3[expert])
    return dx, dw1, dw3, dw2


def _saved(x: torch.Tensor, weights_train: bool) -> torch.Tensor:
    """What the backward keeps of x: nothing for a frozen base (only the weights' gradients read it)."""
    return x if weights_train else x.new_empty(0)


def _weight_grads(needed: tuple[bool, ...], grads: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor | None, ...]:
    return tuple(g if n else None for g, n in zip(grads, needed, strict=True))


class _ExpertSwiGLU(torch.autograd.Function):
    """Eager: _swiglu_forward, its backward _swiglu_backward."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        counts: torch.Tensor,
        w1: torch.Tensor,
        w3: torch.Tensor,
        w2: torch.Tensor,
    ) -> torch.Tensor:
        out, h1, h3, sizes = _swiglu_forward(x, counts, w1, w3, w2)
        ctx.save_for_backward(_saved(x, any(ctx.needs_input_grad[2:])), sizes, w1, w3, w2, h1, h3)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # written out with out= matmuls: no graph of its own
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple:
        needed = ctx.needs_input_grad
        dx, *dw = _swiglu_backward(grad.contiguous(), *ctx.saved_tensors, needed[0], any(needed[2:]))
        return dx if needed[0] else None, None, *_weight_grads(needed[2:], tuple(dw))


_expert_swiglu = torch.library.custom_op(
    "torchrig::expert_swiglu",
    _swiglu_forward,
    mutates_args=(),  # the schema spelled out: torch 2.4 cannot read postponed annotations
    schema="(Tensor x, Tensor counts, Tensor w1, Tensor w3, Tensor w2) -> (Tensor, Tensor, Tensor, Tensor)",
)
_expert_swiglu_backward = torch.library.custom_op(
    "torchrig::expert_swiglu_backward",
    _swiglu_backward,
    mutates_args=(),
    schema="(Tensor grad, Tensor x, Tensor sizes, Tensor w1, Tensor w3, Tensor w2, Tensor h1, Tensor h3, "
    "bool input_grad, bool weight_grads) -> (Tensor, Tensor, Tensor, Tensor)",
)


@_expert_swiglu.register_fake
def _(x: torch.Tensor, counts: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> tuple:
    rows, hidden = x.shape[0], w1.shape[1]
    host = torch.empty(counts.shape, dtype=torch.int64, device="cpu")
    return x.new_empty(rows, w2.shape[1]), x.new_empty(rows, hidden), x.new_empty(rows, hidden), host


@_expert_swiglu_backward.register_fake
def _(grad: torch.Tensor, x: torch.Tensor, sizes: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor,
      w2: torch.Tensor, h1: torch.Tensor, h3: torch.Tensor, input_grad: bool, weight_grads: bool) -> tuple:  # fmt: skip
    dx = h1.new_empty((h1.shape[0], w1.shape[2]) if input_grad else (0,))
    return (dx, *(torch.empty_like(w) if weight_grads else w.new_empty(0) for w in (w1, w3, w2)))


def _expert_swiglu_setup(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple) -> None:
    x, _, w1, w3, w2 = inputs
    _, h1, h3, sizes = output
    ctx.save_for_backward(_saved(x, any(w.requires_grad for w in (w1, w3, w2))), sizes, w1, w3, w2, h1, h3)


def _expert_swiglu_grads(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor, *_: torch.Tensor) -> tuple:
    needed = ctx.needs_input_grad
    dx, *dw = _expert_swiglu_backward(grad.contiguous(), *ctx.saved_tensors, needed[0], any(needed[2:]))
    return dx if needed[0] else None, None, *_weight_grads(needed[2:], tuple(dw))


_expert_swiglu.register_autograd(_expert_swiglu_grads, setup_context=_expert_swiglu_setup)


def expert_swiglu(
    x: torch.Tensor, counts: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """The routed experts' SwiGLU where torch._grouped_mm does not run: x [rows, dim] sorted by expert,
    counts [E] rows per expert -> [rows, dim]. Under torch.compile the op, in eager the Function."""
    if torch.compiler.is_compiling():
        return _expert_swiglu(x, counts, w1, w3, w2)[0]
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, w1, w3, w2))):
        return _swiglu_inference(x, counts, w1, w3, w2)
    return _ExpertSwiGLU.apply(x, counts, w1, w3, w2)


# torch's FlopCounterMode sees each op of ours as one call: these are the matmuls inside.
def _expert_swiglu_flops(x_shape: torch.Size, counts_shape: torch.Size, w1_shape: torch.Size, *_: object,
                         **__: object) -> int:  # fmt: skip
    return 3 * 2 * x_shape[0] * x_shape[1] * w1_shape[1]  # h1, h3 and the output, rows x dim x hidden each


def _expert_swiglu_backward_flops(grad_shape: torch.Size, x_shape: torch.Size, sizes_shape: torch.Size,
                                  w1_shape: torch.Size, *args: object, **__: object) -> int:  # fmt: skip
    input_grad, weight_grads = args[-2:]  # handed on as they are: not tensors. x may be empty: rows from grad.
    matmuls = 1 + 2 * bool(input_grad) + 3 * bool(weight_grads)  # d(silu(h1) * h3); d x; d w1, d w3, d w2
    return matmuls * 2 * grad_shape[0] * w1_shape[2] * w1_shape[1]


for _packet, _formula in (
    (torch.ops.torchrig.expert_swiglu, _expert_swiglu_flops),
    (torch.ops.torchrig.expert_swiglu_backward, _expert_swiglu_backward_flops),
):
    register_flop_formula(_packet)(_formula)
    if _packet not in flop_counter.flop_registry:  # torch 2.4 looks formulas up by packet but files them by overload
        flop_counter.flop_registry[_packet] = flop_counter.shape_wrapper(_formula)


class GroupedExperts(nn.Module):
    """The routed experts, each a SwiGLU (w2(silu(w1 x) * w3 x)), as three GroupedLinear layers.

    Stacked, so that all experts run in a few batched calls: ffn.experts.w1.weight is
    [n_experts, hidden, dim]. Exports and Hugging Face checkpoints hold one tensor per expert
    (ffn.experts.{i}.w1.weight, as the per-expert modules of earlier versions did):
    `split_experts` and `stack_experts` convert.
    """

    def __init__(self, n_experts: int, dim: int, hidden: int):
        super().__init__()
        self.sizes = (dim, hidden)
        self.w1 = GroupedLinear(n_experts, dim, hidden)
        self.w3 = GroupedLinear(n_experts, dim, hidden)
        self.w2 = GroupedLinear(n_experts, hidden, dim)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [rows, dim] sorted by expert, counts [n_experts] rows per expert -> [rows, dim]."""
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        if _grouped_mm_runs(x.device, dtype, self.sizes):
            offsets = counts.cumsum(0, dtype=torch.int32)
            x = x.to(dtype)  # autocast leaves torch._grouped_mm alone
            return self.w2(F.silu(self.w1(x, offsets)) * self.w3(x, offsets), offsets)
        # Elsewhere: the one host read of this layer, then expert by expert, each expert's three
        # matmuls while its rows are in cache (measured on the CPU: faster than three loops over all experts).
        if all(type(layer) is GroupedLinear for layer in (self.w1, self.w3, self.w2)):
            weights = (layer.weight.to(dtype) for layer in (self.w1, self.w3, self.w2))
            return expert_swiglu(x.to(dtype).contiguous(), counts, *weights)
        # An adapter on the experts (LoRA): its own function per expert.
        w1, w3, w2 = self.w1.per_expert(), self.w3.per_expert(), self.w2.per_expert()
        rows = x.split(counts.tolist())
        return torch.cat([w2[e](F.silu(w1[e](r)) * w3[e](r)) for e, r in enumerate(rows)])

    @torch.no_grad()
    def init_weights(self, std: float) -> None:
        """N(0, std), drawn expert by expert in the order of per-expert SwiGLU modules: the same seed
        gives the same weights as the earlier layout did."""
        for w1, w3, w2 in zip(self.w1.weight, self.w3.weight, self.w2.weight, strict=True):
            for weight in (w1, w3, w2):
                nn.init.normal_(weight, std=std)


class MoE(nn.Module):
    def __init__(self, cfg: DeepSeekConfig):
        super().__init__()
        self.n_routed_experts = cfg.n_routed_experts
        self.bias_update_speed = cfg.bias_update_speed
        self.router = Router(cfg)
        self.experts = GroupedExperts(cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim)
        self.shared_experts = (
            SwiGLU(cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim) if cfg.n_shared_experts else None
        )
        # Tokens routed to each expert since the last moe_balance_step; not checkpointed.
        self.register_buffer(
            "tokens_per_expert", torch.zeros(cfg.n_routed_experts, dtype=torch.int64), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [tokens, dim]
        weights, indices = self.router(x)  # [tokens, k] each
        chosen = indices.flatten()  # [tokens * k]: token t's choices at t*k .. t*k+k-1
        # Counted on the device (bincount's output size would depend on the data).
        counts = torch.zeros_like(self.tokens_per_expert).scatter_add_(0, chosen, torch.ones_like(chosen))
        if self.training and torch.is_grad_enabled():
            self.tokens_per_expert += counts

        # Sort the (token, choice) pairs by expert, so each expert's rows are one contiguous group.
        # Every expert is in the matmuls, with no rows if it got no tokens: each weight gets a (zero)
        # gradient every step, so DDP needs no find_unused_parameters and ranks never diverge.
        order = chosen.argsort(stable=True)
        token_of = order // indices.shape[1]
        expert_out = self.experts(x[token_of], counts)  # [tokens * k, dim]
        weighted = expert_out * weights.flatten()[order].unsqueeze(-1).to(expert_out.dtype)
        out = torch.zeros_like(x).index_add_(0, token_of, weighted.to(x.dtype))
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.view(shape)


class Block(nn.Module):
    def __init__(self, cfg: DeepSeekConfig, layer_id: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = MultiHeadLatentAttention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.dim, cfg.inter_dim) if cfg.is_dense_layer(layer_id) else MoE(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.ffn(self.ffn_norm(x))

    def forward_cached(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LatentKVCache, layer: int
    ) -> torch.Tensor:
        """forward() for x at cache.position.., attention through layer `layer` of the latent cache."""
        latent, rope_key = cache.layer(layer)
        x = x + self.attn.forward_absorbed(self.attn_norm(x), cos, sin, latent, rope_key, cache.position)
        return x + self.ffn(self.ffn_norm(x))


class MTPModule(nn.Module):
    """One multi-token-prediction depth: merge h_i with emb(t_{i+d}), run a block, predict t_{i+d+1}."""

    def __init__(self, cfg: DeepSeekConfig, layer_id: int):
        super().__init__()
        self.hidden_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.embed_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.proj = nn.Linear(2 * cfg.dim, cfg.dim, bias=False)
        self.block = Block(cfg, layer_id)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(
        self, hidden: torch.Tensor, next_embed: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden state for the next depth, its normed form for the shared output head).

        The norm runs here, inside forward, so that FSDP2 has this module's weights gathered.
        """
        merged = self.proj(torch.cat([self.hidden_norm(hidden), self.embed_norm(next_embed)], dim=-1))
        hidden = self.block(merged, cos, sin)
        return hidden, self.norm(hidden)

    def forward_cached(
        self, hidden: torch.Tensor, next_embed: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LatentKVCache
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """forward() at cache.position.. with a one-layer cache of this module's own attention; advances it."""
        merged = self.proj(torch.cat([self.hidden_norm(hidden), self.embed_norm(next_embed)], dim=-1))
        hidden = self.block.forward_cached(merged, cos, sin, cache, 0)
        cache.advance(hidden.shape[1])
        return hidden, self.norm(hidden)


class Transformer(nn.Module):
    def __init__(self, cfg: DeepSeekConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, layer_id) for layer_id in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPModule(cfg, cfg.n_layers + depth) for depth in range(cfg.mtp_depth))
        # Derived from the config, so not checkpointed.
        self.register_buffer("rope_cos", torch.empty(cfg.max_seq_len, cfg.qk_rope_head_dim // 2), persistent=False)
        self.register_buffer("rope_sin", torch.empty(cfg.max_seq_len, cfg.qk_rope_head_dim // 2), persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        cos, sin = rope_cache(self.cfg.qk_rope_head_dim, self.cfg.max_seq_len, self.cfg.rope_theta, Yarn.of(self.cfg))
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=self.cfg.init_std)
            elif isinstance(module, Router):
                nn.init.normal_(module.weight, std=self.cfg.init_std)
                if module.expert_bias is not None:
                    module.expert_bias.zero_()
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, GroupedExperts):
                module.init_weights(self.cfg.init_std)
            elif isinstance(module, MoE):
                module.tokens_per_expert.zero_()

    def forward(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor | None = None,
        divisors: torch.Tensor | None = None,
        parts: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """inputs [batch, seq] token ids -> logits [batch, seq, vocab], or the scalar loss given targets
        (IGNORE_INDEX targets not counted; divisors [1 + mtp_depth]: each term's sum over its divisor,
        train/models/loss.py).

        parts=True (the trainer's call): (loss, {"next_token_loss": the main head's cross-entropy}), the
        figure comparable with val_loss; the loss adds the weighted MTP term to it.
        """
        cos, sin = self.rope_cos, self.rope_sin
        hidden = self.embed(inputs)
        for layer in self.layers:
            hidden = layer(hidden, cos, sin)
        logits = self.head(self.norm(hidden))
        if targets is None:
            return logits
        next_token = token_loss(logits, targets, None if divisors is None else divisors[0])
        loss = next_token + self.mtp_loss(hidden, inputs, targets, divisors)
        return (loss, {"next_token_loss": next_token.detach()}) if parts else loss

    def import_state_dict(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """`state`, keyed by this model's parameter names in either expert layout, in the layout this model
        holds (stacked): for exports and checkpoints written with one tensor per expert, the model's
        weights or an optimizer's per-parameter state alike (see stack_experts)."""
        return stack_experts(state, like=dict(self.named_parameters()))

    @property
    def max_seq_len(self) -> int:
        return self.cfg.max_seq_len

    @property
    def can_draft(self) -> bool:
        """Drafting needs an MTP module (model.mtp_depth >= 1)."""
        return len(self.mtp) > 0

    def new_cache(self, batch: int = 1, dtype: torch.dtype | None = None) -> LatentKVCache:
        """An empty latent cache of max_seq_len positions for the main model's layers."""
        return self._cache(self.cfg.n_layers, batch, dtype)

    def new_draft_cache(self, batch: int = 1, dtype: torch.dtype | None = None) -> LatentKVCache:
        """An empty one-layer cache for the first MTP module's attention (draft_cached)."""
        return self._cache(1, batch, dtype)

    def _cache(self, layers: int, batch: int, dtype: torch.dtype | None) -> LatentKVCache:
        return LatentKVCache(
            self.cfg, layers, batch, device=self.embed.weight.device, dtype=dtype or self.embed.weight.dtype
        )

    def forward_cached(self, inputs: torch.Tensor, cache: LatentKVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """inputs [batch, seq] at positions cache.position.. -> (logits, last hidden state before the norm).

        Prefill is one call with the prompt, decoding one call per new token (or per verified
        draft); the cache advances by seq. The hidden state is what the MTP module drafts from.
        """
        hidden = self.embed(inputs)
        for index, layer in enumerate(self.layers):
            hidden = layer.forward_cached(hidden, self.rope_cos, self.rope_sin, cache, index)
        cache.advance(inputs.shape[1])
        return self.head(self.norm(hidden)), hidden

    def draft_cached(self, hidden: torch.Tensor, next_tokens: torch.Tensor, cache: LatentKVCache) -> torch.Tensor:
        """The first MTP depth at cache.position..: logits for token i+2 from h_i and token i+1.

        hidden: the main model's hidden states at those positions; next_tokens: the tokens that
        followed them; cache: the draft cache (new_draft_cache) at the same positions.
        """
        _, normed = self.mtp[0].forward_cached(hidden, self.embed(next_tokens), self.rope_cos, self.rope_sin, cache)
        return self.head(normed)

    def mtp_loss(
        self, hidden: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, divisors: torch.Tensor | None = None
    ) -> torch.Tensor:
        """mtp_weight times the mean over depths d of the loss predicting token i+d+1 at position i.

        inputs[:, j] is token j, so emb(t_{i+d}) is embed(inputs[:, i+d]) (never the targets, which masked
        data marks IGNORE_INDEX), and the label is targets[:, i+d]; depth d has seq-d positions.
        """
        if not self.mtp:
            return hidden.new_zeros(())
        seq_len = targets.shape[1]
        losses = []
        for depth, module in enumerate(self.mtp, 1):  # positional: dynamo 2.4 breaks the graph on start=
            positions = seq_len - depth
            next_embed = self.embed(inputs[:, depth : depth + positions])
            hidden, normed = module(hidden[:, :positions], next_embed, self.rope_cos, self.rope_sin)
            logits = self.head(normed)
            divisor = None if divisors is None else divisors[depth]
            losses.append(token_loss(logits, targets[:, depth : depth + positions], divisor))
        return self.cfg.mtp_weight * torch.stack(losses).mean()


@torch.no_grad()
def moe_balance_step(model: nn.Module, all_reduce: AllReduce | None = None) -> dict[str, torch.Tensor]:
    """Auxiliary-loss-free balancing, once per optimizer step on every rank.

    Sums every MoE layer's token counts over ranks with ONE call of `all_reduce` (an in-place SUM;
    None for a single process), then moves each expert's bias by bias_update_speed toward balance:
    up for experts below the layer's mean load, down for those above. Counts restart at zero.
    Returns the most and least loaded expert's load relative to its layer's mean, over all layers, as
    0-dim tensors: nothing here waits for the device, so callers read them only when they log (NaN
    when a layer routed no tokens since the last call).
    Works on wrapped models (DDP, FSDP): layers are found through model.modules(). Under DDP use
    broadcast_buffers=False: counts are per rank, and the bias gets the same update on every rank.
    """
    moe_layers = [module for module in model.modules() if isinstance(module, MoE)]
    if not moe_layers:
        return {}
    counts = torch.cat([layer.tokens_per_expert for layer in moe_layers])
    if all_reduce is not None:
        all_reduce(counts)
    per_layer = counts.view(len(moe_layers), -1).float()
    mean = per_layer.mean(dim=1, keepdim=True)
    for layer, layer_counts, layer_mean in zip(moe_layers, per_layer, mean, strict=True):
        if layer.router.expert_bias is not None:  # softmax routing (V2) has no bias: its load is only reported
            layer.router.expert_bias += layer.bias_update_speed * torch.sign(layer_mean - layer_counts)
        layer.tokens_per_expert.zero_()
    load = per_layer / mean
    return {"moe_load_max": load.max(), "moe_load_min": load.min()}


# ---------------------------------------------------------------------------------------------
# The experts' two layouts: stacked in memory (GroupedExperts), one tensor per expert on disk
# (exports, Hugging Face checkpoints, and the checkpoints of versions before the stacking).

_STACKED_EXPERT = re.compile(r"(?P<experts>(?:.*\.)?experts)\.(?P<weight>w[123]\.weight)")
_PER_EXPERT = re.compile(r"(?P<experts>(?:.*\.)?experts)\.(?P<index>\d+)\.(?P<weight>w[123]\.weight)")


def split_experts(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with each stacked `...experts.w1.weight` [E, out, in] as E tensors `...experts.{i}.w1.weight`.

    Each expert's tensor is a copy of its own (safetensors refuses tensors that share memory);
    every other entry passes unchanged.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        match = _STACKED_EXPERT.fullmatch(key)
        if match is None:
            out[key] = value
            continue
        for index, weight in enumerate(value.unbind(0)):
            out[f"{match['experts']}.{index}.{match['weight']}"] = weight.clone()
    return out


def stack_experts(state: Mapping[str, Any], like: Mapping[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """The inverse of split_experts, on any dict keyed by parameter name: the entries of experts
    0..E-1 become one entry of the stacked name, in the place of the first.

    Values may be tensors (a state dict), an optimizer's per-parameter state (a dict: tensors of the
    weight's shape are stacked, AdamW's step and other scalars taken from expert 0) or anything else
    (taken from expert 0). `like`: this model's tensors by name; where one is a DTensor (FSDP2), the
    stacked value is distributed as it is. Entries already stacked pass unchanged, and so do the
    entries of experts whose numbering has a gap, for the loader to name.
    """
    out: dict[str, Any] = {}
    groups: dict[str, dict[int, tuple[str, Any]]] = {}
    for key, value in state.items():
        match = _PER_EXPERT.fullmatch(key)
        if match is None:
            out[key] = value
            continue
        stacked = f"{match['experts']}.{match['weight']}"
        out.setdefault(stacked, None)
        groups.setdefault(stacked, {})[int(match["index"])] = (key, value)
    for stacked, experts in groups.items():
        if sorted(experts) == list(range(len(experts))):
            out[stacked] = _stacked([experts[i][1] for i in range(len(experts))], (like or {}).get(stacked))
        else:
            del out[stacked]
            out.update(experts.values())
    return out


def _stacked(values: list[Any], like: torch.Tensor | None) -> Any:
    first = values[0]
    if isinstance(first, dict):
        return {name: _stacked([value[name] for value in values], like) for name in first}
    if not (isinstance(first, torch.Tensor) and first.dim() > 0):
        return first
    stacked = torch.stack(values)
    if like is None or not hasattr(like, "device_mesh"):
        return stacked
    from torch.distributed._tensor import distribute_tensor  # torch 2.4's path; later versions keep it

    return distribute_tensor(stacked.to(like.device), like.device_mesh, like.placements)


# ---------------------------------------------------------------------------------------------
# The config: the model.* checks (train.config.validate_model runs them through SPEC).


def validate_decoder(m: DeepSeekConfig) -> None:
    """The decoder's model.* checks, each a ConfigError with the fix (the config runs them before every build)."""
    sizes = {
        "dim": m.dim,
        "n_layers": m.n_layers,
        "n_heads": m.n_heads,
        "vocab_size": m.vocab_size,
        "max_seq_len": m.max_seq_len,
        "inter_dim": m.inter_dim,
        "kv_lora_rank": m.kv_lora_rank,
        "qk_nope_head_dim": m.qk_nope_head_dim,
        "v_head_dim": m.v_head_dim,
    }
    if m.n_routed_experts:
        sizes |= {
            "moe_inter_dim": m.moe_inter_dim,
            "n_activated_experts": m.n_activated_experts,
            "n_expert_groups": m.n_expert_groups,
            "n_limited_groups": m.n_limited_groups,
        }
    require_positive({f"model.{key}": value for key, value in sizes.items()})
    if m.max_seq_len > MAX_SEQ_LEN:
        raise ConfigError(f"model.max_seq_len={m.max_seq_len} exceeds {MAX_SEQ_LEN:,}; lower it")
    if m.n_layers + m.mtp_depth > MAX_LAYERS:
        raise ConfigError(f"model.n_layers + model.mtp_depth = {m.n_layers + m.mtp_depth} exceeds {MAX_LAYERS}")
    if m.n_routed_experts > MAX_EXPERTS:
        raise ConfigError(f"model.n_routed_experts={m.n_routed_experts:,} exceeds {MAX_EXPERTS:,}; lower it")
    if m.qk_rope_head_dim < 2 or m.qk_rope_head_dim % 2:
        raise ConfigError(
            f"model.qk_rope_head_dim={m.qk_rope_head_dim} must be even and at least 2 (RoPE rotates pairs)"
        )
    if m.n_routed_experts:
        if m.n_activated_experts > m.n_routed_experts:
            raise ConfigError("model.n_activated_experts exceeds model.n_routed_experts; lower it")
        if m.n_routed_experts % m.n_expert_groups:
            raise ConfigError("model.n_routed_experts must divide evenly into model.n_expert_groups")
        if m.n_limited_groups > m.n_expert_groups:
            raise ConfigError("model.n_limited_groups exceeds model.n_expert_groups; lower it")
        reachable = m.n_routed_experts // m.n_expert_groups * m.n_limited_groups
        if m.n_activated_experts > reachable:
            raise ConfigError(
                f"model.n_activated_experts={m.n_activated_experts} exceeds the {reachable} experts that "
                "model.n_limited_groups groups hold; raise n_limited_groups or lower n_activated_experts"
            )
    validate_yarn(m)


def validate_yarn(m: DeepSeekConfig) -> None:
    """The YaRN keys: sensible values, and a rope_factor that takes effect (DeepSeek's condition, see Yarn)."""
    if not m.rope_factor >= 1:
        raise ConfigError(f"model.rope_factor={m.rope_factor} must be at least 1 (1 is plain RoPE, YaRN above)")
    require_positive({"model.original_seq_len": m.original_seq_len})
    if not 0 < m.beta_slow < m.beta_fast:
        raise ConfigError(
            f"model.beta_slow={m.beta_slow} and model.beta_fast={m.beta_fast} must satisfy 0 < beta_slow < beta_fast "
            "(DeepSeek: 1 and 32)"
        )
    for key in ("mscale", "mscale_all_dim"):
        if not getattr(m, key) >= 0:
            raise ConfigError(f"model.{key}={getattr(m, key)} must be 0 or more (DeepSeek-V3: 1)")
    if m.rope_factor > 1 and m.max_seq_len <= m.original_seq_len:
        raise ConfigError(
            f"model.rope_factor={m.rope_factor} has no effect: YaRN applies only when model.max_seq_len "
            f"({m.max_seq_len}) exceeds model.original_seq_len ({m.original_seq_len}), as in DeepSeek's code; "
            "raise max_seq_len, lower original_seq_len, or set rope_factor=1"
        )


# ---------------------------------------------------------------------------------------------
# The counts from the config alone, block by block as the classes above build them, and SPEC.


@dataclass(frozen=True)
class _Block:
    """One transformer block's parameters: matmul weights (all, and those one token uses) and norms."""

    matmul_total: int
    matmul_active: int
    norms: int


def _swiglu(dim: int, hidden: int) -> int:
    return 3 * dim * hidden


def _attention(m: DeepSeekConfig) -> _Block:
    qk_head_dim = m.qk_nope_head_dim + m.qk_rope_head_dim
    if m.q_lora_rank == 0:
        query, query_norm = m.dim * m.n_heads * qk_head_dim, 0
    else:
        query, query_norm = (m.dim + m.n_heads * qk_head_dim) * m.q_lora_rank, m.q_lora_rank
    kv_down = m.dim * (m.kv_lora_rank + m.qk_rope_head_dim)
    kv_up = m.kv_lora_rank * m.n_heads * (m.qk_nope_head_dim + m.v_head_dim)
    out = m.n_heads * m.v_head_dim * m.dim
    matmul = query + kv_down + kv_up + out
    return _Block(matmul, matmul, query_norm + m.kv_lora_rank)


def _feed_forward(m: DeepSeekConfig, layer_id: int) -> _Block:
    if m.is_dense_layer(layer_id):
        dense = _swiglu(m.dim, m.inter_dim)
        return _Block(dense, dense, 0)
    expert = _swiglu(m.dim, m.moe_inter_dim)
    always = m.n_routed_experts * m.dim + m.n_shared_experts * expert  # router + shared experts
    return _Block(always + m.n_routed_experts * expert, always + m.n_activated_experts * expert, 0)


def _block(m: DeepSeekConfig, layer_id: int) -> _Block:
    attention, ffn = _attention(m), _feed_forward(m, layer_id)
    return _Block(
        attention.matmul_total + ffn.matmul_total,
        attention.matmul_active + ffn.matmul_active,
        attention.norms + 2 * m.dim,
    )


def _mtp_module(m: DeepSeekConfig, depth: int) -> _Block:
    block = _block(m, m.n_layers + depth)
    merge = 2 * m.dim * m.dim
    return _Block(block.matmul_total + merge, block.matmul_active + merge, block.norms + 3 * m.dim)


def _blocks(m: DeepSeekConfig) -> list[_Block]:
    return [_block(m, i) for i in range(m.n_layers)] + [_mtp_module(m, d) for d in range(m.mtp_depth)]


def decoder_params(cfg: DeepSeekConfig) -> ParamCount:
    """The decoder's counts, block by block as Transformer builds it."""
    blocks = _blocks(cfg)
    embedding = cfg.vocab_size * cfg.dim
    head_and_final_norm = cfg.dim * cfg.vocab_size + cfg.dim
    total = embedding + head_and_final_norm + sum(b.matmul_total + b.norms for b in blocks)
    active = head_and_final_norm + sum(b.matmul_active + b.norms for b in blocks)
    return ParamCount(total=total, active=active, embedding=embedding)


def decoder_flops_per_token(cfg: DeepSeekConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token of the decoder.

        6 * N_matmul  +  6 * seq_len * n_heads * (qk_nope + qk_rope + v_head_dim) * n_blocks

    N_matmul counts the weights one token multiplies by: attention projections, the router,
    shared and top-k routed experts (or the dense SwiGLU), MTP merge projections and the output
    head once per prediction (1 + mtp_depth times). Not the embedding lookup, norms or elementwise
    work. 6 = 2 FLOPs per multiply-add x (1 forward + 2 backward). The second term is the score
    (QK^T, head dim qk_nope + qk_rope) and value (AV, head dim v) matmuls of every attention
    block, main and MTP, over the full seq_len x seq_len square: the PaLM / nanoGPT / torchtitan
    convention, so MFU figures compare across those tools (causal kernels skip about half of it).
    MTP blocks see slightly shorter sequences; counting them at seq_len overstates by < depth/seq_len.
    """
    blocks = _blocks(cfg)
    head = cfg.dim * cfg.vocab_size * (1 + cfg.mtp_depth)
    matmul = head + sum(b.matmul_active for b in blocks)
    attention = seq_len * cfg.n_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim)
    return 6.0 * matmul + 6.0 * attention * len(blocks)


def flops_per_sample(cfg: DeepSeekConfig, seq_len: int) -> float:
    """A sample is a sequence of seq_len tokens."""
    return decoder_flops_per_token(cfg, seq_len) * seq_len


# ---------------------------------------------------------------------------------------------
# What the forward keeps for the backward, per token, as the classes above compute (train/models/activations.py).
# RMSNorm casts its input to float32 twice (one `.float()` for the statistics, one for the product).


def _attention_kept(m: DeepSeekConfig, seq_len: int, dt: Setting) -> float:
    """MultiHeadLatentAttention.forward from its input: the projections' inputs, the query and latent norms,
    and the attention itself (v a view of wkv_b's output, keys and values per head)."""
    query = 0.0
    if m.q_lora_rank:  # q_norm normalises wq_a's output (compute dtype); wq_b reads its params-dtype output
        query = rms_norm(m.q_lora_rank, dt.compute, dt.trains("attn.q_norm"), 2)
        query += dt.matmul_inputs(m.q_lora_rank, "attn.wq_b")
    inputs = dt.matmul_inputs(m.dim, "attn.wq_a" if m.q_lora_rank else "attn.wq", "attn.wkv_a")
    storage = m.kv_lora_rank + m.qk_rope_head_dim  # kv_latent is a slice of wkv_a's output
    latent = rms_norm(m.kv_lora_rank, dt.compute, dt.trains("attn.kv_norm"), 2, storage)
    latent += dt.matmul_inputs(m.kv_lora_rank, "attn.wkv_b")
    qk_dim, values = m.qk_nope_head_dim + m.qk_rope_head_dim, m.n_heads * (m.qk_nope_head_dim + m.v_head_dim)
    return inputs + query + latent + attention_core(m.n_heads, qk_dim, m.v_head_dim, seq_len, dt, values, "attn.wo")


def _swiglu_kept(dim: int, hidden: int, dt: Setting, prefix: str) -> float:
    return dt.matmul_inputs(dim, f"{prefix}.w1", f"{prefix}.w3") + swiglu_inner(hidden, dt, f"{prefix}.w2")


def _experts_run_as_op(m: DeepSeekConfig, dt: Setting) -> bool:
    """Whether GroupedExperts.forward runs expert_swiglu (else autograd through grouped_linear, or through an
    adapter's per-expert functions) on dt's device and compute dtype."""
    if any(dt.adapted(f"ffn.experts.{w}") for w in ("w1", "w2", "w3")):
        return False
    dtype = torch.float32 if dt.compute == FP32 else torch.bfloat16
    here = dt.device == "cuda" and torch.cuda.is_available()
    return not _grouped_mm_takes(dt.device, dtype, (m.dim, m.moe_inter_dim), lambda: _cuda_major(0) if here else None)


def _moe_kept(m: DeepSeekConfig, dt: Setting) -> float:
    """MoE.forward from its input: the router's scores and choices, the tokens sorted by expert, the experts,
    the weighted sum, and the shared experts (which read the input with the router)."""
    k, groups = m.n_activated_experts, m.n_expert_groups
    router = dt.matmul_inputs(m.dim, "ffn.router") + m.n_routed_experts * FP32  # its input, sigmoid scores
    router += k * INDEX + FP32  # the chosen experts, the gate weights' sum
    if groups > 1:  # each group's top-2 indices, the chosen groups, the mask of the others
        router += groups * min(2, m.n_routed_experts // groups) * INDEX + m.n_limited_groups * INDEX + groups
    experts = 2 * k * INDEX  # the token and the slot order
    if _experts_run_as_op(m, dt):  # the sorted rows (cast once), h1 and h3
        trains = any(dt.trains(f"ffn.experts.{w}") for w in ("w1", "w2", "w3"))
        experts += k * (m.dim * dt.compute * trains + 2 * m.moe_inter_dim * dt.compute)
    else:
        experts += k * _swiglu_kept(m.dim, m.moe_inter_dim, dt, "ffn.experts")
    combine = k * (m.dim * dt.compute + dt.compute + m.dim * dt.params)  # outputs, gate weights, index_add's source
    if not m.n_shared_experts:
        return router + experts + combine
    shared = _swiglu_kept(m.dim, m.n_shared_experts * m.moe_inter_dim, dt, "ffn.shared_experts")
    if not dt.casts and dt.trains("ffn.router") and dt.trains("ffn.shared_experts.w1"):
        shared -= m.dim * dt.compute  # the router keeps the same input tensor
    return router + experts + combine + shared


def _block_unit(
    m: DeepSeekConfig, layer_id: int, seq_len: int, dt: Setting, residual: int, inputs: float, extra: float = 0.0
) -> Unit:
    """A Block per token, times seq_len: `residual` the bytes per number of its input, `inputs` what full
    checkpointing keeps, `extra` what else the unit holds around the block (an MTP module's norms and merge
    projection). Selective recomputes the feed-forward and keeps its input, the norm's (params-dtype) output."""
    norms = rms_norm(m.dim, residual, dt.trains("attn_norm"), 2) + rms_norm(m.dim, residual, dt.trains("ffn_norm"), 2)
    rest = extra + norms + _attention_kept(m, seq_len, dt)
    ffn = _swiglu_kept(m.dim, m.inter_dim, dt, "ffn") if m.is_dense_layer(layer_id) else _moe_kept(m, dt)
    return Unit(
        kept=seq_len * (rest + ffn),
        inputs=seq_len * inputs,
        selective=seq_len * (rest + m.dim * dt.params),
    )


def decoder_activations(cfg: DeepSeekConfig, seq_len: int, dt: Setting) -> Activations:
    """Bytes one sample of seq_len tokens keeps for the backward: every block (a unit of checkpointing), and
    the embedding lookup, the final norm, the head and the loss of every prediction depth outside them."""
    m, p, c = cfg, dt.params, dt.compute
    units = [_block_unit(m, i, seq_len, dt, p, m.dim * p) for i in range(m.n_layers)]
    head = dt.matmul_inputs(m.dim, "head") + m.vocab_size * FP32  # the head's input, the log-probabilities
    outside = seq_len * (2 * INDEX + rms_norm(m.dim, p, dt.trains("norm"), 2) + head)  # inputs, targets, final norm
    for depth in range(1, m.mtp_depth + 1):
        # An MTP module normalises the hidden state (whose float32 form, with float32 parameters, the final norm
        # keeps already) and the next tokens' embeddings, merges them (the block's residual is the merge
        # projection's output, in the compute dtype) and normalises the block's output.
        hidden_norm = rms_norm(m.dim, p, dt.trains("hidden_norm"), 2) - (m.dim * FP32 if p == FP32 else 0)
        embed_norm = rms_norm(m.dim, p, dt.trains("embed_norm"), 2)
        merge = (
            hidden_norm + embed_norm + dt.matmul_inputs(2 * m.dim, "proj") + rms_norm(m.dim, c, dt.trains("norm"), 2)
        )
        inputs = m.dim * p * (1 if p == FP32 else 2)  # the embedded next tokens (and the hidden state)
        units.append(_block_unit(m, m.n_layers + depth - 1, seq_len - depth, dt, c, inputs, merge))
        outside += (seq_len - depth) * head
    return Activations(tuple(units), outside)


def _ffn_modules(m: DeepSeekConfig, layer_id: int) -> int:
    if m.is_dense_layer(layer_id):
        return 4  # SwiGLU: itself, w1, w2, w3
    shared = 4 if m.n_shared_experts else 0
    return 6 + shared  # MoE, router, the stacked experts and their three GroupedLinear layers


def _block_modules(m: DeepSeekConfig, layer_id: int) -> int:
    query = 1 if m.q_lora_rank == 0 else 3  # wq, or wq_a + q_norm + wq_b
    attention = 1 + query + 4  # MLA, its query, wkv_a, kv_norm, wkv_b, wo
    return 3 + attention + _ffn_modules(m, layer_id)  # Block, attn_norm, ffn_norm


def decoder_modules(cfg: DeepSeekConfig) -> int:
    """The nn.Modules Transformer(cfg) builds, counted from the config alone."""
    main = sum(_block_modules(cfg, i) for i in range(cfg.n_layers))
    mtp = sum(5 + _block_modules(cfg, cfg.n_layers + d) for d in range(cfg.mtp_depth))  # + norms, proj
    return 6 + main + mtp  # Transformer, embed, layers, norm, head, mtp


def _block_activations(m: DeepSeekConfig, layer_id: int) -> int:
    """Numbers per token one block keeps for its backward, at least: its input (the norm's), the attention's
    q, k, v and output, and the feed-forward's two projections and their product; of each routed slot, its two
    projections (all that expert_swiglu keeps) and its output (which the gate weight multiplies)."""
    attention = m.n_heads * (2 * (m.qk_nope_head_dim + m.qk_rope_head_dim) + 2 * m.v_head_dim)
    if m.is_dense_layer(layer_id):
        ffn = 3 * m.inter_dim
    else:
        ffn = m.n_activated_experts * (m.dim + 2 * m.moe_inter_dim) + 3 * m.n_shared_experts * m.moe_inter_dim
    return m.dim + attention + ffn


def activations_floor(cfg: DeepSeekConfig, seq_len: int, training: bool) -> float:
    """Numbers a sample of seq_len tokens holds at once, a lower bound (train/memory_bound.py): training keeps
    every block's (_block_activations) and the logits of every prediction depth; a forward without gradients
    holds the logits and one block's input at a time."""
    logits = cfg.vocab_size * (1 + (cfg.mtp_depth if training else 0))
    if not training:
        return float(seq_len) * (logits + cfg.dim)
    blocks = [_block_activations(cfg, i) for i in range(cfg.n_layers + cfg.mtp_depth)]
    return float(seq_len) * (logits + sum(blocks))


def freeze_balancing(model: nn.Module) -> None:
    """A frozen base's routing stays as loaded: the balancing biases stop moving (the loads are still reported)."""
    for module in model.modules():
        if isinstance(module, MoE):
            module.bias_update_speed = 0.0


def shard_units(model: nn.Module) -> list[nn.Module]:
    """Each block, main and multi-token prediction: one all-gather per block in forward and backward."""
    return [*model.layers, *model.mtp]


def selective_units(model: nn.Module) -> list[nn.Module]:
    """What train.activation_checkpointing=selective recomputes: each block's feed-forward, which keeps the most
    bytes per FLOP of recompute (python -m train.benchmarks.plan measures it against the attention)."""
    return [block.ffn for block in [*model.layers, *(module.block for module in model.mtp)]]


SPEC = ModelSpec(
    name="deepseek",
    config=DeepSeekConfig,
    build=Transformer,
    count_params=decoder_params,
    flops_per_sample=flops_per_sample,
    count_modules=decoder_modules,
    activations=activations_floor,
    inputs="tokens",
    shard_units=shard_units,
    validate=validate_decoder,
    seq_len_limit="max_seq_len",
    loss_parts=("next_token_loss",),
    after_step=moe_balance_step,
    loss_terms=lambda cfg: 1 + cfg.mtp_depth,  # the next token, then one term per MTP depth
    selective_units=selective_units,
    lora_targets=("wq", "wq_a", "wq_b", "wkv_a", "wkv_b", "wo"),
    freeze_state=freeze_balancing,
    saved_for_backward=decoder_activations,
    decoder=lambda model: model,  # Transformer is a Decoder itself
    hf=hf_deepseek.MAPPING,  # deepseek_v3 (sigmoid routing) and deepseek_v2 (softmax) in transformers
)
