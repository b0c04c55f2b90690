"""LoRA (train.lora, train/lora.py): the base frozen and bitwise unchanged, only adapters trained, step 0 equal to
the base, the loss falling with the experts adapted, DDP equal to one process, resume exact, the export loaded by
peft onto transformers' model of the base (logits and greedy continuation equal ours), MERGE=1 loaded by
transformers, and the bad inputs one line each."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.hf_models import V5, greedy_generate
from tests.helpers.make import make, needs_make
from tests.helpers.paths import ROOT
from tests.helpers.sampling import save_checkpoint, small_config
from tests.helpers.trainrun import fsdp2_runs_here, launch_train, losses
from train import activation_checkpointing, lora
from train.config import RunConfig
from train.config_loader import load_config
from train.errors import ConfigError
from train.export import ExportError, export
from train.models import build_model, get_spec
from train.run import build_optimizer
from train.sample import ByteCodec, printable
from train.weights import build_loaded_model, init_from, init_source_config, load_model_weights

EXPERTS = "train.lora.targets=wq,wkv_b,wo,experts,shared_experts"


def lora_model(cfg: RunConfig, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return lora.apply(build_model(cfg.model), cfg)


def train_steps(model: torch.nn.Module, cfg: RunConfig, steps: int, seed: int = 1) -> list[float]:
    """AdamW steps on one fixed random batch, the family's after-step hook (DeepSeek's balancing) after each."""
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    after_step = get_spec(cfg.model.arch).after_step
    tokens = torch.randint(
        0, cfg.model.vocab_size, (4, cfg.data.seq_len + 1), generator=torch.Generator().manual_seed(seed)
    )
    found = []
    for _ in range(steps):
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step(model, None)
        found.append(loss.item())
    return found


def adapters_of(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value for key, value in state.items() if lora.is_adapter_key(key)}


# ---------------------------------------------------------------------------------------------
# The layers and the frozen base


@pytest.mark.parametrize(("name", "targets"), [("tiny", EXPERTS), ("tiny", "train.lora.rank=4"), ("llama-tiny", "")])
def test_step_0_computes_the_base_exactly(name: str, targets: str) -> None:
    overrides = ["model.max_seq_len=64", "data.seq_len=32", "train.lora.rank=4", *([targets] if targets else [])]
    cfg = load_config(name, overrides)
    torch.manual_seed(0)
    base = build_model(cfg.model).eval()
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 16))
    expected = base(tokens)
    adapted = lora.apply(base, cfg)
    assert any(isinstance(m, (lora.LoRALinear, lora.LoRAGroupedLinear)) for m in adapted.modules())
    assert torch.equal(adapted(tokens), expected)  # B is zeros: the adapters add exactly nothing


def test_the_base_is_frozen_and_bitwise_unchanged_and_only_adapters_are_in_the_optimizer() -> None:
    cfg = small_config("train.lora.rank=4", EXPERTS, "model.bias_update_speed=0.01")
    model = lora_model(cfg)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    names = {id(p): name for name, p in model.named_parameters()}
    assert {names[i] for i in in_optimizer} == {n for n, p in model.named_parameters() if lora.is_adapter_key(n)}
    assert all(p.requires_grad == lora.is_adapter_key(n) for n, p in model.named_parameters())
    assert any(".experts.w1.lora_A" in names[i] for i in in_optimizer)  # the routed experts, stacked [E, r, in]
    train_steps(model, cfg, 3)
    after = model.state_dict()
    for key, value in before.items():
        if lora.is_adapter_key(key):
            assert key.endswith("lora_A") or not torch.equal(after[key], value), key  # B moved off zero
        else:
            assert torch.equal(after[key], value), key  # the balancing biases too: a frozen base routes as loaded
    trainable, total = lora.parameter_counts(model)
    assert trainable == sum(v.numel() for v in adapters_of(after).values()) and total > 5 * trainable


def test_the_loss_falls_with_the_experts_adapted() -> None:
    cfg = small_config("train.lora.rank=8", EXPERTS, "train.lr=1e-2", "train.warmup_steps=1")
    found = train_steps(lora_model(cfg), cfg, 30)
    assert found[-1] < found[0] - 0.5, found  # 7.22 -> 5.97 measured


def test_the_stacked_experts_adapter_computes_the_same_all_at_once_and_per_expert() -> None:
    from train.models.deepseek import GroupedLinear

    torch.manual_seed(0)
    adapter = lora.LoRAGroupedLinear(GroupedLinear(4, 16, 24), rank=3, alpha=6.0, dropout=0.0)
    with torch.no_grad():
        adapter.lora_B.normal_()
    x, counts = torch.randn(10, 16), [3, 0, 5, 2]
    grouped = adapter(x, torch.tensor(counts).cumsum(0, dtype=torch.int32))
    per_expert = torch.cat([f(rows) for f, rows in zip(adapter.per_expert(), x.split(counts), strict=True)])
    by_hand = torch.cat(
        [
            rows @ (adapter.weight[e] + 2.0 * adapter.lora_B[e] @ adapter.lora_A[e]).T
            for e, rows in enumerate(x.split(counts))
        ]
    )
    torch.testing.assert_close(grouped, per_expert, rtol=0, atol=1e-6)
    torch.testing.assert_close(grouped, by_hand, rtol=1e-5, atol=1e-5)


def test_activation_checkpointing_keeps_the_adapters_gradients() -> None:
    grads = {}
    for mode in ("none", "full", "selective"):
        cfg = small_config("train.lora.rank=4", EXPERTS, f"train.activation_checkpointing={mode}")
        model = lora_model(cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("lora_B"):
                    p.normal_(std=0.1)
        activation_checkpointing.apply(model, get_spec(cfg.model.arch), mode)
        tokens = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(0))
        model(tokens[:, :-1], tokens[:, 1:]).backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    for mode in ("full", "selective"):
        for name, grad in grads["none"].items():
            torch.testing.assert_close(grads[mode][name], grad, rtol=1e-6, atol=1e-6, msg=name)


def test_the_merged_weights_compute_base_plus_adapter() -> None:
    cfg = small_config("train.lora.rank=4", EXPERTS, "train.lora.alpha=8")
    model = lora_model(cfg)
    train_steps(model, cfg, 2)
    model.eval()
    plain = build_model(cfg.model).eval()
    plain.load_state_dict(lora.merged(model.state_dict(), cfg.train.lora))
    tokens = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(plain(tokens), model(tokens), rtol=1e-5, atol=1e-5)


def test_a_bf16_run_keeps_its_frozen_base_in_bf16_its_adapters_in_float32_and_plans_them_exactly() -> None:
    from train.plan import Box, plan_run

    cfg = small_config("train.lora.rank=4", EXPERTS, "train.precision=bf16")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    built = {key: value.clone() for key, value in model.state_dict().items()}
    lora.apply(model, cfg, lora.base_dtype(cfg, torch.bfloat16))
    for name, param in model.named_parameters():
        assert param.dtype == (torch.float32 if lora.is_adapter_key(name) else torch.bfloat16), name
    assert model.layers[1].ffn.router.expert_bias.dtype == torch.float32  # buffers as built
    plan, _ = plan_run(cfg, Box(1, 24 * 2**30))
    stored = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert plan.weights == stored  # the plan stores the base as the run does
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    tokens = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(tokens[:, :-1], tokens[:, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    after = model.state_dict()
    assert all(torch.equal(after[key], value.to(after[key].dtype)) for key, value in built.items())


def test_init_from_a_lora_run_starts_from_its_merged_weights(tmp_path: Path) -> None:
    cfg = small_config("train.lora.rank=4", EXPERTS)
    model = lora_model(cfg)
    train_steps(model, cfg, 2)
    save_checkpoint(tmp_path / "lora", model, cfg, step=2)
    new = small_config(f"train.init_from={tmp_path / 'lora'}")
    fresh = build_model(new.model)
    assert init_from(fresh, new, tmp_path / "new") == 2
    merged = lora.merged(model.state_dict(), cfg.train.lora)
    assert fresh.state_dict().keys() == merged.keys()
    assert all(torch.equal(fresh.state_dict()[key], value) for key, value in merged.items())


def test_the_plan_counts_the_runs_adapters_exactly() -> None:
    from train.plan import Box, plan_run

    cfg = small_config("train.lora.rank=4", EXPERTS)
    plan, _ = plan_run(cfg, Box(1, 24 * 2**30))
    assert (plan.trainable, plan.parameters) == lora.parameter_counts(lora_model(cfg))


# ---------------------------------------------------------------------------------------------
# Bad input: one line each


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["train.lora.targets=q_proj"],
         "train.lora.targets=q_proj matches no linear layer of this model; its linear layers are wq, wkv_a"),
        (["train.lora.targets=wkv_a", "train.lora.rank=60"],
         "train.lora.rank=60 exceeds the smaller dimension of layers.0.attn.wkv_a (64 in, 40 out)"),
        (["train.lora.rank=-1"], "train.lora.rank=-1 must be 0 (off) or more"),
        (["train.lora.dropout=1"], "train.lora.dropout=1.0 must be at least 0 and below 1"),
        (["train.lora.alpha=0"], "train.lora.alpha=0.0 must be more than 0"),
        (["train.lora.targets=[wo,wq]"], "train.lora.targets has '[wo': write module names alone, comma-separated"),
        (["train.lora.alpha=1e-320"], "gives a scale alpha/rank that float32 holds as 0: the adapters would not train"),
    ],
)  # fmt: skip
def test_bad_lora_settings_are_one_line(overrides: list[str], says: str) -> None:
    with pytest.raises(ConfigError) as raised:
        small_config("train.lora.rank=4", *overrides)
    assert says in str(raised.value) and "\n" not in str(raised.value)


def test_merge_of_a_run_without_lora_is_one_line_exit_2(tmp_path: Path) -> None:
    cfg = small_config()
    save_checkpoint(tmp_path / "run", build_model(cfg.model), cfg, step=1)
    with pytest.raises(ExportError, match="MERGE=1 merges a LoRA run's adapters"):
        export(tmp_path / "run", tmp_path / "out", merge=True)
    done = subprocess.run(
        [sys.executable, "-m", "train.export", "--run-dir", str(tmp_path / "run"), "--output", str(tmp_path / "o"),
         "--merge"], cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "export without MERGE" in done.stderr and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_resuming_with_another_rank_or_without_lora_is_one_line_exit_2(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert launch_train(run, 1, 2, "train.lora.rank=4").returncode == 0
    for change, says in (("train.lora.rank=8", "train.lora.rank=4 but this run has train.lora.rank=8"),
                         ("train.lora.rank=0", "train.lora.rank=4 but this run has train.lora.rank=0")):  # fmt: skip
        done = launch_train(run, 1, 4, change)
        lines = [line for line in done.stderr.splitlines() if line.startswith("torchrig:")]
        assert done.returncode == 2 and len(lines) == 1 and says in lines[0], done.stderr


# ---------------------------------------------------------------------------------------------
# Several processes, resume


@pytest.mark.slow
def test_ddp_on_two_ranks_trains_the_adapters_as_one_process(tmp_path: Path) -> None:
    common = ["train.lora.rank=4", EXPERTS, "train.ckpt_every=100"]
    one = launch_train(tmp_path / "one", 1, 4, *common, "train.micro_batch=8")
    two = launch_train(tmp_path / "two", 2, 4, *common, "train.micro_batch=4")
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    torch.testing.assert_close(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-5, atol=1e-5)
    a, _, _ = load_model_weights(tmp_path / "one", adapters=True)
    b, _, _ = load_model_weights(tmp_path / "two", adapters=True)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-4, msg=key)


@pytest.mark.slow
def test_a_resumed_lora_run_equals_an_unbroken_one(tmp_path: Path) -> None:
    common = ["train.lora.rank=4", EXPERTS, "train.lora.dropout=0.1", "train.ckpt_every=100"]
    assert launch_train(tmp_path / "whole", 1, 6, *common).returncode == 0
    assert launch_train(tmp_path / "split", 1, 3, *common).returncode == 0
    assert launch_train(tmp_path / "split", 1, 6, *common).returncode == 0
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")
    whole, _, _ = load_model_weights(tmp_path / "whole", adapters=True)
    split, _, _ = load_model_weights(tmp_path / "split", adapters=True)
    assert all(torch.equal(split[key], whole[key]) for key in whole)
    cfg = small_config("train.lora.rank=4", EXPERTS)
    torch.manual_seed(cfg.train.seed)
    base = build_model(cfg.model).state_dict()
    assert all(torch.equal(whole[key], value) for key, value in base.items())  # the base bitwise as built


@pytest.mark.slow
@pytest.mark.skipif(not fsdp2_runs_here(), reason="FSDP2 trains on a GPU, or on the CPU from torch 2.6")
def test_fsdp2_on_a_bf16_base_with_checkpointing_leaves_the_base_as_loaded(tmp_path: Path) -> None:
    common = ["train.lora.rank=4", EXPERTS, "train.micro_batch=4", "train.precision=bf16", "train.strategy=fsdp"]
    done = launch_train(tmp_path / "run", 2, 3, *common, "train.activation_checkpointing=full")
    assert done.returncode == 0, done.stderr
    cfg = small_config(*common)
    torch.manual_seed(cfg.train.seed)
    built = build_model(cfg.model)
    dtype = lora.base_dtype(cfg, torch.bfloat16) or torch.float32  # float32 under FSDP2 before torch 2.8
    expected = {name: p.detach().to(dtype) for name, p in built.named_parameters()} | dict(built.named_buffers())
    state, _, _ = load_model_weights(tmp_path / "run", adapters=True)
    for key in built.state_dict():  # the base bitwise as built, stored in its dtype
        assert torch.equal(state[key], expected[key].to(state[key].dtype)), key
    assert all(p.abs().sum() > 0 for key, p in state.items() if key.endswith("lora_B"))


@pytest.mark.slow
@pytest.mark.skipif(not fsdp2_runs_here(), reason="FSDP2 trains on a GPU, or on the CPU from torch 2.6")
def test_fsdp2_with_checkpointing_trains_the_adapters_as_ddp(tmp_path: Path) -> None:
    common = ["train.lora.rank=4", EXPERTS, "train.micro_batch=4", "train.ckpt_every=100"]
    ddp = launch_train(tmp_path / "ddp", 2, 4, *common)
    fsdp = launch_train(tmp_path / "fsdp", 2, 4, *common, "train.strategy=fsdp", "train.activation_checkpointing=full")
    assert ddp.returncode == 0 and fsdp.returncode == 0, ddp.stderr + fsdp.stderr
    torch.testing.assert_close(losses(tmp_path / "fsdp"), losses(tmp_path / "ddp"), rtol=1e-4, atol=1e-4)
    a, _, _ = load_model_weights(tmp_path / "ddp", adapters=True)
    b, _, _ = load_model_weights(tmp_path / "fsdp", adapters=True)
    for key in a:
        if lora.is_adapter_key(key):
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-4, msg=key)
        else:
            assert torch.equal(b[key], a[key]), key


# ---------------------------------------------------------------------------------------------
# Out: peft's adapter onto transformers' model, and MERGE=1


def hf_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def greedy(model: torch.nn.Module, ids: list[int], count: int) -> list[int]:
    """Our greedy continuation: argmax of full forwards."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(count):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[-count:]


# Experts are linear layers in transformers 4.x, fused parameters in 5.x (peft adapts those otherwise).
FAMILIES = {"deepseek_v3": "wq_b,wkv_b,wo" if V5 else "wq_b,wkv_b,wo,experts,shared_experts", "llama": ""}


@needs_make
@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_export_loads_in_peft_onto_transformers_model_and_merge_in_transformers(
    tmp_path: Path, family: str
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tests.train.hf.test_from_transformers import save_transformers_checkpoint

    base_dir = tmp_path / "base"
    save_transformers_checkpoint(base_dir, family)
    targets = [f"train.lora.targets={FAMILIES[family]}"] if FAMILIES[family] else []
    overrides = ["data.seq_len=32", "train.precision=fp32", f"train.init_from={base_dir}", "train.lora.rank=4",
                 "train.lora.alpha=8", *targets]  # fmt: skip
    cfg = load_config("llama-tiny" if family == "llama" else "tiny", overrides, init_source_config)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    init_from(model, cfg, tmp_path / "run")
    lora.apply(model, cfg)
    train_steps(model, cfg, 3)
    save_checkpoint(tmp_path / "run", model, cfg, step=3)
    export(tmp_path / "run", tmp_path / "adapter")
    export(tmp_path / "run", tmp_path / "merged", merge=True)

    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))
    model.eval()
    with torch.no_grad():
        ours = model(tokens)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir).float(), tmp_path / "adapter")
    peft_model.eval()
    base_only = AutoModelForCausalLM.from_pretrained(base_dir).float().eval()
    assert not torch.allclose(hf_logits(base_only, tokens), ours, atol=1e-3)  # the adapters changed something
    torch.testing.assert_close(hf_logits(peft_model, tokens), ours, rtol=1e-5, atol=1e-5)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").float().eval()
    torch.testing.assert_close(hf_logits(merged, tokens), ours, rtol=1e-5, atol=1e-5)
    loaded, _, _ = build_loaded_model(tmp_path / "run", torch.device("cpu"))  # make sample's and make eval's model
    prompt = tokens[0, :8].tolist()
    assert greedy_generate(peft_model, prompt, 12) == greedy(loaded, prompt, 12)
    text = "import torch as t"
    continuation = greedy_generate(peft_model, ByteCodec(256).encode(text), 16)
    sampled = make("sample", f"RUN_DIR={tmp_path / 'run'}", f"PROMPT={text}", "TOKENS=16", "TEMPERATURE=0")
    assert sampled.returncode == 0, sampled.stderr  # through the latent KV cache
    assert sampled.stdout == printable(text) + printable(ByteCodec(256).stream(continuation)) + "\n"
