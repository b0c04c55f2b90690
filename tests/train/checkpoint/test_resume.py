"""Which config changes a resume allows: the model's shape, the sample stream, the global batch and the
strategy stay fixed; the budget, the logging, the schedule and the batch's split may change."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.checkpoints import (
    assert_bitwise_equal,
    extra_state,
    load,
    make_optimizer,
    save_trained,
    tiny_model,
    with_batch,
)
from train.checkpoint import CheckpointError, check_compatible
from train.config_loader import default_config


def test_model_shape_change_is_refused_naming_the_key() -> None:
    saved, current = default_config().to_dict(), default_config().to_dict()
    current["model"]["dim"] = 256
    with pytest.raises(CheckpointError) as caught:
        check_compatible(saved, current)
    assert str(caught.value) == (
        "RUN_DIR holds a checkpoint with model.dim=128 but this run has model.dim=256; "
        "use a new RUN_DIR or restore the config"
    )


def test_lora_targets_left_empty_are_named_as_the_default_they_stand_for() -> None:
    saved, current = default_config().to_dict(), default_config().to_dict()
    current["train"]["lora"]["targets"] = ["wo"]
    with pytest.raises(CheckpointError) as caught:
        check_compatible(saved, current)
    assert str(caught.value).startswith(
        "RUN_DIR holds a checkpoint with train.lora.targets empty (the model family's default targets) but this "
        "run has train.lora.targets=['wo']; "
    )


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [("train", "micro_batch", 4), ("train", "accum", 2), ("train", "seed", 7), ("data", "seq_len", 64)],
)
def test_batch_data_and_seed_changes_are_refused(section: str, key: str, value: object) -> None:
    current = default_config().to_dict()
    current[section][key] = value
    with pytest.raises(CheckpointError, match=rf"{section}\.{key}="):
        check_compatible(default_config().to_dict(), current)


def test_budget_logging_and_schedule_changes_are_allowed() -> None:
    current = default_config().to_dict()
    current["train"].update(steps=5000, log_every=1, ckpt_every=7, keep_ckpts=1, lr=3e-4, warmup_steps=5)
    current["data"]["num_workers"] = 4
    check_compatible(default_config().to_dict(), current)


def test_another_world_size_with_the_same_global_batch_is_allowed() -> None:
    check_compatible(with_batch(2, 6), with_batch(3, 4))
    check_compatible(with_batch(2, 6), with_batch(1, 6, accum=2))


def test_a_changed_global_batch_is_refused_naming_it() -> None:
    with pytest.raises(CheckpointError) as caught:
        check_compatible(with_batch(2, 3), with_batch(3, 3))
    assert str(caught.value) == (
        "RUN_DIR holds a checkpoint with global batch 6 (world_size=2 x train.micro_batch=3 x train.accum=1) "
        "but this run has global batch 9 (world_size=3 x train.micro_batch=3 x train.accum=1); resuming needs the "
        "same global batch: set MICRO_BATCH and ACCUM so that GPUS x MICRO_BATCH x ACCUM = 6, or use a new RUN_DIR"
    )


def test_load_with_an_incompatible_config_leaves_the_model_untouched(tmp_path: Path) -> None:
    save_trained(tmp_path, [1])
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    current = extra_state(1, dim=256)["config"]
    with pytest.raises(CheckpointError, match=r"model\.dim=128 but this run has model\.dim=256"):
        load(tmp_path, model, make_optimizer(model), config=current)
    assert_bitwise_equal([p.detach() for p in model.parameters()], before)


def test_a_checkpoint_of_the_other_strategy_is_refused(tmp_path: Path) -> None:
    save_trained(tmp_path, [1])
    model = tiny_model()
    with pytest.raises(CheckpointError, match=r"train\.strategy='ddp' but this run has train\.strategy='fsdp'"):
        load(tmp_path, model, make_optimizer(model), strategy="fsdp")
