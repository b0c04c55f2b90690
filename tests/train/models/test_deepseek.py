"""Behaviour of the DeepSeek-style model: shapes, learning, routing, balancing, MTP, causality.

Its parameter and FLOP counts are in test_counts.py, with those of every family."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from tests.helpers.gloo import finish_gloo_worker, free_port
from train.errors import ConfigError
from train.models import build_model
from train.models.deepseek import DeepSeekConfig, MoE, Router, moe_balance_step

TINY = DeepSeekConfig(
    vocab_size=64,
    max_seq_len=32,
    dim=32,
    n_layers=2,
    n_heads=2,
    inter_dim=64,
    n_dense_layers=1,
    n_routed_experts=4,
    n_shared_experts=1,
    n_activated_experts=2,
    moe_inter_dim=16,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=8,
)


def tiny(**changes) -> nn.Module:
    torch.manual_seed(0)
    return build_model(dataclasses.replace(TINY, **changes))


def batch(batch_size: int = 2, seq_len: int = 16, vocab: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (batch_size, seq_len + 1), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def test_forward_gives_logits_and_a_finite_scalar_loss():
    model = tiny(q_lora_rank=8, mtp_depth=1)
    inputs, targets = batch()
    assert model(inputs).shape == (2, 16, 64)
    loss = model(inputs, targets)
    assert loss.dim() == 0 and torch.isfinite(loss)


def test_overfits_one_batch():
    model = tiny(mtp_depth=1)
    inputs, targets = batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = model(inputs, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_future_tokens_do_not_change_earlier_logits():
    model = tiny().eval()
    inputs, _ = batch()
    changed = inputs.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 64
    with torch.no_grad():
        before, after = model(inputs), model(changed)
    torch.testing.assert_close(before[:, :10], after[:, :10])
    assert not torch.allclose(before[:, 10:], after[:, 10:])


def test_same_seed_builds_the_same_model():
    first, second = tiny(), tiny()
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_init_weights_redraws_every_parameter_from_the_global_rng():
    first = tiny()
    torch.manual_seed(5)
    second = build_model(TINY)
    for model in (first, second):
        torch.manual_seed(1)
        model.init_weights()
    for (name, a), b in zip(first.named_parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_an_expert_without_tokens_still_gets_a_zero_gradient():
    model = tiny()
    starved = 0
    for layer in moe_layers(model):
        layer.router.expert_bias[starved] = -1e4  # never chosen
    inputs, targets = batch()
    model(inputs, targets).backward()
    for layer in moe_layers(model):
        assert layer.tokens_per_expert[starved] == 0
        assert layer.tokens_per_expert.sum() > 0
        for p in layer.experts.parameters():  # stacked [expert, out, in]
            assert p.grad is not None and torch.count_nonzero(p.grad[starved]) == 0
            assert torch.count_nonzero(p.grad) > 0
    assert all(p.grad is not None for p in model.parameters())


def test_the_bias_steers_the_choice_but_not_the_gate_weights():
    cfg = dataclasses.replace(TINY, n_routed_experts=8, n_activated_experts=2)
    router = Router(cfg)
    nn.init.normal_(router.weight, std=0.5)
    x = torch.randn(64, cfg.dim)
    unbiased_weights, _ = router(x)
    with torch.no_grad():
        router.expert_bias[3] = 10.0
    weights, indices = router(x)
    assert (indices == 3).any(dim=-1).all()
    scores = torch.sigmoid(x @ router.weight.T)
    expected = scores.gather(-1, indices)
    torch.testing.assert_close(weights, expected / expected.sum(-1, keepdim=True))
    assert not torch.allclose(weights, unbiased_weights)


def test_group_limited_routing_picks_experts_only_in_the_best_groups():
    cfg = dataclasses.replace(TINY, n_routed_experts=8, n_activated_experts=3, n_expert_groups=4, n_limited_groups=2)
    router = Router(cfg)
    nn.init.normal_(router.weight, std=1.0)
    x = torch.randn(256, cfg.dim)
    _, indices = router(x)
    scores = torch.sigmoid(x @ router.weight.T).view(256, 4, 2)
    best_groups = scores.sum(-1).topk(2, dim=-1).indices  # groups of 2: top-2 sum is the group sum
    chosen_groups = indices // 2
    assert (chosen_groups.unsqueeze(-1) == best_groups.unsqueeze(1)).any(-1).all()


def test_only_the_group_limit_keeps_tokens_within_two_groups():
    limited = dataclasses.replace(
        TINY, n_routed_experts=8, n_activated_experts=3, n_expert_groups=4, n_limited_groups=2
    )
    router_limited = Router(limited)
    nn.init.normal_(router_limited.weight, std=1.0)
    router_unlimited = Router(dataclasses.replace(limited, n_expert_groups=1, n_limited_groups=1))
    router_unlimited.load_state_dict(router_limited.state_dict())
    x = torch.randn(256, limited.dim)

    def groups_per_token(router: Router) -> list[int]:
        return [len(set(row.tolist())) for row in router(x)[1] // 2]

    assert max(groups_per_token(router_limited)) == 2
    assert max(groups_per_token(router_unlimited)) == 3


def test_balance_step_moves_bias_toward_underloaded_experts_with_one_all_reduce():
    wrapped = nn.Sequential(tiny(n_layers=3))  # stands in for a DDP/FSDP wrapper
    layers = moe_layers(wrapped)
    assert len(layers) == 2
    for layer in layers:
        layer.tokens_per_expert.copy_(torch.tensor([30, 8, 2, 0]))
    calls = []

    def all_reduce(tensor: torch.Tensor) -> None:
        calls.append(tensor.numel())
        tensor.mul_(2)  # two ranks with the same counts

    stats = moe_balance_step(wrapped, all_reduce)
    assert calls == [2 * 4]
    speed = TINY.bias_update_speed
    for layer in layers:
        torch.testing.assert_close(layer.router.expert_bias, torch.tensor([-speed, speed, speed, speed]))
        assert layer.tokens_per_expert.sum() == 0
    assert stats["moe_load_max"] == pytest.approx(3.0)
    assert stats["moe_load_min"] == pytest.approx(0.0)


def test_tokens_are_counted_only_in_training_forwards():
    model = tiny()
    inputs, targets = batch()
    model(inputs, targets)
    counted = [layer.tokens_per_expert.sum().item() for layer in moe_layers(model)]
    assert counted == [2 * 16 * TINY.n_activated_experts]
    model.eval()
    model(inputs, targets)
    with torch.no_grad():
        model.train()(inputs, targets)
    assert [layer.tokens_per_expert.sum().item() for layer in moe_layers(model)] == counted


def test_mtp_adds_its_weighted_loss():
    with_mtp = tiny(mtp_depth=1, mtp_weight=0.5)
    without_mtp = build_model(dataclasses.replace(TINY, mtp_depth=0))
    missing, unexpected = without_mtp.load_state_dict(with_mtp.state_dict(), strict=False)
    assert not missing and unexpected and all(key.startswith("mtp.") for key in unexpected)
    inputs, targets = batch()
    with torch.no_grad():
        extra = with_mtp(inputs, targets) - without_mtp(inputs, targets)
        with_mtp.cfg.mtp_weight = 1.0
        extra_at_weight_one = with_mtp(inputs, targets) - without_mtp(inputs, targets)
    assert extra > 0
    torch.testing.assert_close(extra_at_weight_one, 2 * extra)


def test_dense_model_has_no_moe_layers():
    model = tiny(n_routed_experts=0)
    assert not moe_layers(model)
    assert moe_balance_step(model, lambda tensor: pytest.fail("no all-reduce without MoE")) == {}


def test_top_k_beyond_the_allowed_groups_is_a_config_error():
    cfg = dataclasses.replace(TINY, n_routed_experts=8, n_activated_experts=3, n_expert_groups=4, n_limited_groups=1)
    with pytest.raises(ConfigError, match="n_limited_groups"):
        build_model(cfg)


def _ddp_worker(rank: int, world_size: int, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    model = tiny(mtp_depth=1)
    # The counts are per rank and the bias is updated identically everywhere: nothing to broadcast.
    ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    if rank == 1:  # this rank never routes to expert 0; DDP must still get its gradients
        for layer in moe_layers(model):
            layer.router.expert_bias[0] = -1e4
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(rank)
    for _ in range(3):
        tokens = torch.randint(0, 64, (2, 17), generator=generator)
        optimizer.zero_grad()
        ddp(tokens[:, :-1], tokens[:, 1:]).backward()
        optimizer.step()
        moe_balance_step(ddp, lambda tensor: dist.all_reduce(tensor, op=dist.ReduceOp.SUM))
    results[rank] = {name: p.detach().clone() for name, p in model.named_parameters()}
    finish_gloo_worker()


@pytest.mark.slow
def test_ddp_without_find_unused_parameters_keeps_ranks_identical():
    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, free_port(), results), nprocs=2)
    for name, value in results[0].items():
        torch.testing.assert_close(value, results[1][name], msg=name)
