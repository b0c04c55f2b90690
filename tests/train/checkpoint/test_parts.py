"""The Stateful parts: the RNG state, and a part of one's own added to the dict with no other file changing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers.checkpoints import Counter, Extra, make_optimizer, parts, random_draws, seed_all, tiny_model
from train.checkpoint import Checkpointer, CheckpointError, capture_rng, restore_rng


def test_rng_capture_and_restore() -> None:
    seed_all(5)
    state = capture_rng()
    expected = random_draws()
    seed_all(6)
    restore_rng(state)
    assert random_draws() == expected


def test_a_toy_stateful_added_to_the_dict_round_trips(tmp_path: Path) -> None:
    model = tiny_model()
    optimizer = make_optimizer(model)
    counter = Counter()
    counter.total += torch.tensor([1.0, 2.0, 3.0])
    counter.count = 7
    Checkpointer(tmp_path, {**parts(model, optimizer, Extra()), "counter": counter}, keep=1, rank=0, world_size=1,
                 strategy="ddp").save(1)  # fmt: skip
    fresh = Counter()
    step = Checkpointer(tmp_path, {"counter": fresh}, keep=1, rank=0, world_size=1, strategy="ddp").load_latest()
    assert step == 1 and fresh.count == 7 and torch.equal(fresh.total, torch.tensor([1.0, 2.0, 3.0]))
    # A run whose dict holds a state the checkpoint lacks is refused in one line, not started afresh.
    with pytest.raises(CheckpointError, match=r"holds no state for later \(it holds counter, extra, model"):
        Checkpointer(tmp_path, {"counter": Counter(), "later": Counter()}, keep=1, rank=0, world_size=1,
                     strategy="ddp").load_latest()  # fmt: skip
