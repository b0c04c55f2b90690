"""Weights into a model (train/weights.py): only finite floating-point weights of the model's own shapes are taken,
and a hand-edited export whose config outgrows its weights is refused before anything is allocated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers.sampling import small_config, trained_in_process, write_export
from train.models import build_model
from train.weights import WeightsError, build_loaded_model, check_weights


def test_weights_that_are_not_finite_or_not_floating_are_refused_naming_the_weight() -> None:
    cfg = small_config()
    expected = build_model(cfg.model).state_dict()
    key = next(k for k, v in expected.items() if v.is_floating_point())
    poisoned = {k: v.clone() for k, v in expected.items()}
    poisoned[key].view(-1)[0] = float("nan")
    with pytest.raises(WeightsError, match=f"'{key}' holds NaN"):
        check_weights(expected, poisoned, "export")
    integers = {k: v.clone() for k, v in expected.items()}
    integers[key] = integers[key].long()
    with pytest.raises(WeightsError, match=f"'{key}' is torch.int64"):
        check_weights(expected, integers, "export")


def test_a_hand_edited_export_whose_config_outgrows_its_weights_is_refused_unallocated(tmp_path: Path) -> None:
    cfg = small_config()
    model_config = {**json.loads(json.dumps(cfg.to_dict()["model"])), "dim": 4096}
    write_export(tmp_path / "e", trained_in_process(cfg), model_config)
    with pytest.raises(WeightsError, match="has shape"):
        build_loaded_model(tmp_path / "e", torch.device("cpu"))
