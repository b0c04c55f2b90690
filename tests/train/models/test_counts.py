"""Parameter and FLOP counts of every family (the registry's count_params, flops_per_token, flops_per_sample)
against built models, torch's FLOP counter and DeepSeek's published sizes; MFU (train/models/spec.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from train.config_loader import load_config
from train.models import build_model, count_params, flops_per_sample, flops_per_token
from train.models.deepseek import DeepSeekConfig
from train.models.resnet import ResNetConfig
from train.models.spec import mfu

SMALL_LM = DeepSeekConfig(
    vocab_size=64,
    max_seq_len=32,
    dim=32,
    n_layers=3,
    n_heads=2,
    inter_dim=64,
    n_routed_experts=4,
    n_activated_experts=2,
    moe_inter_dim=16,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=8,
)

# DeepSeek-V2-Lite (arXiv:2405.04434, appendix B): 15.7B total, 2.4B activated.
V2_LITE = DeepSeekConfig(
    vocab_size=102400,
    dim=2048,
    n_layers=27,
    n_heads=16,
    inter_dim=10944,
    n_dense_layers=1,
    n_routed_experts=64,
    n_shared_experts=2,
    n_activated_experts=6,
    moe_inter_dim=1408,
    q_lora_rank=0,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    mtp_depth=0,
)

# DeepSeek-V3 (arXiv:2412.19437): 671B total, 37B activated, MTP weights not included.
V3 = dataclasses.replace(
    V2_LITE,
    vocab_size=129280,
    dim=7168,
    n_layers=61,
    n_heads=128,
    inter_dim=18432,
    n_dense_layers=3,
    n_routed_experts=256,
    n_shared_experts=1,
    n_activated_experts=8,
    moe_inter_dim=2048,
    n_expert_groups=8,
    n_limited_groups=4,
    q_lora_rank=1536,
)


def built_numel(cfg: DeepSeekConfig) -> int:
    return sum(p.numel() for p in build_model(cfg).parameters())


@pytest.mark.parametrize(
    "cfg",
    [
        load_config("tiny").model,
        load_config("dense").model,
        dataclasses.replace(SMALL_LM, q_lora_rank=8, mtp_depth=2, n_shared_experts=2),
        ResNetConfig(num_classes=10),
    ],
    ids=["tiny", "dense", "lowrank-q-mtp2", "resnet50"],
)
def test_count_params_matches_the_built_model(cfg):
    assert count_params(cfg).total == built_numel(cfg)


def test_active_params_leave_out_unchosen_experts_and_the_embedding():
    counts = count_params(SMALL_LM)
    expert = 3 * SMALL_LM.dim * SMALL_LM.moe_inter_dim
    moe_layers = SMALL_LM.n_layers - SMALL_LM.n_dense_layers
    unchosen = moe_layers * (SMALL_LM.n_routed_experts - SMALL_LM.n_activated_experts) * expert
    assert counts.embedding == SMALL_LM.vocab_size * SMALL_LM.dim
    assert counts.active == counts.total - counts.embedding - unchosen


def test_deepseek_v2_lite_matches_its_published_size():
    counts = count_params(V2_LITE)
    assert counts.total == pytest.approx(15.7e9, rel=0.02)
    # Published to 0.1B, so "2.4B" is anything in [2.35B, 2.45B): allow a little over 2%.
    assert counts.active == pytest.approx(2.4e9, rel=0.025)


def test_deepseek_v3_matches_its_published_size():
    counts = count_params(V3)
    assert counts.total == pytest.approx(671e9, rel=0.02)
    assert counts.active == pytest.approx(37e9, rel=0.02)


def counted_training_flops(model: torch.nn.Module, *inputs: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        model(*inputs).backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("changes", [{}, {"q_lora_rank": 8, "n_expert_groups": 2}, {"n_routed_experts": 0}])
def test_flops_per_token_matches_torchs_flop_counter(changes):
    cfg = dataclasses.replace(SMALL_LM, **changes)
    torch.manual_seed(0)
    model = build_model(cfg)
    batch, seq_len = 2, 16
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1))
    # The math kernel runs attention as plain matmuls, which the counter sees in full.
    with sdpa_kernel(SDPBackend.MATH):
        counted = counted_training_flops(model, tokens[:, :-1], tokens[:, 1:])
    assert flops_per_token(cfg, seq_len) * batch * seq_len == pytest.approx(counted, rel=0.01)


def test_mtp_flops_are_counted():
    cfg = dataclasses.replace(SMALL_LM, mtp_depth=1)
    torch.manual_seed(0)
    model = build_model(cfg)
    seq_len = 16
    tokens = torch.randint(0, cfg.vocab_size, (2, seq_len + 1))
    with sdpa_kernel(SDPBackend.MATH):
        counted = counted_training_flops(model, tokens[:, :-1], tokens[:, 1:])
    # The MTP block sees seq_len - 1 positions; the formula counts seq_len.
    assert flops_per_token(cfg, seq_len) * 2 * seq_len == pytest.approx(counted, rel=1 / seq_len)
    assert flops_per_token(cfg, seq_len) > flops_per_token(SMALL_LM, seq_len)


@pytest.mark.parametrize("image_size", [224, 320])
def test_resnet50_flops_per_sample_matches_torchs_flop_counter(image_size):
    cfg = ResNetConfig(num_classes=1000, image_size=image_size)
    model = build_model(cfg).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, image_size, image_size))
    assert flops_per_sample(cfg, seq_len=1) == pytest.approx(3 * counter.get_total_flops(), rel=0.03)


def test_flops_per_sample_is_a_sequence_of_tokens_for_the_decoder():
    assert flops_per_sample(SMALL_LM, 16) == pytest.approx(16 * flops_per_token(SMALL_LM, 16))
    with pytest.raises(ValueError, match="flops_per_sample"):
        flops_per_token(ResNetConfig(), 16)


def test_mfu_is_achieved_over_combined_peak():
    assert mfu(flops_per_sample=2e9, samples_per_sec=300.0, n_devices=3, peak=1e12) == pytest.approx(0.2)
    assert mfu(2e9, 300.0, 3, None) is None
