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
  the top-k tokens by sigmoid affinity. Group-limited routing first keeps the best
  n_limited_groups expert groups. Experts and dense layers are `SwiGLU`; `Block` is one layer.
- Auxiliary-loss-free balancing (2.1.2): a per-expert bias is added to the affinities only to
  choose experts; after each optimizer step `moe_balance_step` nudges it toward the experts that
  got fewer tokens than average.
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
counts from the config alone, block by block as the classes above build it (tests/test_flops.py
checks them against a built model, torch's FLOP counter and DeepSeek-V2-Lite's published size);
and SPEC.

Initialisation: the constructor draws every weight from the global torch RNG (N(0, init_std),
norms at 1), so `torch.manual_seed(seed)` before `train.models.build_model(cfg)` makes it deterministic.
`model.init_weights()` re-draws the same way (e.g. after materialising a meta-device model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from train.config import ModelConfig
from train.errors import ConfigError, require_positive
from train.models.spec import AllReduce, ModelSpec, ParamCount

# More layers than any model this rig trains (DeepSeek-V3 has 61): a bigger figure is a typo, and
# counting its parameters alone would take minutes.
MAX_LAYERS = 4096
# A context far past any this rig trains (DeepSeek-V3: 128K); sampling's cache is sized by it.
MAX_SEQ_LEN = 1 << 20


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
    """Factor on the normalised gate weights of the routed experts."""
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


def rope_cache(rope_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles, each [max_seq_len, rope_dim / 2]."""
    inv_freq = 1.0 / theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


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
        self.softmax_scale = 1.0 / math.sqrt(self.qk_head_dim)

        if cfg.q_lora_rank == 0:
            self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.qk_head_dim, bias=False)
        else:
            self.wq_a = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
            self.wq_b = nn.Linear(cfg.q_lora_rank, cfg.n_heads * self.qk_head_dim, bias=False)
        # One down-projection yields the KV latent and the shared rotary key.
        self.wkv_a = nn.Linear(cfg.dim, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, cfg.norm_eps)
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


class LatentKVCache:
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

    def advance(self, count: int) -> None:
        if self.position + count > self.capacity:
            raise ValueError(f"the cache holds {self.capacity} positions; {self.position} + {count} do not fit")
        self.position += count

    def rollback(self, position: int) -> None:
        if not 0 <= position <= self.position:
            raise ValueError(f"cannot roll back to position {position} from {self.position}")
        self.position = position

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


class Router(nn.Module):
    """Sigmoid affinities, bias-adjusted group-limited top-k choice, normalised gate weights."""

    def __init__(self, cfg: DeepSeekConfig):
        super().__init__()
        self.top_k = cfg.n_activated_experts
        self.n_groups = cfg.n_expert_groups
        self.n_limited_groups = cfg.n_limited_groups
        self.route_scale = cfg.route_scale
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))
        # Persistent (checkpointed) and float32: updates of ~1e-3 vanish in bf16.
        self.register_buffer("expert_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [tokens, dim] -> (gate weights [tokens, k] float32, expert indices [tokens, k])."""
        scores = F.linear(x, self.weight).float().sigmoid()
        choice = scores + self.expert_bias  # the bias steers the choice, never the weights
        if self.n_groups > 1:
            choice = self.keep_best_groups(choice)
        indices = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(-1, indices)
        weights = weights / weights.sum(dim=-1, keepdim=True) * self.route_scale
        return weights, indices

    def keep_best_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """Mask every expert outside the n_limited_groups groups with the highest top-2 score sums."""
        grouped = choice.view(choice.shape[0], self.n_groups, -1)
        group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)
        best_groups = group_scores.topk(self.n_limited_groups, dim=-1).indices
        dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, False)
        return grouped.masked_fill(dropped.unsqueeze(-1), float("-inf")).flatten(1)


class MoE(nn.Module):
    def __init__(self, cfg: DeepSeekConfig):
        super().__init__()
        self.n_routed_experts = cfg.n_routed_experts
        self.bias_update_speed = cfg.bias_update_speed
        self.router = Router(cfg)
        self.experts = nn.ModuleList(SwiGLU(cfg.dim, cfg.moe_inter_dim) for _ in range(cfg.n_routed_experts))
        self.shared_experts = (
            SwiGLU(cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim) if cfg.n_shared_experts else None
        )
        # Tokens routed to each expert since the last moe_balance_step; not checkpointed.
        self.register_buffer(
            "tokens_per_expert", torch.zeros(cfg.n_routed_experts, dtype=torch.int64), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, indices = self.router(x)
        counts = torch.bincount(indices.flatten(), minlength=self.n_routed_experts)
        if self.training and torch.is_grad_enabled():
            self.tokens_per_expert += counts

        # Sort the (token, slot) assignments by expert so each expert reads one contiguous slice.
        order = indices.flatten().argsort()
        token_of = order // indices.shape[1]
        slices = x[token_of].split(counts.tolist())
        # Every expert runs, on an empty slice if it got no tokens, so each weight gets a (zero)
        # gradient every step: DDP needs no find_unused_parameters and ranks never diverge.
        expert_out = torch.cat([expert(tokens) for expert, tokens in zip(self.experts, slices, strict=True)])
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
        cos, sin = rope_cache(self.cfg.qk_rope_head_dim, self.cfg.max_seq_len, self.cfg.rope_theta)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=self.cfg.init_std)
            elif isinstance(module, Router):
                nn.init.normal_(module.weight, std=self.cfg.init_std)
                module.expert_bias.zero_()
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, MoE):
                module.tokens_per_expert.zero_()

    def forward(
        self, inputs: torch.Tensor, targets: torch.Tensor | None = None, parts: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """inputs [batch, seq] token ids -> logits [batch, seq, vocab], or the scalar loss given targets.

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
        next_token = cross_entropy(logits, targets)
        loss = next_token + self.mtp_loss(hidden, targets)
        return (loss, {"next_token_loss": next_token.detach()}) if parts else loss

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

    def mtp_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """mtp_weight times the mean over depths d of the loss predicting token i+d+1 at position i.

        targets[:, j] is token j+1, so emb(t_{i+d}) is embed(targets[:, i+d-1]) and the label is
        targets[:, i+d]; depth d has seq-d positions.
        """
        if not self.mtp:
            return hidden.new_zeros(())
        seq_len = targets.shape[1]
        losses = []
        for depth, module in enumerate(self.mtp, start=1):
            positions = seq_len - depth
            next_embed = self.embed(targets[:, depth - 1 : depth - 1 + positions])
            hidden, normed = module(hidden[:, :positions], next_embed, self.rope_cos, self.rope_sin)
            logits = self.head(normed)
            losses.append(cross_entropy(logits, targets[:, depth : depth + positions]))
        return self.cfg.mtp_weight * torch.stack(losses).mean()


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten())


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
        layer.router.expert_bias += layer.bias_update_speed * torch.sign(layer_mean - layer_counts)
        layer.tokens_per_expert.zero_()
    load = per_layer / mean
    return {"moe_load_max": load.max(), "moe_load_min": load.min()}


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


def _ffn_modules(m: DeepSeekConfig, layer_id: int) -> int:
    if m.is_dense_layer(layer_id):
        return 4  # SwiGLU: itself, w1, w2, w3
    shared = 4 if m.n_shared_experts else 0
    return 3 + 4 * m.n_routed_experts + shared  # MoE, router, the experts' ModuleList, each expert's SwiGLU


def _block_modules(m: DeepSeekConfig, layer_id: int) -> int:
    query = 1 if m.q_lora_rank == 0 else 3  # wq, or wq_a + q_norm + wq_b
    attention = 1 + query + 4  # MLA, its query, wkv_a, kv_norm, wkv_b, wo
    return 3 + attention + _ffn_modules(m, layer_id)  # Block, attn_norm, ffn_norm


def decoder_modules(cfg: DeepSeekConfig) -> int:
    """The nn.Modules Transformer(cfg) builds, counted from the config alone (each routed expert is four)."""
    main = sum(_block_modules(cfg, i) for i in range(cfg.n_layers))
    mtp = sum(5 + _block_modules(cfg, cfg.n_layers + d) for d in range(cfg.mtp_depth))  # + norms, proj
    return 6 + main + mtp  # Transformer, embed, layers, norm, head, mtp


def _block_activations(m: DeepSeekConfig, layer_id: int) -> int:
    """Numbers per token one block keeps for its backward, at least: its input (the norm's), the attention's
    q, k, v and output, and the feed-forward's two projections and their product (each routed slot's too)."""
    attention = m.n_heads * (2 * (m.qk_nope_head_dim + m.qk_rope_head_dim) + 2 * m.v_head_dim)
    if m.is_dense_layer(layer_id):
        ffn = 3 * m.inter_dim
    else:
        ffn = m.n_activated_experts * (m.dim + 3 * m.moe_inter_dim) + 3 * m.n_shared_experts * m.moe_inter_dim
    return m.dim + attention + ffn


def decoder_activations(cfg: DeepSeekConfig, seq_len: int, training: bool) -> float:
    """Numbers a sample of seq_len tokens holds at once, a lower bound (train/memory_bound.py): training keeps
    every block's (_block_activations) and the logits of every prediction depth; a forward without gradients
    holds the logits and one block's input at a time."""
    logits = cfg.vocab_size * (1 + (cfg.mtp_depth if training else 0))
    if not training:
        return float(seq_len) * (logits + cfg.dim)
    blocks = [_block_activations(cfg, i) for i in range(cfg.n_layers + cfg.mtp_depth)]
    return float(seq_len) * (logits + sum(blocks))


def shard_units(model: nn.Module) -> list[nn.Module]:
    """Each block, main and multi-token prediction: one all-gather per block in forward and backward."""
    return [*model.layers, *model.mtp]


SPEC = ModelSpec(
    name="deepseek",
    config=DeepSeekConfig,
    build=Transformer,
    count_params=decoder_params,
    flops_per_sample=flops_per_sample,
    count_modules=decoder_modules,
    activations=decoder_activations,
    inputs="tokens",
    shard_units=shard_units,
    validate=validate_decoder,
    seq_len_limit="max_seq_len",
    loss_parts=("next_token_loss",),
    after_step=moe_balance_step,
    decoder=lambda model: model,  # Transformer is a Decoder itself
)
