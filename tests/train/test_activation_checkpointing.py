"""train.activation_checkpointing: the same losses and gradients with less kept, under DDP, FSDP2 and torch.compile."""

from __future__ import annotations

import functools

import pytest
import torch

from tests.helpers.trainrun import SMALL, fsdp2_runs_here, launch_train, losses
from train import activation_checkpointing
from train.benchmarks.plan import measure_saved, planned_activations
from train.config import RunConfig
from train.config_loader import load_config
from train.errors import ConfigError
from train.models import build_model, get_spec

STEPS = 4
# Small enough for a forward and backward in well under a second: deepseek with MoE layers and one MTP depth.
TINY_DEEPSEEK = [a for a in SMALL if not a.startswith(("train.", "data.num"))] + ["model.mtp_depth=1"]
CONFIGS = {"deepseek": ("tiny", TINY_DEEPSEEK), "llama": ("llama-tiny", ["data.seq_len=32"])}


def config(arch: str) -> RunConfig:
    name, overrides = CONFIGS[arch]
    return load_config(name, [*overrides, "train.precision=fp32"])


def forward_backward(cfg: RunConfig, mode: str, compile_backend: str | None = None) -> tuple[float, dict, list]:
    """Loss, gradients by name and the MoE token counts of one forward and backward from the same weights and batch."""
    torch.manual_seed(0)
    model = build_model(cfg.model)
    activation_checkpointing.apply(model, get_spec(cfg.model.arch), mode)
    run = torch.compile(model, backend=compile_backend) if compile_backend else model
    generator = torch.Generator().manual_seed(1)
    inputs, targets = (torch.randint(0, cfg.model.vocab_size, (3, cfg.data.seq_len), generator=generator) for _ in "xy")
    loss = run(inputs, targets)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    counts = [b.clone() for name, b in model.named_buffers() if name.endswith("tokens_per_expert")]
    return loss.item(), grads, counts


@functools.cache
def without_checkpointing(arch: str) -> tuple[float, dict, list]:
    return forward_backward(config(arch), "none")


def assert_same(checkpointed: tuple[float, dict, list], plain: tuple[float, dict, list]) -> None:
    (loss, grads, counts), (plain_loss, plain_grads, plain_counts) = checkpointed, plain
    assert loss == pytest.approx(plain_loss, abs=1e-6)
    assert grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=1e-6, msg=name)
    # The recompute in the backward must not count the tokens each expert got a second time.
    assert [c.tolist() for c in counts] == [c.tolist() for c in plain_counts]


@pytest.mark.parametrize("arch", sorted(CONFIGS))
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_losses_gradients_and_expert_counts_equal_those_without(arch: str, mode: str) -> None:
    assert_same(forward_backward(config(arch), mode), without_checkpointing(arch))
    assert arch != "deepseek" or all(c.sum() > 0 for c in without_checkpointing(arch)[2])


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(CONFIGS))
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_compiled_losses_gradients_and_expert_counts_equal_those_without(arch: str, mode: str) -> None:
    """torch.compile (aot_eager) of the checkpointed model against the eager model without checkpointing."""
    assert_same(forward_backward(config(arch), mode, "aot_eager"), without_checkpointing(arch))


def test_names_and_state_dict_are_unchanged() -> None:
    """Checkpoints and exports see the same model: checkpointing changes only each unit's forward."""
    cfg = config("deepseek")
    plain = build_model(cfg.model)
    for mode in ("full", "selective"):
        model = build_model(cfg.model)
        assert activation_checkpointing.apply(model, get_spec("deepseek"), mode) is model
        assert list(model.state_dict()) == list(plain.state_dict())
        assert [type(m) for m in model.modules()] == [type(m) for m in plain.modules()]


def test_each_mode_checkpoints_the_units_its_spec_names() -> None:
    cfg = config("deepseek")
    model = build_model(cfg.model)
    spec = get_spec("deepseek")
    assert activation_checkpointing.checkpointed_units(model, spec, "none") == []
    assert activation_checkpointing.checkpointed_units(model, spec, "full") == [*model.layers, *model.mtp]
    ffns = [*(block.ffn for block in model.layers), *(module.block.ffn for module in model.mtp)]
    assert activation_checkpointing.checkpointed_units(model, spec, "selective") == ffns


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_saved_bytes_fall_by_the_factor_the_plan_predicts(arch: str) -> None:
    """Must-show: checkpointing keeps less by the measured factor the plan predicts (within 15%)."""
    cfg = config(arch)
    measured, planned = {}, {}
    for mode in ("none", "full", "selective"):
        torch.manual_seed(0)
        model = build_model(cfg.model)
        activation_checkpointing.apply(model, get_spec(cfg.model.arch), mode)
        batch = torch.randint(0, cfg.model.vocab_size, (2, cfg.data.seq_len))
        saved, loss = measure_saved(model, lambda m=model, b=batch: m(b, b))
        loss.backward()  # the saved tensors serve a real backward
        measured[mode], planned[mode] = saved.activations, planned_activations(cfg, 2, "fp32", mode)
    for mode in ("full", "selective"):
        factor, predicted = measured["none"] / measured[mode], planned["none"] / planned[mode]
        # Selective recomputes the feed-forward alone, whose routed experts keep only their two projections.
        assert factor > (1.5 if mode == "full" else 1.3), (mode, factor)
        assert predicted == pytest.approx(factor, rel=0.15), mode


def test_an_unknown_mode_is_one_line() -> None:
    with pytest.raises(
        ConfigError, match=r"train\.activation_checkpointing='partial' is not one of none, full, selective"
    ):
        load_config("tiny", ["train.activation_checkpointing=partial"])


def _run(tmp_path, name: str, *overrides: str) -> list[float]:
    result = launch_train(tmp_path / name, 2, STEPS, "train.micro_batch=3", *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    return losses(tmp_path / name)


@pytest.mark.slow
def test_ddp_trains_the_same_with_checkpointing(tmp_path) -> None:
    plain = _run(tmp_path, "plain")
    for mode in ("full", "selective"):
        assert _run(tmp_path, mode, f"train.activation_checkpointing={mode}") == pytest.approx(plain, rel=1e-6), mode


@pytest.mark.slow
@pytest.mark.skipif(
    not fsdp2_runs_here(),
    reason="FSDP2's forward needs CUDA streams on torch < 2.6; make test-current runs this on current torch",
)
def test_fsdp2_trains_the_same_with_checkpointing(tmp_path) -> None:
    plain = _run(tmp_path, "plain", "train.strategy=fsdp")
    checkpointed = _run(tmp_path, "full", "train.strategy=fsdp", "train.activation_checkpointing=full")
    assert checkpointed == pytest.approx(plain, rel=1e-6)
