"""make plan: exact model state, activations within 15% of what autograd saves, a verdict, levers, one-line errors."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from env.common.cli import UserError
from env.rig.runtime import TARGETS, check_values, job_argv
from tests.helpers.gloo import finish_gloo_worker, free_port
from tests.helpers.paths import ROOT
from train import launch, plan
from train.benchmarks.plan import ACTIVATION_BOUND, activation_rows, exact_rows, lora_rows
from train.config_loader import load_config
from train.distributed import DistInfo, wrap_model
from train.errors import ConfigError
from train.models import build_model
from train.plan.memory import FP32, GIB, Box, Model, Training, plan_memory, with_changes

SEQ_LENS = [32, 64]


@pytest.mark.parametrize("name", ["tiny", "llama-tiny"])
def test_weights_gradients_and_adamw_states_are_the_models_own(name: str) -> None:
    for row in exact_rows(name, 2):
        assert row.planned == row.actual, row


@pytest.mark.parametrize("name", ["tiny", "dense", "llama-tiny"])
def test_activations_are_within_the_bound_of_what_autograd_saves(name: str) -> None:
    rows = list(activation_rows([name], SEQ_LENS, ["fp32", "bf16", "bf16-fsdp"], 2))
    assert len(rows) == 2 * 3 * 3
    for row in rows:
        assert abs(row.error) <= ACTIVATION_BOUND, row


@pytest.mark.slow
def test_small_activations_are_within_the_bound() -> None:
    for row in activation_rows(["small"], SEQ_LENS, ["bf16-fsdp"], 1):
        assert abs(row.error) <= ACTIVATION_BOUND, row


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_the_measurement_tells_a_weights_cast_from_an_activation_of_its_shape(weight_dtype: torch.dtype) -> None:
    """The experts' h1 and h3 are made outside autograd: with as many rows as a weight is wide they have a
    weight's shape, and are still activations. A frozen weight's cast (its values) is a copy."""
    from torch import nn

    from train.benchmarks.plan import measure_saved
    from train.models.deepseek import GroupedExperts

    torch.manual_seed(0)
    experts = GroupedExperts(4, 16, 16)
    x = torch.randn(16, 16, requires_grad=True)  # rows = dim = hidden
    measured, _ = measure_saved(experts, lambda: experts(x, torch.tensor([13, 0, 3, 0])).sum())
    assert measured.weight_copies == 0 and measured.activations >= (16 * 16 + 2 * 16 * 16) * 4, measured
    frozen = nn.Linear(16, 16, bias=False).requires_grad_(False).to(weight_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        measured, _ = measure_saved(frozen, lambda: frozen(x).float().sum())
    assert measured.weight_copies == (16 * 16 * 2 if weight_dtype == torch.float32 else 0), measured


@pytest.mark.parametrize("name", ["tiny", "llama-tiny"])
def test_a_frozen_base_with_adapters_keeps_what_the_plan_says(name: str) -> None:
    rows = list(lora_rows([name], 32, ["fp32", "bf16", "bf16-fsdp"], 2))
    for row in rows:
        assert abs(row.error) <= ACTIVATION_BOUND, row
    full = next(row for row in activation_rows([name], [32], ["fp32"], 2, ("none",)))
    assert rows[0].measured < 0.9 * full.measured  # frozen matmuls keep no inputs


def test_the_benchmark_prints_rows_within_the_bound() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "train.benchmarks.plan",
            "--configs",
            "llama-tiny",
            "--seq-lens",
            "32",
            "--precisions",
            "fp32",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    worst = re.search(r"largest error: ([\d.]+)%", result.stdout)
    assert worst and float(worst[1]) <= 100 * ACTIVATION_BOUND, result.stdout
    assert "llama-tiny   AdamW states" in result.stdout and "bytes/FLOP" in result.stdout


def test_lora_trains_only_the_adapters() -> None:
    """Training's adapters (as issue 18's LoRA supplies them): the base frozen, rank x (in + out) per target."""
    cfg = load_config("tiny", ["train.precision=bf16"])
    training = Training(("wq", "wkv_a"), 4)
    lora = plan_memory(cfg, Box(1, 24 * GIB), training)
    full = plan_memory(cfg, Box(1, 24 * GIB))
    model = build_model(cfg.model)
    targets = [m for name, m in model.named_modules() if name.endswith((".wq", ".wkv_a"))]
    adapters = sum(4 * (m.in_features + m.out_features) for m in targets)
    assert lora.trainable == adapters and lora.parameters == full.parameters + adapters
    assert lora.gradients == FP32 * adapters
    assert lora.optimizer == 2 * FP32 * adapters + 4 * 2 * len(targets)  # two moments, a step per tensor
    assert lora.weights == full.weights + FP32 * adapters
    assert lora.activations < full.activations and "LoRA rank 4" in lora.training


def test_fsdp_shards_every_tensor_over_the_gpus() -> None:
    cfg = load_config("tiny", ["train.strategy=fsdp", "model.dim=96"])  # 96 rows: padded over 5 GPUs
    model = build_model(cfg.model)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    for gpus in (1, 2, 5):
        sharded = sum(math.ceil(p.shape[0] / gpus) * p[0].numel() * 4 for p in model.parameters())
        assert plan_memory(cfg, Box(gpus, 24 * GIB)).weights == sharded + buffers


def fsdp_worker(rank: int, port: int, planned: int, buffers: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=3)
    cfg = load_config("tiny", ["train.strategy=fsdp", "model.dim=96"])
    model = wrap_model(build_model(cfg.model), cfg, DistInfo(rank, rank, 3, torch.device("cpu"), "gloo"), None)
    local = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    if rank == 0:  # the first rank holds the largest (unpadded) shards
        assert local + buffers == planned, (local, buffers, planned)
    finish_gloo_worker()


@pytest.mark.slow
def test_fsdp2_holds_the_planned_shard_on_each_gpu() -> None:
    cfg = load_config("tiny", ["train.strategy=fsdp", "model.dim=96"])
    buffers = sum(b.numel() * b.element_size() for b in build_model(cfg.model).buffers())
    mp.spawn(fsdp_worker, args=(free_port(), plan_memory(cfg, Box(3, 24 * GIB)).weights, buffers), nprocs=3)


def test_the_largest_micro_batch_that_fits_is_the_verdicts() -> None:
    cfg = load_config("small", ["train.micro_batch=16"])
    box = Box(1, 8 * GIB)
    now = plan_memory(cfg, box)
    largest = now.max_micro_batch
    assert not now.fits and 1 <= largest < 16
    assert plan_memory(with_changes(cfg, micro_batch=largest), box).fits
    assert not plan_memory(with_changes(cfg, micro_batch=largest + 1), box).fits
    assert f"the largest MICRO_BATCH that fits is {largest}" in plan.verdict(now)


def test_checkpointing_modes_order_the_activations() -> None:
    by_mode = plan_memory(load_config("small", []), Box(1, 24 * GIB)).activations_by_mode
    assert by_mode["none"] > by_mode["selective"] > by_mode["full"] > 0


def test_each_lever_is_the_plan_with_its_change() -> None:
    cfg = load_config("small", ["train.micro_batch=1", "data.seq_len=256", "train.activation_checkpointing=full"])
    box = Box(1, 2 * GIB)
    now, found = plan.plan_run(cfg, box)
    levers = {lever.change: lever.plan for lever in found}
    assert not now.fits and now.max_micro_batch == 0
    # LoRA: only the adapters train; more GPUs: sharded with FSDP2; no FSDP lever on one GPU.
    assert levers["train.lora.rank=16"].fits and levers["train.lora.rank=16"].trainable < now.parameters / 50
    sharded = with_changes(cfg, strategy="fsdp")
    assert levers["GPUS=2 STRATEGY=fsdp"] == plan_memory(sharded, Box(2, box.vram))
    assert not plan_memory(sharded, Box(1, box.vram)).fits and "STRATEGY=fsdp" not in levers
    keeping = with_changes(cfg, activation_checkpointing="none")
    changes = {lever.change: lever.plan for lever in plan.plan_run(keeping, Box(3, 24 * GIB))[1]}
    assert changes["STRATEGY=fsdp"] == plan_memory(with_changes(keeping, strategy="fsdp"), Box(3, 24 * GIB))
    full = changes["train.activation_checkpointing=full"]
    assert full.activations < changes["train.activation_checkpointing=selective"].activations


def plan_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "train.plan", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def test_make_plan_exits_0_when_it_fits_and_1_when_not_and_writes_json(tmp_path: Path) -> None:
    fits = plan_cli("--config", "tiny", "--gpus", "16", "--vram", "24", "--json", str(tmp_path / "plan.json"))
    assert fits.returncode == 0, fits.stderr
    assert "fits:" in fits.stdout and "on 16 GPU(s) of 24.00 GiB" in fits.stdout
    record = json.loads((tmp_path / "plan.json").read_text())
    assert record["fits"] and record["gpus"] == 16 and record["vram"] == 24 * GIB
    kinds = ("weights", "gradients", "optimizer", "weight_copies", "gather_buffers", "activations", "transient")
    assert record["total"] == sum(record[kind] for kind in (*kinds, "allowance"))
    assert set(record["activations_by_mode"]) == {"none", "full", "selective"} and record["levers"]
    short = plan_cli("--config", "small", "--vram", "8", "--micro-batch", "16")
    assert short.returncode == 1, short.stderr
    assert "does not fit:" in short.stdout and "train.activation_checkpointing=full" in short.stdout


def test_json_never_writes_through_a_link_or_over_other_data(tmp_path: Path) -> None:
    victim = tmp_path / "important.txt"
    victim.write_text("keep")
    (tmp_path / "link.json").symlink_to(victim)
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "mine"}\n')
    os.mkfifo(tmp_path / "fifo.json")
    for target, words in [("link.json", "is a symlink"), ("data.jsonl", "is not a plan make plan wrote"),
                          ("fifo.json", "is not a regular file")]:  # fmt: skip
        result = plan_cli("--config", "tiny", "--json", str(tmp_path / target))
        assert result.returncode == 2 and words in result.stderr and "\n" not in result.stderr.strip(), result.stderr
    assert victim.read_text() == "keep" and data.read_text() == '{"text": "mine"}\n'
    again = plan_cli("--config", "tiny", "--gpus", "16", "--json", str(tmp_path / "plan.json"))
    assert again.returncode == 0 and plan_cli("--config", "tiny", "--json", str(tmp_path / "plan.json")).returncode in (
        0,
        1,
    )  # a plan written before is replaced


def test_make_plan_plans_train_init_froms_model(tmp_path: Path) -> None:
    from tests.helpers.hf_models import VARIANTS, saved_run

    _, _, run = saved_run(tmp_path, "llama-gqa")
    name, overrides = VARIANTS["llama-gqa"]
    planned = {}
    for label, args in [
        ("init_from", ["--config", "tiny", f"train.init_from={run}"]),
        ("same", ["--config", name, *overrides]),
    ]:
        result = plan_cli(*args, "data.seq_len=64", "--json", str(tmp_path / f"{label}.json"))
        assert result.returncode in (0, 1), result.stderr
        planned[label] = json.loads((tmp_path / f"{label}.json").read_text())["weights"]
    assert planned["init_from"] == planned["same"]  # the init_from's model, not tiny's


def test_make_plan_plans_for_the_box_it_is_told_of() -> None:
    """GPUS is the box's, never checked against this machine's GPUs (which a training run's GPUS is)."""
    argv = job_argv(TARGETS["plan"], {"GPUS": "64", "VRAM": "80", "CONFIG": "tiny"}, visible=0)
    assert "--gpus=64" in argv and "--vram=80" in argv
    with pytest.raises(UserError, match="no GPU is visible"):
        job_argv(TARGETS["train"], {"GPUS": "64"}, visible=0)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--gpus", "0"], "GPUS=0: plan for at least 1 GPU"),
        (["--vram", "0"], "VRAM=0: give each GPU's memory in GiB, at least a byte"),
        (["--vram", "1e308"], "VRAM=1e+308: give each GPU's memory in GiB, at least a byte and at most 1,048,576"),
        (["--vram", "1e-300"], "VRAM=1e-300: give each GPU's memory in GiB, at least a byte"),
        (["--vram", "-24"], "VRAM=-24: give each GPU's memory in GiB"),
        (["--vram", "nan"], "is not a finite decimal number"),
        (["--gpus", "three"], "is not a whole number"),
    ],
)
def test_bad_gpus_or_vram_is_one_line(args: list[str], words: str) -> None:
    result = plan_cli("--config", "tiny", *args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("torchrig plan: "), result.stderr
    assert words in lines[0]


def test_make_refuses_a_vram_that_is_no_number_before_running_anything() -> None:
    with pytest.raises(UserError, match="VRAM 'lots' is not a finite decimal number"):
        check_values("plan", {"VRAM": "lots"})
    with pytest.raises(UserError, match="make train does not take VRAM"):
        check_values("train", {"VRAM": "24"})


def test_make_train_on_a_gpu_refuses_a_run_the_plan_says_cannot_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _: SimpleNamespace(total_memory=8 * GIB))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index=0: (8 * GIB, 8 * GIB))  # the lower bound's check
    args = launch_args("--config", "small", "--micro-batch", "16")
    with pytest.raises(ConfigError) as refused:
        launch._preflight(args, has_gpu=True)
    line = str(refused.value)
    assert "\n" not in line and line.startswith("make plan says this run does not fit:")
    assert re.search(r"; fits with (\S+ \(\S+ GiB\) or )*train\.activation_checkpointing=full \(", line), line
    plan.check_fits(load_config("small", ["train.micro_batch=4"]), Box(1, 8 * GIB))  # this one fits: no error
    plan.check_fits(load_config("resnet50", []), Box(1, GIB))  # a family without an activation account: not planned


def launch_args(*argv: str) -> object:
    parser = launch.ArgumentParser(prog="test")
    launch.add_run_arguments(parser)
    parser.add_argument("--gpus", type=int, default=1)
    launch.add_node_arguments(parser)
    return parser.parse_args(list(argv))


def test_the_model_is_built_on_the_meta_device() -> None:
    model = Model.build(load_config("small", []))
    assert {p.device.type for p in model.module.parameters()} == {"meta"}
