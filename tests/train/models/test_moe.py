"""The MoE layer with stacked experts: the same numbers as the per-expert math, no host read where
torch._grouped_mm runs, no graph break on any torch, no copy of the weights kept for backward, and the
per-expert layout of earlier checkpoints and of exports still loading."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from tests.helpers.gloo import finish_gloo_worker, free_port
from tests.helpers.paths import FIXTURES
from train.checkpoint import Checkpointer, ModelState, OptimizerState
from train.config_loader import load_config
from train.distributed import _fully_shard
from train.models.deepseek import (
    _GROUPED_MM_ON_CPU,
    Block,
    DeepSeekConfig,
    GroupedExperts,
    MoE,
    Transformer,
    grouped_linear,
    moe_balance_step,
    rope_cache,
    shard_units,
    split_experts,
    stack_experts,
)
from train.weights import build_loaded_model

FIXTURE = FIXTURES / "moe_per_expert"
TORCH = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
needs_grouped_mm = pytest.mark.skipif(
    not _GROUPED_MM_ON_CPU,
    reason=f"torch {torch.__version__} has no torch._grouped_mm on the CPU (2.9+): its experts run one by one "
    "after a host read of the counts; make test-current runs this on current torch",
)
HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")


def reference_moe(moe: MoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, chosen experts) of an MoE layer from the DeepSeek-V3 report's formulas, expert by expert.

    s = sigmoid(x W_r^T); the choice adds the balancing bias and, with groups, keeps the
    n_limited_groups groups of the highest top-2 sums; g = s of the top-k, normalised, times
    route_scale; out = shared(x) + sum over chosen e of g_e * W2_e(silu(W1_e x) * W3_e x).
    """
    router, experts = moe.router, moe.experts
    scores = torch.sigmoid(x @ router.weight.T)
    choice = scores + router.expert_bias
    if router.n_groups > 1:
        per_group = choice.view(len(x), router.n_groups, -1)
        group_score = per_group.topk(min(2, per_group.shape[-1]), dim=-1).values.sum(-1)
        keep = torch.zeros_like(group_score, dtype=torch.bool)
        keep.scatter_(1, group_score.topk(router.n_limited_groups, dim=-1).indices, True)
        choice = per_group.masked_fill(~keep.unsqueeze(-1), float("-inf")).flatten(1)
    chosen = choice.topk(router.top_k, dim=-1).indices
    gates = scores.gather(1, chosen)
    gates = gates / gates.sum(-1, keepdim=True) * router.route_scale
    out = moe.shared_experts(x)
    for e in range(moe.n_routed_experts):
        token, slot = (chosen == e).nonzero(as_tuple=True)
        rows = x[token]
        hidden = F.silu(rows @ experts.w1.weight[e].T) * (rows @ experts.w3.weight[e].T)
        out = out.index_add(0, token, gates[token, slot].unsqueeze(-1) * (hidden @ experts.w2.weight[e].T))
    return out, chosen


class ReferenceMoE(MoE):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out, chosen = reference_moe(self, flat)
        if self.training and torch.is_grad_enabled():
            self.tokens_per_expert += torch.bincount(chosen.flatten(), minlength=self.n_routed_experts)
        return out.view(x.shape)


def with_reference_moe(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, MoE):
            module.__class__ = ReferenceMoE
    return model


CONFIGS = {
    "tiny": lambda: load_config("tiny").model,  # 2 expert groups, 1 kept
    "small": lambda: dataclasses.replace(load_config("small").model, n_layers=2, max_seq_len=64),  # 4 groups, 2 kept
    "ungrouped": lambda: dataclasses.replace(load_config("tiny").model, n_expert_groups=1, n_limited_groups=1),
}


def trained_router(cfg: DeepSeekConfig) -> MoE:
    """An MoE layer whose router prefers some experts (wide weights, a non-zero bias): routing is not uniform."""
    torch.manual_seed(0)
    moe = MoE(cfg)
    nn.init.normal_(moe.router.weight, std=0.3)
    for parameter in moe.experts.parameters():
        nn.init.normal_(parameter, std=cfg.init_std)
    with torch.no_grad():
        moe.router.expert_bias.copy_(torch.linspace(-0.05, 0.05, cfg.n_routed_experts))
    return moe


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_layer_equals_the_per_expert_math_forward_and_backward(name: str) -> None:
    cfg = CONFIGS[name]()
    moe = trained_router(cfg)
    x = torch.randn(256, cfg.dim, generator=torch.Generator().manual_seed(1))
    x_new, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = moe(x_new)
    expected, chosen = reference_moe(moe, x_ref)
    _, indices = moe.router(x)
    assert torch.equal(indices.sort(-1).values, chosen.sort(-1).values)  # routing identical
    assert torch.equal(moe.tokens_per_expert, torch.bincount(chosen.flatten(), minlength=cfg.n_routed_experts))
    assert moe.tokens_per_expert.max() > moe.tokens_per_expert.min()  # the loads differ
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)

    grad = torch.randn_like(out)
    params = dict(moe.named_parameters())
    got = torch.autograd.grad(out, [x_new, *params.values()], grad)
    want = torch.autograd.grad(expected, [x_ref, *params.values()], grad)
    for label, a, b in zip(["input", *params], got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=label)


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_the_models_loss_and_gradients_equal_the_per_expert_math(name: str) -> None:
    cfg = CONFIGS[name]()
    torch.manual_seed(0)
    model = Transformer(cfg)
    reference = with_reference_moe(model)
    tokens = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(2))
    loss = model(tokens[:, :-1], tokens[:, 1:])
    expected = reference(tokens[:, :-1], tokens[:, 1:])
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-6)
    loss.backward()
    expected.backward()
    for (label, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-6, msg=label)
    for a, b in zip(model.modules(), reference.modules(), strict=True):
        if isinstance(a, MoE):
            assert torch.equal(a.tokens_per_expert, b.tokens_per_expert)
    moe_balance_step(model)
    moe_balance_step(reference)
    for (label, a), b in zip(model.named_buffers(), reference.buffers(), strict=True):
        assert torch.equal(a, b), label


def test_autocast_runs_the_experts_in_bf16_close_to_fp32() -> None:
    cfg = CONFIGS["tiny"]()
    moe = trained_router(cfg)
    x = torch.randn(128, cfg.dim)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = moe(x)
    torch.testing.assert_close(low.float(), moe(x), rtol=0.05, atol=0.02)


def host_reads(fn) -> list[str]:
    """Names of the Tensor methods that read a value on the host while fn runs."""
    seen: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counted(name):
        def read(self, *args, **kwargs):
            seen.append(name)
            return originals[name](self, *args, **kwargs)

        return read

    try:
        for name in HOST_READS:
            setattr(torch.Tensor, name, counted(name))
        fn()
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)
    return seen


@needs_grouped_mm
def test_with_grouped_mm_a_training_step_reads_nothing_on_the_host() -> None:
    cfg = CONFIGS["tiny"]()
    torch.manual_seed(0)
    model = Transformer(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 33))

    def step() -> None:
        model(tokens[:, :-1], tokens[:, 1:]).backward()
        moe_balance_step(model)

    assert host_reads(step) == []


def test_without_grouped_mm_each_moe_layer_reads_the_host_once_in_forward_and_never_in_backward(monkeypatch) -> None:
    import train.models.deepseek as deepseek

    monkeypatch.setattr(deepseek, "_grouped_mm_runs", lambda *args: False)  # the loop, on any torch
    cfg = CONFIGS["tiny"]()
    torch.manual_seed(0)
    model = Transformer(cfg)
    moe_layers = sum(isinstance(m, MoE) for m in model.modules())
    tokens = torch.randint(0, cfg.vocab_size, (2, 33))
    loss = None

    def forward() -> None:
        nonlocal loss
        loss = model(tokens[:, :-1], tokens[:, 1:])

    assert host_reads(forward) == ["tolist"] * moe_layers
    assert host_reads(loss.backward) == []
    assert all(p.grad is not None for p in model.parameters())


@needs_grouped_mm
def test_grouped_mm_and_the_per_expert_loop_agree(monkeypatch) -> None:
    weight = torch.randn(4, 32, 16, requires_grad=True)
    x = torch.randn(40, 16, requires_grad=True)
    sizes = [5, 0, 17, 18]
    offsets = torch.tensor(sizes).cumsum(0).to(torch.int32)
    grouped = grouped_linear(x, weight, offsets)
    looped = grouped_linear(x, weight, sizes)
    torch.testing.assert_close(grouped, looped, rtol=0, atol=1e-6)
    grad = torch.randn_like(grouped)
    expected = torch.autograd.grad(looped, [x, weight], grad)
    for a, b in zip(torch.autograd.grad(grouped, [x, weight], grad), expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # A size grouped_mm cannot take (3 floats: 12 bytes a row) reads the offsets once and loops.
    odd = torch.randn(40, 3)
    assert host_reads(lambda: grouped_linear(odd, weight[:, :, :3], offsets)) == ["tolist"]


def test_a_compiled_moe_block_has_no_graph_break() -> None:
    """On every torch: with torch._grouped_mm, or with the experts' loop inside one op of ours."""
    import torch._dynamo

    cfg = CONFIGS["tiny"]()
    torch.manual_seed(0)
    block = Block(cfg, layer_id=cfg.n_dense_layers)
    assert isinstance(block.ffn, MoE)
    nn.init.normal_(block.ffn.router.weight, std=0.3)  # torch.empty until Transformer.init_weights: maybe NaN
    cos, sin = rope_cache(cfg.qk_rope_head_dim, cfg.max_seq_len, cfg.rope_theta)
    x = torch.randn(2, 16, cfg.dim)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(block)(x, cos, sin)
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
    assert explained.graph_count == 1
    # Traced through autograd with fake tensors (what inductor compiles from): the same numbers.
    compiled = torch.compile(copy.deepcopy(block), backend="aot_eager", fullgraph=True)
    inputs = x.clone().requires_grad_()
    out, expected = compiled(inputs, cos, sin), block(x.requires_grad_(), cos, sin)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    grad = torch.randn_like(out)
    torch.testing.assert_close(*torch.autograd.grad([out, expected], [inputs, x], [grad, grad]), rtol=0, atol=1e-6)


def test_the_whole_model_compiles_as_one_graph_forward_and_backward() -> None:
    """No break anywhere in a training forward (the MTP depths and every MoE layer) on any torch, and
    one compilation serves batches that route differently."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    cfg = CONFIGS["tiny"]()
    torch.manual_seed(0)
    model = Transformer(cfg)
    compiled = torch.compile(copy.deepcopy(model), backend="aot_eager")
    torch._dynamo.reset()
    counters.clear()
    for seed in range(3):
        tokens = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(seed))
        loss = compiled(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        torch.testing.assert_close(loss, model(tokens[:, :-1], tokens[:, 1:]), rtol=0, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["graph_break"])
    assert not counters["graph_break"]


def per_expert_loop(experts: GroupedExperts, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The experts as autograd sees plain per-expert SwiGLUs (what an adapter on the experts runs)."""
    w1, w3, w2 = experts.w1.per_expert(), experts.w3.per_expert(), experts.w2.per_expert()
    return torch.cat([w2[e](F.silu(w1[e](r)) * w3[e](r)) for e, r in enumerate(x.split(counts.tolist()))])


def through_the_op(experts: GroupedExperts, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """torchrig::expert_swiglu called as torch.compile's graphs call it, with its registered backward."""
    import train.models.deepseek as deepseek

    return deepseek._expert_swiglu(x, counts, experts.w1.weight, experts.w3.weight, experts.w2.weight)[0]


@pytest.mark.parametrize("entry", [GroupedExperts.__call__, through_the_op], ids=["eager", "op"])
@pytest.mark.parametrize("frozen", [(), ("w1", "w2", "w3"), ("w3",)])
def test_the_expert_function_equals_autograd_through_the_loop(entry, frozen: tuple[str, ...], monkeypatch) -> None:
    """The experts' own function in eager and as the op torch.compile sees, each with its written-out
    backward, against autograd through per-expert matmuls: an expert with no rows, a frozen base (no
    gradient made for it) and an input that needs none."""
    import train.models.deepseek as deepseek

    monkeypatch.setattr(deepseek, "_grouped_mm_runs", lambda *args: False)  # on any torch
    torch.manual_seed(0)
    experts = GroupedExperts(4, 24, 40)
    for name in frozen:
        getattr(experts, name).weight.requires_grad_(False)
    counts = torch.tensor([7, 0, 20, 5])
    x = torch.randn(32, 24)
    grad = torch.randn(32, 24)
    for x_needs_grad in (True, False):
        x_op, x_loop = x.clone().requires_grad_(x_needs_grad), x.clone().requires_grad_(x_needs_grad)
        out = entry(experts, x_op, counts)
        expected = per_expert_loop(experts, x_loop, counts)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
        wanted = [x_op] * x_needs_grad + [p for p in experts.parameters() if p.requires_grad]
        if not wanted:
            assert not out.requires_grad
            continue
        got = torch.autograd.grad(out, wanted, grad)
        want = torch.autograd.grad(expected, [x_loop] * x_needs_grad + wanted[x_needs_grad:], grad)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        assert all(p.grad is None for p in experts.parameters())  # autograd.grad leaves .grad alone
    with torch.no_grad():  # a forward alone keeps one expert's h1 and h3 at a time: the same numbers
        torch.testing.assert_close(entry(experts, x, counts), per_expert_loop(experts, x, counts), rtol=0, atol=1e-6)
    entry(experts, x.clone().requires_grad_(), counts).backward(grad)
    for name in ("w1", "w2", "w3"):
        weight = getattr(experts, name).weight
        assert (weight.grad is None) == (name in frozen), name
        if weight.grad is not None:
            assert torch.equal(weight.grad[1], torch.zeros_like(weight.grad[1]))  # the expert with no rows


@pytest.mark.parametrize("entry", [GroupedExperts.__call__, through_the_op], ids=["eager", "op"])
@pytest.mark.parametrize("needs", ["all", "input", "weights"])
def test_torchs_flop_counter_sees_the_matmuls_autograd_through_the_loop_runs(entry, needs: str, monkeypatch) -> None:
    """The op is one call to FlopCounterMode: its formulas count what it runs, a frozen base (x not kept)
    and an input that needs no gradient included, as autograd through per-expert matmuls would."""
    from torch.utils.flop_counter import FlopCounterMode

    import train.models.deepseek as deepseek

    monkeypatch.setattr(deepseek, "_grouped_mm_runs", lambda *args: False)
    torch.manual_seed(0)
    experts = GroupedExperts(4, 24, 40).requires_grad_(needs != "input")
    counts = torch.tensor([7, 0, 20, 5])
    x = torch.randn(32, 24, requires_grad=needs != "weights")

    def counted(run) -> int:
        with FlopCounterMode(display=False) as counter:
            run(experts, x, counts).sum().backward()
        return counter.get_total_flops()

    assert counted(entry) == counted(per_expert_loop) > 0


def test_autograd_keeps_no_copy_of_the_expert_weights() -> None:
    """What the layer saves for backward beyond its parameters themselves: activations only."""
    cfg = dataclasses.replace(CONFIGS["tiny"](), moe_inter_dim=256)  # weights far larger than the activations
    moe = trained_router(cfg)
    weights = {p.untyped_storage().data_ptr() for p in moe.parameters()}
    expert_bytes = sum(p.numel() * p.element_size() for p in moe.experts.parameters())
    saved: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.untyped_storage().data_ptr() not in weights:
            saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        moe(torch.randn(16, cfg.dim, requires_grad=True)).sum().backward()
    assert sum(saved) < expert_bytes / 4, (sum(saved), expert_bytes)


def test_an_expert_lora_is_expressible_on_the_stacked_weights() -> None:
    """Issue 18's LoRA on experts: a frozen stacked base plus per-expert A [E, r, in] and B [E, out, r]."""

    class GroupedLoRA(nn.Module):
        def __init__(self, base: nn.Module, rank: int) -> None:
            super().__init__()
            experts, out_features, in_features = base.weight.shape
            self.base = base.requires_grad_(False)
            self.a = nn.Parameter(torch.randn(experts, rank, in_features) * 0.1)
            self.b = nn.Parameter(torch.randn(experts, out_features, rank) * 0.1)

        def forward(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
            return self.base(x, offsets) + grouped_linear(grouped_linear(x, self.a, offsets), self.b, offsets)

        def per_expert(self) -> list:
            pairs = zip(self.base.per_expert(), self.a.unbind(0), self.b.unbind(0), strict=True)
            return [lambda rows, f=f, a=a, b=b: f(rows) + rows @ a.T @ b.T for f, a, b in pairs]

    cfg = CONFIGS["tiny"]()
    moe = trained_router(cfg)
    merged = copy.deepcopy(moe)
    moe.experts.w1 = GroupedLoRA(moe.experts.w1, rank=4)
    with torch.no_grad():
        merged.experts.w1.weight += moe.experts.w1.b @ moe.experts.w1.a
    x = torch.randn(64, cfg.dim)
    out = moe(x)
    torch.testing.assert_close(out, merged(x), rtol=0, atol=1e-6)
    out.sum().backward()
    assert moe.experts.w1.base.weight.grad is None
    assert moe.experts.w1.a.grad.abs().sum() > 0 and moe.experts.w1.b.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# Layouts: one tensor per expert on disk


def test_split_and_stack_convert_between_the_layouts() -> None:
    cfg = CONFIGS["tiny"]()
    torch.manual_seed(0)
    state = Transformer(cfg).state_dict()
    per_expert = split_experts(state)
    assert "layers.1.ffn.experts.7.w2.weight" in per_expert and "layers.1.ffn.experts.w2.weight" not in per_expert
    assert per_expert["layers.1.ffn.experts.3.w1.weight"].shape == (cfg.moe_inter_dim, cfg.dim)
    assert "layers.1.ffn.shared_experts.w1.weight" in per_expert  # shared experts are not stacked
    stacked = stack_experts(per_expert)
    assert list(stacked) == list(state) and all(torch.equal(stacked[k], state[k]) for k in state)
    assert stack_experts(state).keys() == state.keys()  # already stacked: unchanged
    gap = {k: v for k, v in per_expert.items() if k != "layers.1.ffn.experts.2.w1.weight"}
    assert "layers.1.ffn.experts.3.w1.weight" in stack_experts(gap)  # left for the loader to name


def test_an_export_with_one_tensor_per_expert_loads(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    cfg = CONFIGS["tiny"]()
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    save_file({k: v.contiguous() for k, v in split_experts(model.state_dict()).items()}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"model": {"arch": "deepseek", **dataclasses.asdict(cfg)}}))
    loaded, _, _ = build_loaded_model(tmp_path, torch.device("cpu"))
    tokens = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))


def fixture_config() -> DeepSeekConfig:
    return DeepSeekConfig(**json.loads((FIXTURE / "config.json").read_text()))


def fixture_expected() -> dict:
    return torch.load(FIXTURE / "expected.pt", weights_only=True)


def test_the_same_seed_draws_the_same_weights_as_the_per_expert_modules_did() -> None:
    torch.manual_seed(0)
    state = split_experts(Transformer(fixture_config()).state_dict())
    initial = fixture_expected()["initial"]
    assert state.keys() == initial.keys()
    for key, value in initial.items():
        assert torch.equal(state[key], value), key


def copied_run(tmp_path: Path, strategy: str) -> Path:
    """A run directory holding the fixture's checkpoints of `strategy` (ddp or fsdp)."""
    shutil.copytree(FIXTURE / strategy, tmp_path / strategy / "checkpoints")
    return tmp_path / strategy


def test_a_per_expert_ddp_checkpoint_resumes_exactly(tmp_path: Path) -> None:
    expected = fixture_expected()
    model = Transformer(fixture_config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    parts = {"model": ModelState(model), "optimizer": OptimizerState(model, optimizer)}
    run = copied_run(tmp_path, "ddp")
    assert Checkpointer(run, parts, keep=1, rank=0, world_size=1, strategy="ddp").load_latest() == 2
    for key, value in stack_experts(expected["step2"]).items():
        assert torch.equal(model.state_dict()[key], value), key
    moments = stack_experts(expected["step2_adam"])
    for name, parameter in model.named_parameters():
        for moment in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(optimizer.state[parameter][moment], moments[name][moment]), (name, moment)

    tokens = expected["tokens3"]
    loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    optimizer.step()
    moe_balance_step(model)
    assert loss.item() == pytest.approx(expected["loss3"], abs=1e-6)
    for key, value in stack_experts(expected["step3"]).items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=1e-6, msg=key)


def _fsdp_resume_worker(rank: int, port: int, run: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    fully_shard, _ = _fully_shard()
    model = Transformer(fixture_config())
    for unit in shard_units(model):
        fully_shard(unit)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    parts = {"model": ModelState(model), "optimizer": OptimizerState(model, optimizer)}
    assert Checkpointer(Path(run), parts, keep=1, rank=rank, world_size=2, strategy="fsdp").load_latest() == 2
    expected = fixture_expected()
    weights, moments = stack_experts(expected["step2"]), stack_experts(expected["step2_adam"])
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter.full_tensor(), weights[name]), name
        for moment in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(optimizer.state[parameter][moment].full_tensor(), moments[name][moment]), name
    if TORCH >= (2, 6):  # FSDP2's forward runs on the CPU from torch 2.6
        tokens = expected["tokens3"].chunk(2)[rank]  # each rank half the batch: the same mean gradient
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        optimizer.step()
        moe_balance_step(model, lambda counts: dist.all_reduce(counts))
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        assert mean_loss.item() / 2 == pytest.approx(expected["loss3"], abs=1e-6)
        for name, value in stack_experts(expected["step3"]).items():
            saved = dict(model.named_parameters()).get(name)
            actual = saved.full_tensor() if saved is not None else model.get_buffer(name)
            torch.testing.assert_close(actual.detach(), value, rtol=0, atol=1e-5, msg=name)
    finish_gloo_worker()


@pytest.mark.slow
def test_a_per_expert_fsdp_checkpoint_resumes_on_two_sharded_ranks(tmp_path: Path) -> None:
    mp.spawn(_fsdp_resume_worker, args=(free_port(), str(copied_run(tmp_path, "fsdp"))), nprocs=2)


def test_a_stacked_checkpoint_round_trips(tmp_path: Path) -> None:
    cfg = CONFIGS["tiny"]()
    torch.manual_seed(0)
    model = Transformer(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, cfg.vocab_size, (2, 33))
    model(tokens[:, :-1], tokens[:, 1:]).backward()
    optimizer.step()
    Checkpointer(tmp_path, {"model": ModelState(model)}, keep=1, rank=0, world_size=1, strategy="ddp").save(1)
    fresh = Transformer(cfg)
    Checkpointer(tmp_path, {"model": ModelState(fresh)}, keep=1, rank=0, world_size=1, strategy="ddp").load_latest()
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True))
    assert isinstance(fresh.layers[1].ffn.experts, GroupedExperts)
