"""Issue 16 class 4: readers race the checkpoint pruner, and the words about checkpoints that are gone.

During a run with ckpt_every=1 keep_ckpts=1, `make eval` said "every checkpoint … is damaged … restore
one, or retrain" about a healthy run, and sample and export "no usable checkpoint". A checkpoint that
disappears while it is read was pruned, not damaged: the reader lists them again and reads the
newest. The pruner is played here by the test, at the moment a reader is inside a checkpoint, exactly
as the trainer does it (a newer checkpoint committed, then the older one's sidecar, then its files).
"""

from __future__ import annotations

import errno
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from env.common.cli import UserError
from tests.helpers.sampling import small_config, trained_in_process
from train.checkpoint import Checkpointer, CheckpointError, checkpointer, records, storage
from train.distributed import DistInfo
from train.run import build_optimizer, checkpoint_parts
from train.weights import load_model_weights


def save(run_dir: Path, model: torch.nn.Module, step: int, keep: int) -> Checkpointer:
    """One training save at `step`, pruning to the newest `keep` as the trainer does."""
    cfg = small_config()
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    info = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend="gloo")
    parts = checkpoint_parts(model, optimizer, torch.amp.GradScaler("cpu", enabled=False), info)
    saver = Checkpointer(
        run_dir, parts, keep=keep, rank=0, world_size=1, strategy="ddp", config={**cfg.to_dict(), "world_size": 1}
    )
    saver.save(step)
    return saver


@pytest.fixture(scope="module")
def models() -> dict[int, torch.nn.Module]:
    cfg = small_config()
    return {step: trained_in_process(cfg, steps=1, seed=step) for step in range(1, 12)}


def prune_while_reading(
    monkeypatch: pytest.MonkeyPatch, module: object, name: str, run_dir: Path, models: dict, times: int
) -> list[int]:
    """Wrap module.name so that its first `times` calls each see the run save its next step with keep_ckpts=1."""
    real: Callable = getattr(module, name)
    saved: list[int] = []

    def racing(*args: object, **kwargs: object) -> object:
        if len(saved) < times:
            step = 2 + len(saved) + 1
            save(run_dir, models[step], step, keep=1)
            saved.append(step)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, racing)
    return saved


@pytest.mark.parametrize(
    ("module", "name"),
    [(records, "hash_file"), (storage, "read_header"), (storage, "read_tensors")],
    ids=["while hashing", "while reading the header", "while loading the tensors"],
)
def test_a_checkpoint_pruned_while_read_is_no_damage_the_newest_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, models: dict, module, name
) -> None:
    for step in (1, 2):
        save(tmp_path, models[step], step, keep=2)
    saved = prune_while_reading(monkeypatch, module, name, tmp_path, models, times=1)
    with caplog.at_level(logging.WARNING):
        state, _, step = load_model_weights(tmp_path)
    assert saved == [3] and step == 3
    assert all(torch.equal(state[k], v) for k, v in models[3].state_dict().items())
    # Ours, and the root logger's: torch's distributed-checkpoint logger records the vanished file to its own
    # NullHandler (never printed); its root-logger line, which would be, is hidden (storage._quiet_dcp).
    ours = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith(("train", "env", "root"))]
    assert not ours, "a pruned checkpoint was reported"


def test_a_reader_slower_than_the_runs_steps_says_so_without_calling_anything_damaged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, models: dict
) -> None:
    for step in (1, 2):
        save(tmp_path, models[step], step, keep=2)
    prune_while_reading(monkeypatch, storage, "read_header", tmp_path, models, times=checkpointer.READ_ROUNDS)
    with pytest.raises(UserError) as caught:
        load_model_weights(tmp_path)
    message = str(caught.value)
    assert f"replaced {checkpointer.READ_ROUNDS} times while being read" in message and "nothing is damaged" in message
    assert "retrain" not in message and "every checkpoint" not in message and "\n" not in message


def test_a_really_damaged_checkpoint_is_still_reported_and_skipped(tmp_path: Path, models: dict, caplog) -> None:
    for step in (1, 2):
        save(tmp_path, models[step], step, keep=2)
    tensors = max((tmp_path / "checkpoints" / "step-000002").glob("*.distcp"), key=lambda p: p.stat().st_size)
    tensors.write_bytes(tensors.read_bytes()[:-4] + b"oops")
    with caplog.at_level(logging.WARNING):
        _, _, step = load_model_weights(tmp_path)
    assert step == 1 and any("corrupt" in r.getMessage() for r in caplog.records)


def test_removed_checkpoints_are_named_as_removed_not_as_never_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, models: dict
) -> None:
    """`rm -rf RUN_DIR/checkpoints` mid-run said "none was written before" after three were."""
    from train.trainer import last_checkpoint_note

    saver = save(tmp_path, models[1], 1, keep=3)
    saver.save(2)
    saver.save(3)
    shutil.rmtree(tmp_path / "checkpoints")

    def no_room(*args: object) -> None:
        raise OSError(errno.ENOENT, "No such file or directory")

    monkeypatch.setattr(storage, "write_tensors", no_room)
    with pytest.raises(CheckpointError) as caught:
        saver.save(4)
    message = str(caught.value)
    assert "none was written before" not in message
    assert "the last at step 3" in message and "was it removed?" in message
    note = last_checkpoint_note(saver)
    assert "no checkpoint was written yet" not in note and "step 3, is gone" in note


@pytest.mark.parametrize("read", ["weights", "config"])
def test_every_checkpoint_really_damaged_is_said_in_a_readers_words(tmp_path: Path, models: dict, read: str) -> None:
    """A reader (sample, export, eval, init_from) is never told it would "train over this run's records"."""
    from train.weights import DamagedCheckpoints, load_model_weights, saved_config

    for step in (1, 2):
        save(tmp_path, models[step], step, keep=2)
        tensors = max((tmp_path / "checkpoints" / f"step-00000{step}").glob("*.distcp"), key=lambda p: p.stat().st_size)
        tensors.write_bytes(tensors.read_bytes()[:-4] + b"oops")
    with pytest.raises(DamagedCheckpoints) as caught:
        (load_model_weights if read == "weights" else saved_config)(tmp_path)
    message = str(caught.value)
    assert "step-000002, step-000001" in message and "restore them from a copy" in message
    assert "train over" not in message and "retrain" not in message
