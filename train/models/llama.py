"""A dense Llama-style decoder: grouped-query attention with RoPE, SwiGLU feed-forwards, RMSNorm.

The whole family in one file, as deepseek.py: the model, its shape checks, its parameter and FLOP
counts, and the registry SPEC (train/models/__init__.py). The architecture is Llama's (Touvron et al.,
arXiv:2302.13971; grouped-query attention from Llama 2, arXiv:2307.09288, and Ainslie et al.,
arXiv:2305.13245), computed as transformers' LlamaForCausalLM computes it (4.57, modeling_llama.py),
so that its weights are a rename away from that class (tests/test_llama.py holds the name map and
compares the logits):

- `RMSNorm`: x / sqrt(mean(x^2) + eps) in float32, cast back to x's dtype, then times the weight.
- RoPE (`rope_tables`, `apply_rope`): inv_freq_i = 1 / rope_theta^(2i / head_dim); dimension i of a
  head rotates with dimension i + head_dim/2 (transformers' rotate_half layout, not DeepSeek's
  consecutive pairs), so the query and key projections need no row permutation between the two.
- `Attention`: n_heads query heads share n_kv_heads key/value heads, each key/value head serving
  n_heads / n_kv_heads consecutive query heads (transformers' repeat_kv); no biases; scores scaled by
  1/sqrt(head_dim); causal F.scaled_dot_product_attention.
- `SwiGLU` (Shazeer, arXiv:2002.05202): w2(silu(w1 x) * w3 x), i.e. down(silu(gate(x)) * up(x)).
- `Block`: x + attn(attn_norm(x)), then x + ffn(ffn_norm(x)); `Llama`: token embedding, the blocks,
  a final RMSNorm and the output head, which with tie_embeddings is the embedding matrix itself.
- Decoding (train/sample.py drives it through the Decoder protocol, train/models/spec.py): `KVCache`
  holds each layer's rotated keys and values, [batch, n_kv_heads, capacity, head_dim];
  `Llama.forward_cached` runs a prompt or the next tokens at the cache's position. There is no MTP
  module, so the model cannot draft (`can_draft` is False).

`LlamaConfig`, first, is the `model:` section. After the model: `validate_llama`, the model.* checks
run before every build; `llama_params` and `llama_flops_per_token`, the counts from the config alone
(tests/test_llama.py checks them against a built model and torch's FLOP counter); and SPEC.

Initialisation, as deepseek.py: every linear and embedding weight from N(0, init_std) drawn from the
global torch RNG, norms at 1; the RoPE tables are derived buffers, never checkpointed.
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
from train.hf import llama as hf_llama
from train.models.activations import FP32, INDEX, Activations, Setting, Unit, attention_core, rms_norm, swiglu_inner
from train.models.loss import token_loss
from train.models.spec import CachePositions, ModelSpec, ParamCount

# More layers than any model this rig trains (Llama 3 405B has 126): a bigger figure is a typo, and
# building it would take minutes before failing for memory.
MAX_LAYERS = 4096
# A context far past any this rig trains (Llama 3.1: 128K); sampling's cache is sized by it.
MAX_SEQ_LEN = 1 << 20


@dataclass
class LlamaConfig(ModelConfig):
    """The Llama-style decoder's `model:` keys (model.arch=llama); the sizes of train/configs/llama-*.yaml."""

    vocab_size: int = 256
    """Token ids the model embeds and predicts; 256 is byte-level. auto: the data's (256 for bytes, a token
    file's sidecar vocab_size)."""
    max_seq_len: int = 256
    """Positions the model has (its RoPE table and sampling's cache); data.seq_len may not exceed it."""
    dim: int = 128
    """Hidden size of every layer; n_heads x head_dim (head_dim = dim / n_heads, even)."""
    n_layers: int = 4
    """Transformer blocks."""
    n_heads: int = 4
    """Query heads of each attention layer."""
    n_kv_heads: int = 2
    """Key/value heads (grouped-query attention): each serves n_heads / n_kv_heads query heads; n_heads is
    plain multi-head attention, 1 is multi-query attention."""
    inter_dim: int = 384
    """Width of each block's SwiGLU feed-forward (Llama: about 8/3 x dim, rounded up)."""
    norm_eps: float = 1e-5
    """RMSNorm's epsilon (Llama 2 and 3 use 1e-5)."""
    rope_theta: float = 10000.0
    """RoPE's base: the longest wavelength grows with it (Llama 2: 10000, Llama 3: 500000)."""
    tie_embeddings: bool = False
    """Use the token-embedding matrix as the output head too (as GPT-2 and the small Llama 3.2 models do),
    saving vocab_size x dim parameters."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation of every linear and embedding weight."""

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 (bf16 sums of squares lose too much), cast back, then scale: LlamaRMSNorm's order.
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x): transformers' gate_proj is w1, up_proj w3, down_proj w2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every position's angles, each [max_seq_len, head_dim]: the angle of frequency i
    at dimensions i and i + head_dim/2, the two halves that rotate together."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)  # [max_seq_len, head_dim/2]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., seq, head_dim] rotated by its positions' cos/sin [seq, head_dim], in float32:
    x * cos + rotate_half(x) * sin, where rotate_half(x) = (-x[half:], x[:half])."""
    x32 = x.float()
    first, second = x32.chunk(2, dim=-1)
    return (x32 * cos + torch.cat((-second, first), dim=-1) * sin).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.group = cfg.n_heads // cfg.n_kv_heads  # query heads per key/value head
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        """x [batch, seq, dim] at positions start.. (cos/sin: the full tables) -> [batch, seq, dim].

        cache: one layer's (keys, values) of a KVCache, [batch, n_kv_heads, capacity, head_dim]: this
        call's keys and values are written at start.. and attention reads positions 0..start+seq.
        Without a cache x is a whole sequence from position 0.
        """
        batch, seq_len, _ = x.shape
        end = start + seq_len
        cos, sin = cos[start:end], sin[start:end]
        q = self.wq(x).view(batch, seq_len, self.n_heads, self.head_dim).transpose(1, 2)  # [batch, heads, seq, hd]
        k = self.wk(x).view(batch, seq_len, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [batch, kv, seq, hd]
        v = self.wv(x).view(batch, seq_len, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        mask = None  # None: the square causal mask of a sequence from position 0
        if cache is not None:
            keys, values = cache
            keys[:batch, :, start:end] = k
            values[:batch, :, start:end] = v
            k, v = keys[:batch, :, :end].to(q.dtype), values[:batch, :, :end].to(q.dtype)  # [batch, kv, end, hd]
            if start > 0:  # query i sits at position start+i and sees the positions up to its own
                mask = torch.arange(end, device=x.device) <= torch.arange(start, end, device=x.device).unsqueeze(1)
        # Key/value head j serves query heads j*group .. (j+1)*group - 1: [batch, heads, keys, hd].
        k, v = k.repeat_interleave(self.group, dim=1), v.repeat_interleave(self.group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale)
        return self.wo(out.transpose(1, 2).reshape(batch, seq_len, self.n_heads * self.head_dim))


class KVCache(CachePositions):
    """The decoding state: per layer the rotated keys and the values of every position so far.

    keys[l] and values[l] are [batch, n_kv_heads, capacity, head_dim], capacity = max_seq_len.
    `position` counts the positions filled; `rollback` forgets those after a point, which the next
    write overwrites.
    """

    def __init__(self, cfg: LlamaConfig, batch: int, device: torch.device, dtype: torch.dtype) -> None:
        self.cfg = cfg
        self.capacity = cfg.max_seq_len
        shape = (batch, cfg.n_kv_heads, self.capacity, cfg.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.position = 0

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[index], self.values[index]

    def bytes_per_token(self) -> int:
        """Bytes one token's entries take, all layers together, measured on the tensors held."""
        return sum(t.element_size() * t.shape[1] * t.shape[-1] for t in [*self.keys, *self.values])

    def describe(self) -> str:
        """One line: the bytes per token against a cache with a key and a value for every query head."""
        cfg, layers = self.cfg, len(self.keys)
        size = self.keys[0].element_size()
        held = self.bytes_per_token()
        per_query_head = layers * cfg.n_heads * 2 * cfg.head_dim * size
        return (
            f"KV cache per token: {held:,} bytes ({layers} layers x {cfg.n_kv_heads} kv heads x (k {cfg.head_dim} "
            f"+ v {cfg.head_dim}) x {size} B) vs {per_query_head:,} bytes for full keys and values ({layers} x "
            f"{cfg.n_heads} heads): {per_query_head / held:.1f}x smaller by grouped-query attention"
        )


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.dim, cfg.inter_dim)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, start)
        return x + self.ffn(self.ffn_norm(x))


class Llama(nn.Module):
    can_draft = False  # no MTP module: train/sample.py refuses SPECULATE=1 before asking for a draft

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        # Tied: no weight of its own (one tensor under one name in checkpoints and exports); logits() uses embed's.
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # Derived from the config, so not checkpointed.
        self.register_buffer("rope_cos", torch.empty(cfg.max_seq_len, cfg.head_dim), persistent=False)
        self.register_buffer("rope_sin", torch.empty(cfg.max_seq_len, cfg.head_dim), persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        cos, sin = rope_tables(self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=self.cfg.init_std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output head on the final norm of the last block's hidden state."""
        weight = self.embed.weight if self.head is None else self.head.weight
        return F.linear(self.norm(hidden), weight)

    def forward(
        self, inputs: torch.Tensor, targets: torch.Tensor | None = None, divisors: torch.Tensor | None = None
    ) -> torch.Tensor:
        """inputs [batch, seq] token ids -> logits [batch, seq, vocab], or the mean cross-entropy given targets
        (IGNORE_INDEX targets not counted; divisors [1]: the sum over it, train/models/loss.py)."""
        hidden = self.embed(inputs)
        for layer in self.layers:
            hidden = layer(hidden, self.rope_cos, self.rope_sin)
        logits = self.logits(hidden)
        if targets is None:
            return logits
        return token_loss(logits, targets, None if divisors is None else divisors[0])

    @property
    def max_seq_len(self) -> int:
        return self.cfg.max_seq_len

    def new_cache(self, batch: int = 1, dtype: torch.dtype | None = None) -> KVCache:
        """An empty cache of max_seq_len positions for every layer."""
        return KVCache(self.cfg, batch, device=self.embed.weight.device, dtype=dtype or self.embed.weight.dtype)

    def forward_cached(self, inputs: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """inputs [batch, seq] at positions cache.position.. -> (logits, last hidden state before the norm).

        Prefill is one call with the prompt, decoding one call per new token; the cache advances by seq.
        """
        hidden = self.embed(inputs)
        for index, layer in enumerate(self.layers):
            hidden = layer(hidden, self.rope_cos, self.rope_sin, cache.layer(index), cache.position)
        cache.advance(inputs.shape[1])
        return self.logits(hidden), hidden


# ---------------------------------------------------------------------------------------------
# The config: the model.* checks (train.config_loader.validate_model runs them through SPEC).


def validate_llama(m: LlamaConfig) -> None:
    """The model.* checks, each a ConfigError with the fix (run before every build)."""
    sizes = {
        "dim": m.dim,
        "n_layers": m.n_layers,
        "n_heads": m.n_heads,
        "n_kv_heads": m.n_kv_heads,
        "vocab_size": m.vocab_size,
        "max_seq_len": m.max_seq_len,
        "inter_dim": m.inter_dim,
    }
    require_positive({f"model.{key}": value for key, value in sizes.items()})
    if m.max_seq_len > MAX_SEQ_LEN:
        raise ConfigError(f"model.max_seq_len={m.max_seq_len} exceeds {MAX_SEQ_LEN:,}; lower it")
    if m.n_layers > MAX_LAYERS:
        raise ConfigError(f"model.n_layers={m.n_layers} exceeds {MAX_LAYERS}; lower it")
    if m.dim % m.n_heads:
        raise ConfigError(
            f"model.dim={m.dim} is not a multiple of model.n_heads={m.n_heads} (head_dim = dim / n_heads); "
            "change one of them"
        )
    if m.head_dim % 2:
        raise ConfigError(
            f"model.dim / model.n_heads = {m.head_dim} must be even (RoPE rotates the two halves of a head); "
            "change dim or n_heads"
        )
    if m.n_heads % m.n_kv_heads:
        raise ConfigError(
            f"model.n_heads={m.n_heads} is not a multiple of model.n_kv_heads={m.n_kv_heads} (each key/value head "
            "serves an equal group of query heads); use a divisor of n_heads"
        )
    for key, value in {"norm_eps": m.norm_eps, "rope_theta": m.rope_theta}.items():
        if not value > 0:  # also NaN, which a ModelConfig made in code can hold
            raise ConfigError(f"model.{key}={value} must be more than 0; e.g. the default {getattr(LlamaConfig, key)}")
    if not m.init_std >= 0:
        raise ConfigError(f"model.init_std={m.init_std} must be 0 or more, e.g. 0.02")


# ---------------------------------------------------------------------------------------------
# The counts from the config alone, as the classes above build them, and SPEC.


def _block_matmul(m: LlamaConfig) -> int:
    """One block's matmul weights: q and o over n_heads, k and v over n_kv_heads, the three SwiGLU matrices."""
    attention = 2 * m.dim * m.n_heads * m.head_dim + 2 * m.dim * m.n_kv_heads * m.head_dim
    return attention + 3 * m.dim * m.inter_dim


def llama_params(cfg: LlamaConfig) -> ParamCount:
    """Every parameter; the active count is all but the embedding lookup, with the head counted (tied or not)."""
    embedding = head = cfg.vocab_size * cfg.dim
    norms = (2 * cfg.n_layers + 1) * cfg.dim  # two per block and the final one
    body = cfg.n_layers * _block_matmul(cfg) + norms
    total = embedding + body + (0 if cfg.tie_embeddings else head)
    return ParamCount(total=total, active=body + head, embedding=embedding)


def llama_flops_per_token(cfg: LlamaConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token, by deepseek.decoder_flops_per_token's convention:

        6 * N_matmul  +  6 * seq_len * n_heads * (head_dim + head_dim) * n_layers

    N_matmul: every block's projections and SwiGLU matrices and the output head (tied or not), not
    the embedding lookup, norms or elementwise work; the second term the score (QK^T) and value (AV)
    matmuls over the full seq_len x seq_len square, as PaLM, nanoGPT and torchtitan count them.
    Grouped key/value heads save parameters and cache, not these FLOPs: every query head attends.
    """
    matmul = cfg.n_layers * _block_matmul(cfg) + cfg.dim * cfg.vocab_size
    attention = seq_len * cfg.n_heads * 2 * cfg.head_dim
    return 6.0 * matmul + 6.0 * attention * cfg.n_layers


def flops_per_sample(cfg: LlamaConfig, seq_len: int) -> float:
    """A sample is a sequence of seq_len tokens."""
    return llama_flops_per_token(cfg, seq_len) * seq_len


def llama_activations(cfg: LlamaConfig, seq_len: int, dt: Setting) -> Activations:
    """Bytes one sample of seq_len tokens keeps for the backward (train/models/activations.py), block by block:
    two norms (one float32 cast each), the projections' inputs, attention over keys and values repeated to every
    query head, the SwiGLU; outside the blocks the lookup, the final norm, the head and the loss. Selective
    recomputes the SwiGLU and keeps its input."""
    m, p = cfg, dt.params
    heads = m.n_heads * m.head_dim
    attention = dt.matmul_inputs(m.dim, "attn.wq", "attn.wk", "attn.wv")
    attention += attention_core(m.n_heads, m.head_dim, m.head_dim, seq_len, dt, heads, "attn.wo")
    rest = rms_norm(m.dim, p, dt.trains("attn_norm")) + rms_norm(m.dim, p, dt.trains("ffn_norm")) + attention
    ffn = dt.matmul_inputs(m.dim, "ffn.w1", "ffn.w3") + swiglu_inner(m.inter_dim, dt, "ffn.w2")
    block = Unit(kept=seq_len * (rest + ffn), inputs=seq_len * m.dim * p, selective=seq_len * (rest + m.dim * p))
    head = dt.matmul_inputs(m.dim, "embed" if m.tie_embeddings else "head") + m.vocab_size * FP32
    outside = 2 * INDEX + rms_norm(m.dim, p, dt.trains("norm")) + head
    return Activations((block,) * m.n_layers, seq_len * outside)


def shard_units(model: nn.Module) -> list[nn.Module]:
    """Each block: one all-gather per block in forward and backward; the root holds embedding, norm and head."""
    return list(model.layers)


def selective_units(model: nn.Module) -> list[nn.Module]:
    """What train.activation_checkpointing=selective recomputes: each block's feed-forward, which keeps the most
    bytes per FLOP of recompute (python -m train.benchmarks.plan measures it against the attention)."""
    return [block.ffn for block in shard_units(model)]


SPEC = ModelSpec(
    name="llama",
    config=LlamaConfig,
    build=Llama,
    count_params=llama_params,
    flops_per_sample=flops_per_sample,
    inputs="tokens",
    shard_units=shard_units,
    validate=validate_llama,
    seq_len_limit="max_seq_len",
    selective_units=selective_units,
    lora_targets=("wq", "wk", "wv", "wo"),
    saved_for_backward=llama_activations,
    decoder=lambda model: model,  # Llama is a Decoder itself
    hf=hf_llama.MAPPING,  # transformers' LlamaForCausalLM
)
