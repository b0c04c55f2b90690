"""The training path on a real GPU: skipped with a reason elsewhere (tests/conftest.py), run by env/gpu_check.sh."""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers.trainrun import SMALL
from train.checkpoint import Checkpointer, ModelState, OptimizerState, RNGState
from train.config_loader import load_config
from train.data import build_dataset, build_loader
from train.models import build_model
from train.run import build_optimizer
from train.trainer import train

pytestmark = pytest.mark.cuda


def test_bf16_training_on_the_gpu_reports_mfu_for_a_known_card(tmp_path) -> None:
    cfg = load_config("tiny", [*SMALL, "train.steps=20", "train.log_every=5", "train.precision=auto"])
    summary = train(cfg, tmp_path / "run")
    assert summary["precision"] == "bf16" and summary["device"] == torch.cuda.get_device_name()
    assert math.isfinite(summary["final_loss"]) and summary["final_loss"] < summary["first_loss"]
    assert summary["peak_mem_gb"] > 0
    # Either a figure from the peak table, or null with a note: never another card's peak.
    assert (summary["mfu"] is not None and 0 < summary["mfu"] < 1) or (summary["mfu"] is None and summary["mfu_note"])


def test_the_model_computes_the_same_loss_on_gpu_and_cpu() -> None:
    cfg = load_config("tiny", SMALL)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    inputs, targets = next(iter(build_loader(build_dataset(cfg), cfg, 0, 1, 0)))
    with torch.no_grad():
        cpu_loss = model(inputs, targets)
        gpu_loss = model.cuda()(inputs.cuda(), targets.cuda())
    torch.testing.assert_close(gpu_loss.cpu(), cpu_loss, rtol=1e-3, atol=1e-3)  # TF32 matmuls allowed


def test_a_checkpoint_restores_the_gpu_random_state(tmp_path) -> None:
    cfg = load_config("tiny", SMALL)
    model = build_model(cfg.model).cuda()
    optimizer = build_optimizer(model, cfg, torch.device("cuda"))
    parts = {"model": ModelState(model), "optimizer": OptimizerState(model, optimizer), "rng": RNGState(0, 1)}
    checkpointer = Checkpointer(tmp_path, parts, keep=2, rank=0, world_size=1, strategy="ddp")
    torch.cuda.manual_seed(123)
    checkpointer.save(1)
    expected = torch.rand(4, device="cuda")
    torch.cuda.manual_seed(999)
    assert checkpointer.load_latest() == 1
    assert torch.equal(torch.rand(4, device="cuda"), expected)


def test_the_loader_pins_memory_for_the_gpu() -> None:
    cfg = load_config("tiny", [*SMALL, "data.pin_memory=true"])
    inputs, _ = next(iter(build_loader(build_dataset(cfg), cfg, 0, 1, 0)))
    assert inputs.is_pinned()
