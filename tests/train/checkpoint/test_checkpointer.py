"""The checkpointer: exact round trips and resume, pruning, a save cut short by a full disk, the fallback
to an older checkpoint and its limits, the preflight, and load_model."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from tests.helpers.checkpoints import (
    assert_bitwise_equal,
    extra_state,
    fail_with_enospc,
    load,
    load_fresh,
    loaded_fresh,
    make_checkpointer,
    make_optimizer,
    optimizer_tensors,
    random_draws,
    save,
    save_trained,
    saved_after_two_steps,
    saved_steps,
    tensor_file,
    tiny_model,
    train_steps,
    warnings_in,
)
from train.checkpoint import Checkpointer, CheckpointError, load_model, records


def test_round_trip_restores_parameters_optimizer_rng_and_extra(tmp_path: Path) -> None:
    model, optimizer = saved_after_two_steps(tmp_path, seed=1)
    expected_params = [p.detach().clone() for p in model.parameters()]
    expected_state = [t.clone() for t in optimizer_tensors(optimizer)]
    expected_draws = random_draws()

    fresh, fresh_optimizer, step, extra = loaded_fresh(tmp_path, seed=99)

    assert step == 2 and extra == extra_state(2)
    assert_bitwise_equal(list(fresh.parameters()), expected_params)
    assert_bitwise_equal(optimizer_tensors(fresh_optimizer), expected_state)
    assert random_draws() == expected_draws


def test_resumed_training_matches_uninterrupted_training_bit_for_bit(tmp_path: Path) -> None:
    model, optimizer = saved_after_two_steps(tmp_path, seed=3)
    train_steps(model, optimizer, 3)

    resumed, resumed_optimizer, _, _ = loaded_fresh(tmp_path, seed=42)
    train_steps(resumed, resumed_optimizer, 3)

    assert_bitwise_equal(list(resumed.parameters()), [p.detach() for p in model.parameters()])
    assert_bitwise_equal(optimizer_tensors(resumed_optimizer), optimizer_tensors(optimizer))


def test_no_checkpoint_loads_as_none(tmp_path: Path) -> None:
    model = tiny_model()
    assert make_checkpointer(tmp_path, model, make_optimizer(model)).load_latest() is None
    assert make_checkpointer(tmp_path, model, make_optimizer(model)).latest_step() is None


def test_keep_two_keeps_only_the_newest_two(tmp_path: Path) -> None:
    save_trained(tmp_path, [1, 2, 3], keep=2)
    assert saved_steps(tmp_path) == ["step-000002", "step-000002.json", "step-000003", "step-000003.json"]
    model = tiny_model()
    assert make_checkpointer(tmp_path, model, make_optimizer(model)).latest_step() == 3


def test_previous_checkpoint_survives_until_the_new_one_is_complete(tmp_path: Path, monkeypatch) -> None:
    model, optimizer = save_trained(tmp_path, [1], keep=1)
    old = [tmp_path / "checkpoints" / "step-000001", tmp_path / "checkpoints" / "step-000001.json"]
    real_replace = os.replace
    seen_commit = []

    def checking_replace(src, dst):
        if Path(dst).name == "step-000002.json":
            seen_commit.append(all(p.exists() for p in old))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", checking_replace)
    save(tmp_path, 2, model, optimizer, extra_state(2), keep=1)
    assert seen_commit == [True]
    assert saved_steps(tmp_path) == ["step-000002", "step-000002.json"]


def fail_sidecar_replace(monkeypatch) -> None:
    """Fail only the last step, the sidecar's rename: the payload is already in place by then."""
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith(".json"):
            fail_with_enospc()
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)


FULL_DISK_POINTS = {
    "write": lambda mp: mp.setattr(records._HashingWriter, "write", fail_with_enospc),
    "fsync": lambda mp: mp.setattr(os, "fsync", fail_with_enospc),
    "replace": lambda mp: mp.setattr(os, "replace", fail_with_enospc),
    "sidecar": fail_sidecar_replace,
}


@pytest.mark.parametrize("point", FULL_DISK_POINTS)
def test_disk_full_keeps_previous_checkpoint_and_no_temp_files(tmp_path: Path, monkeypatch, point: str) -> None:
    model, optimizer = save_trained(tmp_path, [1], keep=1)
    train_steps(model, optimizer, 1)
    FULL_DISK_POINTS[point](monkeypatch)
    with pytest.raises(CheckpointError) as caught:
        save(tmp_path, 2, model, optimizer, extra_state(2), keep=1)
    monkeypatch.undo()
    assert str(caught.value) == (
        "checkpoint for step 2 could not be written (No space left on device); "
        "the previous checkpoint step 1 is intact: free space or set RUN_DIR elsewhere"
    )
    assert saved_steps(tmp_path) == ["step-000001", "step-000001.json"]
    fresh = tiny_model()
    assert load(tmp_path, fresh, make_optimizer(fresh))[0] == 1


def test_first_save_failing_says_none_was_written(tmp_path: Path, monkeypatch) -> None:
    model = tiny_model()
    monkeypatch.setattr(os, "replace", fail_with_enospc)
    with pytest.raises(CheckpointError, match=r"could not be written .*; none was written before: free space"):
        save(tmp_path, 1, model, make_optimizer(model), {})


def test_every_checkpoint_damaged_is_refused_naming_them(tmp_path: Path, caplog) -> None:
    """Issue 10 item 8: no silent start at step 0 over the run's records."""
    save_trained(tmp_path, [1, 2])
    for step in (1, 2):
        damaged = tensor_file(tmp_path, step)
        damaged.write_bytes(damaged.read_bytes()[:-1])
    with pytest.raises(CheckpointError) as caught:
        load_fresh(tmp_path)
    message = str(caught.value)
    assert "\n" not in message and "step-000002, step-000001" in message
    assert "move them away" in message and "fresh RUN_DIR" in message
    assert len(warnings_in(caplog)) == 2


def test_only_unfinished_checkpoints_start_afresh(tmp_path: Path) -> None:
    """A save cut short before its first sidecar left nothing to resume: starting at step 0 is right."""
    save_trained(tmp_path, [1])
    (tmp_path / "checkpoints" / "step-000001.json").unlink()
    assert load_fresh(tmp_path) is None


def test_a_checkpoint_of_the_older_format_is_refused_in_one_line(tmp_path: Path) -> None:
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    (ckpts / "step-000004.pt").write_bytes(b"format 1 payload")
    record = {"sha256": hashlib.sha256(b"format 1 payload").hexdigest(), "size": 16}
    sidecar = {"format": 1, "step": 4, "world_size": 2, "strategy": "ddp", "files": {"step-000004.pt": record}}
    (ckpts / "step-000004.json").write_text(json.dumps(sidecar))
    with pytest.raises(CheckpointError) as caught:
        load_fresh(tmp_path)
    assert str(caught.value) == (
        "checkpoint step-000004 is from another torchrig checkpoint format (1; this version reads 2); "
        "resume it with the torchrig version that wrote it, or use a fresh RUN_DIR"
    )


def preflight_checkpointer(run_dir: Path) -> Checkpointer:
    model = tiny_model()
    return make_checkpointer(run_dir, model, make_optimizer(model))


def test_preflight_creates_a_writable_directory(tmp_path: Path) -> None:
    preflight_checkpointer(tmp_path / "run").preflight(1024)
    assert (tmp_path / "run" / "checkpoints").is_dir()
    assert saved_steps(tmp_path / "run") == []


def test_preflight_refuses_a_directory_that_cannot_be_created(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    with pytest.raises(
        CheckpointError, match=r"^cannot create checkpoint directory .*; fix its permissions or set RUN_DIR"
    ):
        preflight_checkpointer(tmp_path / "a-file" / "run").preflight(1024)


def test_preflight_refuses_an_unwritable_directory(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # chmod does not stop root
    with pytest.raises(CheckpointError, match=r"is not writable; fix its permissions or set RUN_DIR elsewhere$"):
        preflight_checkpointer(tmp_path).preflight(1024)


def test_preflight_refuses_too_little_free_space(tmp_path: Path, monkeypatch) -> None:
    real_usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real_usage._replace(free=3 * 2**30))
    preflight_checkpointer(tmp_path).preflight(2**30)
    with pytest.raises(CheckpointError) as caught:
        preflight_checkpointer(tmp_path).preflight(2 * 2**30)
    message = str(caught.value)
    assert "\n" not in message and "3.00 GiB free" in message and "free space or set RUN_DIR elsewhere" in message


def test_load_model_reads_the_weights_of_either_strategy_in_one_process(tmp_path: Path) -> None:
    for strategy in ("ddp", "fsdp"):
        model, _ = saved_after_two_steps(tmp_path / strategy, seed=13, strategy=strategy)
        fresh = tiny_model()
        assert load_model(tmp_path / strategy, fresh) == 2
        assert_bitwise_equal(list(fresh.parameters()), [p.detach() for p in model.parameters()])
    assert load_model(tmp_path / "none", tiny_model()) is None
