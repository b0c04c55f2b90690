"""One checkpoint entry on disk: unwrapped DCP tensors and a plain header, temporaries never reached
through a link, and the FSDP strategy's sharded format in one process."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from tests.helpers.checkpoints import (
    Extra,
    assert_bitwise_equal,
    extra_state,
    fail_with_enospc,
    load,
    loaded_fresh,
    make_checkpointer,
    make_optimizer,
    optimizer_tensors,
    random_draws,
    save,
    save_trained,
    saved_after_two_steps,
    saved_steps,
    tiny_model,
    train_steps,
)
from train.checkpoint import CheckpointError


def test_checkpoint_is_unwrapped_state_with_a_sidecar(tmp_path: Path) -> None:
    from torch.distributed.checkpoint import FileSystemReader

    model, _ = save_trained(tmp_path, [7])
    entry = tmp_path / "checkpoints" / "step-000007"
    sidecar = json.loads((tmp_path / "checkpoints" / "step-000007.json").read_text())
    on_disk = {f"step-000007/{p.name}" for p in entry.iterdir()}
    assert set(sidecar["files"]) == on_disk and "step-000007/header.pt" in on_disk
    for name, record in sidecar["files"].items():
        path = tmp_path / "checkpoints" / name
        assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert record["size"] == path.stat().st_size
    assert sidecar["step"] == 7 and sidecar["world_size"] == 1 and sidecar["torch"] == torch.__version__
    keys = FileSystemReader(entry).read_metadata().state_dict_metadata
    assert {k.removeprefix("model.") for k in keys if k.startswith("model.")} == set(model.state_dict())
    header = torch.load(entry / "header.pt", weights_only=True, map_location="cpu")
    assert header["step"] == 7 and header["part_names"] == ["extra", "model", "optimizer", "rng"]


def test_a_link_at_a_temporary_name_never_redirects_a_save(tmp_path: Path) -> None:
    """Issue 10 item 2: temporaries are created exclusively under random names, never through a link."""
    model, optimizer = save_trained(tmp_path, [1])
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    (tmp_path / "victim-dir").mkdir()
    ckpts = tmp_path / "checkpoints"
    # Every name a save used to write under (torchrig before: predictable), and the sidecar's.
    for name in (".tmp-step-000002.pt", ".tmp-step-000002.json", ".tmp-step-000002.json.tmp", ".tmp-preflight-0"):
        (ckpts / name).symlink_to(victim)
    (ckpts / ".tmp-step-000002").symlink_to(tmp_path / "victim-dir")
    checkpointer = make_checkpointer(tmp_path, model, optimizer, Extra(extra_state(2)))
    checkpointer.preflight(1024)
    checkpointer.save(2)
    assert victim.read_text() == "untouched" and list((tmp_path / "victim-dir").iterdir()) == []
    fresh = tiny_model()
    assert load(tmp_path, fresh, make_optimizer(fresh))[0] == 2
    assert saved_steps(tmp_path) == ["step-000001", "step-000001.json", "step-000002", "step-000002.json"]


def test_sharded_format_round_trip_in_one_process(tmp_path: Path) -> None:
    model, optimizer = saved_after_two_steps(tmp_path, seed=11, strategy="fsdp")
    expected_params = [p.detach().clone() for p in model.parameters()]
    expected_state = [t.clone() for t in optimizer_tensors(optimizer)]
    expected_draws = random_draws()

    fresh, fresh_optimizer, step, extra = loaded_fresh(tmp_path, seed=12, strategy="fsdp")
    assert step == 2 and extra == extra_state(2)
    assert_bitwise_equal(list(fresh.parameters()), expected_params)
    assert_bitwise_equal(optimizer_tensors(fresh_optimizer), expected_state)
    assert random_draws() == expected_draws


def test_sharded_save_on_a_full_disk_keeps_the_previous(tmp_path: Path, monkeypatch) -> None:
    model = tiny_model()
    optimizer = make_optimizer(model)
    train_steps(model, optimizer, 1)
    save(tmp_path, 1, model, optimizer, {}, strategy="fsdp")
    monkeypatch.setattr(os, "fsync", fail_with_enospc)
    with pytest.raises(CheckpointError) as caught:
        save(tmp_path, 2, model, optimizer, {}, strategy="fsdp")
    monkeypatch.undo()
    assert str(caught.value) == (
        "checkpoint for step 2 could not be written (No space left on device); "
        "the previous checkpoint step 1 is intact: free space or set RUN_DIR elsewhere"
    )
    assert saved_steps(tmp_path) == ["step-000001", "step-000001.json"]
