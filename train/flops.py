"""Parameter and FLOP counts from the config alone (no model is built), and MFU.

The counts mirror train/model.py layer by layer; tests/test_flops.py checks them against a built
model's parameters, against torch's FLOP counter, and against DeepSeek-V2-Lite's published size.
"""

from __future__ import annotations

from dataclasses import dataclass

from train.config import ModelConfig

# ResNet-50 at 224²: 4.09 G multiply-adds forward (torchvision's "GFLOPS" figure counts a
# multiply-add as one), i.e. 8.18 GFLOP counting both, the unit peak FLOP/s tables use.
RESNET50_FORWARD_FLOPS_224 = 8.18e9
# ResNet-50 without its classifier; the classifier adds (2048 + 1) per class.
RESNET50_BACKBONE_PARAMS = 23_508_032
RESNET50_FEATURES = 2048


@dataclass(frozen=True)
class ParamCount:
    """total: every parameter (MTP modules included). embedding: the input token-embedding table.
    active: what one token's forward computes with (DeepSeek's "activated" figure): total minus the
    embedding lookup and the routed experts the token is not sent to. The output head counts.
    """

    total: int
    active: int
    embedding: int


@dataclass(frozen=True)
class _Block:
    """One transformer block's parameters: matmul weights (all, and those one token uses) and norms."""

    matmul_total: int
    matmul_active: int
    norms: int


def _swiglu(dim: int, hidden: int) -> int:
    return 3 * dim * hidden


def _attention(m: ModelConfig) -> _Block:
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


def _feed_forward(m: ModelConfig, layer_id: int) -> _Block:
    if m.is_dense_layer(layer_id):
        dense = _swiglu(m.dim, m.inter_dim)
        return _Block(dense, dense, 0)
    expert = _swiglu(m.dim, m.moe_inter_dim)
    always = m.n_routed_experts * m.dim + m.n_shared_experts * expert  # router + shared experts
    return _Block(always + m.n_routed_experts * expert, always + m.n_activated_experts * expert, 0)


def _block(m: ModelConfig, layer_id: int) -> _Block:
    attention, ffn = _attention(m), _feed_forward(m, layer_id)
    return _Block(
        attention.matmul_total + ffn.matmul_total,
        attention.matmul_active + ffn.matmul_active,
        attention.norms + 2 * m.dim,
    )


def _mtp_module(m: ModelConfig, depth: int) -> _Block:
    block = _block(m, m.n_layers + depth)
    merge = 2 * m.dim * m.dim
    return _Block(block.matmul_total + merge, block.matmul_active + merge, block.norms + 3 * m.dim)


def _blocks(m: ModelConfig) -> list[_Block]:
    return [_block(m, i) for i in range(m.n_layers)] + [_mtp_module(m, d) for d in range(m.mtp_depth)]


def count_params(cfg: ModelConfig) -> ParamCount:
    """Parameter counts of build_model(cfg), computed analytically by its registry spec."""
    from train.models import get_spec  # the specs import the counters below

    return get_spec(cfg.arch).count_params(cfg)


def resnet50_params(cfg: ModelConfig) -> ParamCount:
    """torchvision's ResNet-50 with cfg.num_classes outputs."""
    total = RESNET50_BACKBONE_PARAMS + (RESNET50_FEATURES + 1) * cfg.num_classes
    return ParamCount(total=total, active=total, embedding=0)


def decoder_params(cfg: ModelConfig) -> ParamCount:
    """The decoder's counts, block by block as train/model.py builds it."""
    blocks = _blocks(cfg)
    embedding = cfg.vocab_size * cfg.dim
    head_and_final_norm = cfg.dim * cfg.vocab_size + cfg.dim
    total = embedding + head_and_final_norm + sum(b.matmul_total + b.norms for b in blocks)
    active = head_and_final_norm + sum(b.matmul_active + b.norms for b in blocks)
    return ParamCount(total=total, active=active, embedding=embedding)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token of a token model: a sample is seq_len tokens."""
    from train.models import get_spec

    if get_spec(cfg.arch).inputs != "tokens":
        raise ValueError(f"flops_per_token is for token models, not {cfg.arch}; use flops_per_sample")
    return flops_per_sample(cfg, seq_len) / seq_len


def decoder_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
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


def flops_per_sample(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per sample (a sequence of seq_len tokens, or one image), by the model's registry spec."""
    from train.models import get_spec

    return get_spec(cfg.arch).flops_per_sample(cfg, seq_len)


def resnet50_flops_per_sample(cfg: ModelConfig, seq_len: int) -> float:
    """ResNet-50: 3 x forward FLOPs (backward ~ 2 x forward), forward 8.18 GFLOP at 224x224 scaled by
    (image_size / 224)^2 since conv work grows with the pixel count.
    """
    return 3.0 * RESNET50_FORWARD_FLOPS_224 * (cfg.image_size / 224) ** 2


def mfu(flops_per_sample: float, samples_per_sec: float, n_devices: int, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the devices' combined peak; None when the peak is unknown."""
    if peak is None or peak <= 0 or n_devices < 1:
        return None
    return flops_per_sample * samples_per_sec / (n_devices * peak)
