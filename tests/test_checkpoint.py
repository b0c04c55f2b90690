"""Checkpoints: exact round trips, atomic writes, pruning, corruption, code-running pickles, resume rules."""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import logging
import os
import pickle
import random
import shutil
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from tests.conftest import finish_gloo_worker, free_port
from train import checkpoint
from train.checkpoint import Checkpointer, CheckpointError, capture_rng, check_compatible, restore_rng
from train.config import RunConfig


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.Tanh(), nn.Linear(8, 2))


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    """Steps whose data and dropout come from the global RNGs, so a resume must restore them exactly."""
    for _ in range(steps):
        inputs = torch.randn(16, 4) + random.random() + float(np.random.rand())
        loss = model(inputs).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_checkpointer(run_dir: Path, keep: int = 3) -> Checkpointer:
    return Checkpointer(run_dir, keep=keep, rank=0, world_size=1, strategy="ddp")


def extra_state(step: int, dim: int = 128) -> dict:
    config = RunConfig()
    config.model.dim = dim
    return {
        "data_position": step * 16,
        "scheduler": {"last_epoch": step, "_last_lr": [0.01]},
        "config": config.to_dict(),
    }


def saved_steps(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [t for state in optimizer.state.values() for t in state.values()]


def assert_bitwise_equal(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert a.dtype == e.dtype and torch.equal(a, e)


def random_draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def save_trained(run_dir: Path, steps: list[int], keep: int = 3) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = tiny_model()
    optimizer = make_optimizer(model)
    ckpt = make_checkpointer(run_dir, keep)
    for step in steps:
        train_steps(model, optimizer, 1)
        ckpt.save(step, model, optimizer, extra_state(step))
    return model, optimizer


def saved_after_two_steps(ckpt: Checkpointer, seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A model and optimizer trained two steps from seed and saved as step 2: the RNGs are as the save found them."""
    seed_all(seed)
    model = tiny_model()
    optimizer = make_optimizer(model)
    train_steps(model, optimizer, 2)
    ckpt.save(2, model, optimizer, extra_state(2))
    return model, optimizer


def loaded_fresh(ckpt: Checkpointer, seed: int) -> tuple[nn.Module, torch.optim.Optimizer, dict | None]:
    """A new model and optimizer, made under other RNGs (seed), with ckpt's newest checkpoint loaded into them."""
    seed_all(seed)
    model = tiny_model()
    optimizer = make_optimizer(model)
    return model, optimizer, ckpt.load_latest(model, optimizer)


# ---------------------------------------------------------------------------------------------
# Round trip and exact resume


def test_round_trip_restores_parameters_optimizer_rng_and_extra(tmp_path: Path) -> None:
    model, optimizer = saved_after_two_steps(make_checkpointer(tmp_path), seed=1)
    expected_params = [p.detach().clone() for p in model.parameters()]
    expected_state = [t.clone() for t in optimizer_tensors(optimizer)]
    expected_draws = random_draws()

    fresh, fresh_optimizer, extra = loaded_fresh(make_checkpointer(tmp_path), seed=99)

    assert extra == {**extra_state(2), "step": 2}
    assert_bitwise_equal(list(fresh.parameters()), expected_params)
    assert_bitwise_equal(optimizer_tensors(fresh_optimizer), expected_state)
    assert random_draws() == expected_draws


def test_resumed_training_matches_uninterrupted_training_bit_for_bit(tmp_path: Path) -> None:
    model, optimizer = saved_after_two_steps(make_checkpointer(tmp_path), seed=3)
    train_steps(model, optimizer, 3)

    resumed, resumed_optimizer, _ = loaded_fresh(make_checkpointer(tmp_path), seed=42)
    train_steps(resumed, resumed_optimizer, 3)

    assert_bitwise_equal(list(resumed.parameters()), [p.detach() for p in model.parameters()])
    assert_bitwise_equal(optimizer_tensors(resumed_optimizer), optimizer_tensors(optimizer))


def test_no_checkpoint_loads_as_none(tmp_path: Path) -> None:
    model = tiny_model()
    assert make_checkpointer(tmp_path).load_latest(model, make_optimizer(model)) is None
    assert make_checkpointer(tmp_path).latest_step() is None


def test_rng_capture_and_restore() -> None:
    seed_all(5)
    state = capture_rng()
    expected = random_draws()
    seed_all(6)
    restore_rng(state)
    assert random_draws() == expected


def test_allowed_extra_values_load_weights_only(tmp_path: Path) -> None:
    values = {
        "none": None,
        "flag": True,
        "count": 3,
        "ratio": 0.5,
        "name": "x",
        "dtype": torch.bfloat16,
        "device": torch.device("cpu"),
        "shape": torch.Size([2, 3]),
        "nested": {1: [1, (2, 3.0)], "t": torch.arange(3)},
    }
    model, optimizer = save_trained(tmp_path, [1])
    make_checkpointer(tmp_path).save(2, model, optimizer, values)
    extra = make_checkpointer(tmp_path).load_latest(model, optimizer)
    assert extra is not None and extra["step"] == 2
    assert torch.equal(extra.pop("nested")["t"], torch.arange(3))
    assert {k: v for k, v in extra.items() if k != "step"} == {k: v for k, v in values.items() if k != "nested"}


def test_extra_that_is_not_plain_data_is_refused_before_writing(tmp_path: Path) -> None:
    model, optimizer = save_trained(tmp_path, [1])
    with pytest.raises(CheckpointError) as caught:
        make_checkpointer(tmp_path).save(2, model, optimizer, {"data": {"pos": np.int64(3)}})
    message = str(caught.value)
    assert "\n" not in message and "['data']['pos']" in message and "numpy" in message
    assert saved_steps(tmp_path) == ["step-000001.json", "step-000001.pt"]


class KeepsNumpyExtraState(nn.Linear):
    def get_extra_state(self) -> object:
        return np.zeros(2)

    def set_extra_state(self, state: object) -> None:
        pass


def test_model_state_that_is_not_plain_data_is_refused_before_writing(tmp_path: Path) -> None:
    model = nn.Sequential(KeepsNumpyExtraState(2, 2))
    with pytest.raises(CheckpointError, match=r"\['model'\]\['0\._extra_state'\] is a numpy\.ndarray"):
        make_checkpointer(tmp_path).save(1, model, make_optimizer(model), {})
    assert saved_steps(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# Layout, atomicity, pruning


def test_checkpoint_is_unwrapped_state_with_a_sidecar(tmp_path: Path) -> None:
    model, _ = save_trained(tmp_path, [7])
    path = tmp_path / "checkpoints" / "step-000007.pt"
    sidecar = json.loads((tmp_path / "checkpoints" / "step-000007.json").read_text())
    record = sidecar["files"]["step-000007.pt"]
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert record["size"] == path.stat().st_size
    assert sidecar["step"] == 7 and sidecar["world_size"] == 1 and sidecar["torch"] == torch.__version__
    payload = torch.load(path, weights_only=True, map_location="cpu")
    assert set(payload["model"]) == set(model.state_dict())


def test_keep_two_keeps_only_the_newest_two(tmp_path: Path) -> None:
    save_trained(tmp_path, [1, 2, 3], keep=2)
    assert saved_steps(tmp_path) == ["step-000002.json", "step-000002.pt", "step-000003.json", "step-000003.pt"]
    assert make_checkpointer(tmp_path).latest_step() == 3


def test_previous_checkpoint_survives_until_the_new_one_is_complete(tmp_path: Path, monkeypatch) -> None:
    model, optimizer = save_trained(tmp_path, [1], keep=1)
    old = [tmp_path / "checkpoints" / "step-000001.pt", tmp_path / "checkpoints" / "step-000001.json"]
    real_replace = os.replace
    seen_commit = []

    def checking_replace(src, dst):
        if Path(dst).name == "step-000002.json":
            seen_commit.append(all(p.exists() for p in old))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", checking_replace)
    make_checkpointer(tmp_path, keep=1).save(2, model, optimizer, extra_state(2))
    assert seen_commit == [True]
    assert saved_steps(tmp_path) == ["step-000002.json", "step-000002.pt"]


def _fail_with_enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def fail_sidecar_replace(monkeypatch) -> None:
    """Fail only the last step, the sidecar's rename: the payload is already in place by then."""
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith(".json"):
            _fail_with_enospc()
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)


FULL_DISK_POINTS = {
    "write": lambda mp: mp.setattr(checkpoint._HashingWriter, "write", _fail_with_enospc),
    "fsync": lambda mp: mp.setattr(os, "fsync", _fail_with_enospc),
    "replace": lambda mp: mp.setattr(os, "replace", _fail_with_enospc),
    "sidecar": fail_sidecar_replace,
}


@pytest.mark.parametrize("point", FULL_DISK_POINTS)
def test_disk_full_keeps_previous_checkpoint_and_no_temp_files(tmp_path: Path, monkeypatch, point: str) -> None:
    model, optimizer = save_trained(tmp_path, [1], keep=1)
    train_steps(model, optimizer, 1)
    FULL_DISK_POINTS[point](monkeypatch)
    with pytest.raises(CheckpointError) as caught:
        make_checkpointer(tmp_path, keep=1).save(2, model, optimizer, extra_state(2))
    monkeypatch.undo()
    assert str(caught.value) == (
        "checkpoint for step 2 could not be written (No space left on device); "
        "the previous checkpoint step 1 is intact: free space or set RUN_DIR elsewhere"
    )
    assert saved_steps(tmp_path) == ["step-000001.json", "step-000001.pt"]
    fresh = tiny_model()
    assert make_checkpointer(tmp_path).load_latest(fresh, make_optimizer(fresh))["step"] == 1


def test_first_save_failing_says_none_was_written(tmp_path: Path, monkeypatch) -> None:
    model = tiny_model()
    monkeypatch.setattr(os, "replace", _fail_with_enospc)
    with pytest.raises(CheckpointError, match=r"could not be written .*; none was written before: free space"):
        make_checkpointer(tmp_path).save(1, model, make_optimizer(model), {})


# ---------------------------------------------------------------------------------------------
# Damaged and hostile checkpoints


def warnings_in(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def load_fresh(run_dir: Path) -> dict | None:
    model = tiny_model()
    return make_checkpointer(run_dir).load_latest(model, make_optimizer(model))


def test_truncated_newest_checkpoint_falls_back_to_the_one_before(tmp_path: Path, caplog) -> None:
    save_trained(tmp_path, [1, 2])
    newest = tmp_path / "checkpoints" / "step-000002.pt"
    newest.write_bytes(newest.read_bytes()[:-100])
    assert load_fresh(tmp_path)["step"] == 1
    (line,) = warnings_in(caplog)
    assert "step-000002.pt" in line and "truncated" in line and "\n" not in line


def test_corrupted_bytes_of_the_same_size_are_caught_by_the_checksum(tmp_path: Path, caplog) -> None:
    save_trained(tmp_path, [1, 2])
    newest = tmp_path / "checkpoints" / "step-000002.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    assert load_fresh(tmp_path)["step"] == 1
    (line,) = warnings_in(caplog)
    assert "step-000002.pt" in line and "sha256" in line


def test_checkpoint_without_sidecar_is_incomplete_and_skipped(tmp_path: Path, caplog) -> None:
    save_trained(tmp_path, [1, 2])
    (tmp_path / "checkpoints" / "step-000002.json").unlink()
    assert make_checkpointer(tmp_path).latest_step() == 1
    assert load_fresh(tmp_path)["step"] == 1
    (line,) = warnings_in(caplog)
    assert "step-000002.pt" in line and "incomplete" in line


class MakesMarkerWhenUnpickled:
    """Pickles to a call of os.mkdir(marker): harmless, but visible if a loader ever ran it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def write_with_matching_sidecar(run_dir: Path, step: int, obj: object) -> None:
    """A hostile checkpoint that passes the checksum: only refusing to run code can stop it."""
    name = f"step-{step:06d}.pt"
    path = run_dir / "checkpoints" / name
    torch.save(obj, path)
    record = {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "size": path.stat().st_size}
    sidecar = {"format": 1, "step": step, "world_size": 1, "files": {name: record}}
    (run_dir / "checkpoints" / f"step-{step:06d}.json").write_text(json.dumps(sidecar))


def test_pickle_that_would_run_code_is_refused_and_the_previous_used(tmp_path: Path, caplog) -> None:
    save_trained(tmp_path, [1])
    marker = tmp_path / "code-ran"
    write_with_matching_sidecar(tmp_path, 2, {"model": MakesMarkerWhenUnpickled(marker), "step": 2})
    assert load_fresh(tmp_path)["step"] == 1
    assert not marker.exists()
    (line,) = warnings_in(caplog)
    assert "step-000002.pt" in line and "not plain data" in line and "refused" in line


def test_dcp_metadata_that_would_run_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    metadata = tmp_path / ".metadata"
    metadata.write_bytes(pickle.dumps(MakesMarkerWhenUnpickled(marker)))
    with pytest.raises(pickle.UnpicklingError, match="mkdir"):
        checkpoint._check_dcp_metadata(metadata)
    assert not marker.exists()


def test_dcp_metadata_declaring_pickled_bytes_is_refused(tmp_path: Path) -> None:
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

    metadata = tmp_path / ".metadata"
    metadata.write_bytes(pickle.dumps(Metadata(state_dict_metadata={"model.w": BytesStorageMetadata()})))
    with pytest.raises(pickle.UnpicklingError, match="other than tensors"):
        checkpoint._check_dcp_metadata(metadata)


# ---------------------------------------------------------------------------------------------
# Preflight


def test_preflight_creates_a_writable_directory(tmp_path: Path) -> None:
    make_checkpointer(tmp_path / "run").preflight(1024)
    assert (tmp_path / "run" / "checkpoints").is_dir()
    assert saved_steps(tmp_path / "run") == []


def test_preflight_refuses_a_directory_that_cannot_be_created(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    with pytest.raises(
        CheckpointError, match=r"^cannot create checkpoint directory .*; fix its permissions or set RUN_DIR"
    ):
        make_checkpointer(tmp_path / "a-file" / "run").preflight(1024)


def test_preflight_refuses_an_unwritable_directory(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # chmod does not stop root
    with pytest.raises(CheckpointError, match=r"is not writable; fix its permissions or set RUN_DIR elsewhere$"):
        make_checkpointer(tmp_path).preflight(1024)


def test_preflight_refuses_too_little_free_space(tmp_path: Path, monkeypatch) -> None:
    real_usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real_usage._replace(free=3 * 2**30))
    make_checkpointer(tmp_path).preflight(2**30)
    with pytest.raises(CheckpointError) as caught:
        make_checkpointer(tmp_path).preflight(2 * 2**30)
    message = str(caught.value)
    assert "\n" not in message and "3.00 GiB free" in message and "free space or set RUN_DIR elsewhere" in message


# ---------------------------------------------------------------------------------------------
# Resume rules


def test_model_shape_change_is_refused_naming_the_key() -> None:
    saved, current = RunConfig().to_dict(), RunConfig().to_dict()
    current["model"]["dim"] = 256
    with pytest.raises(CheckpointError) as caught:
        check_compatible(saved, current)
    assert str(caught.value) == (
        "RUN_DIR holds a checkpoint with model.dim=128 but this run has model.dim=256; "
        "use a new RUN_DIR or restore the config"
    )


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [("train", "micro_batch", 4), ("train", "accum", 2), ("train", "seed", 7), ("data", "seq_len", 64)],
)
def test_batch_data_and_seed_changes_are_refused(section: str, key: str, value: object) -> None:
    current = RunConfig().to_dict()
    current[section][key] = value
    with pytest.raises(CheckpointError, match=rf"{section}\.{key}="):
        check_compatible(RunConfig().to_dict(), current)


def test_budget_logging_and_schedule_changes_are_allowed() -> None:
    current = RunConfig().to_dict()
    current["train"].update(steps=5000, log_every=1, ckpt_every=7, keep_ckpts=1, lr=3e-4, warmup_steps=5)
    current["data"]["num_workers"] = 4
    check_compatible(RunConfig().to_dict(), current)


def test_world_size_change_is_refused() -> None:
    with pytest.raises(CheckpointError, match="world_size=2 but this run has world_size=3"):
        check_compatible({**RunConfig().to_dict(), "world_size": 2}, {**RunConfig().to_dict(), "world_size": 3})


def test_load_with_an_incompatible_config_leaves_the_model_untouched(tmp_path: Path) -> None:
    save_trained(tmp_path, [1])
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    current = extra_state(1, dim=256)["config"]
    with pytest.raises(CheckpointError, match=r"model\.dim=128 but this run has model\.dim=256"):
        make_checkpointer(tmp_path).load_latest(model, make_optimizer(model), config=current)
    assert_bitwise_equal([p.detach() for p in model.parameters()], before)


def test_a_checkpoint_from_another_world_size_is_refused(tmp_path: Path) -> None:
    save_trained(tmp_path, [1])
    model = tiny_model()
    other = Checkpointer(tmp_path, keep=3, rank=0, world_size=2, strategy="ddp")
    with pytest.raises(CheckpointError, match="world_size=1 but this run has world_size=2"):
        other.load_latest(model, make_optimizer(model))


# ---------------------------------------------------------------------------------------------
# Several processes (gloo)


def join_group(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))


def ddp_worker(rank: int, port: int, run_dir: str) -> None:
    join_group(rank, port)
    model = nn.parallel.DistributedDataParallel(tiny_model())
    optimizer = make_optimizer(model)
    seed_all(100 + rank)  # each rank's own data and dropout
    train_steps(model, optimizer, 2)
    ckpt = Checkpointer(Path(run_dir), keep=2, rank=rank, world_size=2, strategy="ddp")
    ckpt.save(2, model, optimizer, extra_state(2))
    expected_params = [p.detach().clone() for p in model.parameters()]
    expected_state = copy.deepcopy(optimizer.state_dict()["state"])
    expected_draws = random_draws()

    # A failed write on rank 0 must reach every rank as the same error, not a hang.
    train_steps(model, optimizer, 1)
    if rank == 0:
        real_replace, os.replace = os.replace, _fail_with_enospc
    with pytest.raises(CheckpointError, match=r"step 3 could not be written .* previous checkpoint step 2 is intact"):
        ckpt.save(3, model, optimizer, extra_state(3))
    if rank == 0:
        os.replace = real_replace

    seed_all(7)
    extra = ckpt.load_latest(model, optimizer)
    assert extra["step"] == 2
    assert_bitwise_equal([p.detach() for p in model.parameters()], expected_params)
    for index, state in optimizer.state_dict()["state"].items():
        assert_bitwise_equal(list(state.values()), list(expected_state[index].values()))
    draws = random_draws()
    assert draws == expected_draws
    both = [None, None]
    dist.all_gather_object(both, draws)
    assert both[0] != both[1]  # each rank got its own generator back, not rank 0's
    if rank == 0:  # the file holds the bare model: no "module." prefix
        plain = tiny_model()
        plain.load_state_dict(torch.load(Path(run_dir) / "checkpoints" / "step-000002.pt", weights_only=True)["model"])
        assert_bitwise_equal([p.detach() for p in plain.parameters()], expected_params)
    # A node that cannot see rank 0's RUN_DIR is told so on every rank, instead of starting afresh.
    own_dir = Path(run_dir) if rank == 0 else Path(run_dir) / "elsewhere"
    unshared = Checkpointer(own_dir, keep=2, rank=rank, world_size=2, strategy="ddp")
    with pytest.raises(CheckpointError, match=r"rank 1 cannot see .*; put RUN_DIR on storage that every node shares"):
        unshared.load_latest(model, optimizer)
    finish_gloo_worker()


@pytest.mark.slow
def test_ddp_two_ranks_save_on_rank0_and_both_restore(tmp_path: Path) -> None:
    mp.spawn(ddp_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    assert saved_steps(tmp_path) == ["step-000002.json", "step-000002.pt"]


def fully_shard_fn():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


def fsdp_train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    """Optimizer steps on random gradients: FSDP2's forward needs CUDA streams on torch 2.4, its optimizer does not."""
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def local_shards(tensors) -> list[torch.Tensor]:
    return [t.to_local().detach().clone() if hasattr(t, "to_local") else t.detach().clone() for t in tensors]


def fsdp_worker(rank: int, port: int, run_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    join_group(rank, port)
    fully_shard = fully_shard_fn()
    mesh = init_device_mesh("cpu", (2,))
    model = tiny_model()
    for layer in (model[0], model[3]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = make_optimizer(model)
    seed_all(200 + rank)
    fsdp_train_steps(model, optimizer, 2)
    ckpt = Checkpointer(Path(run_dir), keep=1, rank=rank, world_size=2, strategy="fsdp")
    ckpt.save(1, model, optimizer, extra_state(1))
    fsdp_train_steps(model, optimizer, 1)
    ckpt.save(2, model, optimizer, extra_state(2))
    expected_params = local_shards(model.parameters())
    expected_state = local_shards(optimizer_tensors(optimizer))
    expected_lr = [g["lr"] for g in optimizer.param_groups]
    expected_draws = random_draws()

    fsdp_train_steps(model, optimizer, 2)
    for group in optimizer.param_groups:
        group["lr"] = 0.5
    seed_all(9)
    extra = ckpt.load_latest(model, optimizer)
    assert extra["step"] == 2 and extra["data_position"] == 32
    assert_bitwise_equal(local_shards(model.parameters()), expected_params)
    assert_bitwise_equal(local_shards(optimizer_tensors(optimizer)), expected_state)
    assert [g["lr"] for g in optimizer.param_groups] == expected_lr
    assert random_draws() == expected_draws
    finish_gloo_worker()


@pytest.mark.slow
def test_fsdp2_two_ranks_sharded_save_and_restore(tmp_path: Path) -> None:
    mp.spawn(fsdp_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    names = saved_steps(tmp_path)
    assert names == ["step-000002", "step-000002.json"]  # keep=1 pruned step 1 once step 2 was complete
    sidecar = json.loads((tmp_path / "checkpoints" / "step-000002.json").read_text())
    on_disk = {f"step-000002/{p.name}" for p in (tmp_path / "checkpoints" / "step-000002").iterdir()}
    assert set(sidecar["files"]) == on_disk and "step-000002/extra.pt" in on_disk
    for name, record in sidecar["files"].items():
        assert hashlib.sha256((tmp_path / "checkpoints" / name).read_bytes()).hexdigest() == record["sha256"]


# ---------------------------------------------------------------------------------------------
# The sharded (DCP) format in one process


def make_sharded_checkpointer(run_dir: Path, keep: int = 3) -> Checkpointer:
    return Checkpointer(run_dir, keep=keep, rank=0, world_size=1, strategy="fsdp")


def test_sharded_format_round_trip_in_one_process(tmp_path: Path) -> None:
    model, optimizer = saved_after_two_steps(make_sharded_checkpointer(tmp_path), seed=11)
    expected_params = [p.detach().clone() for p in model.parameters()]
    expected_state = [t.clone() for t in optimizer_tensors(optimizer)]
    expected_draws = random_draws()

    fresh, fresh_optimizer, extra = loaded_fresh(make_sharded_checkpointer(tmp_path), seed=12)
    assert extra == {**extra_state(2), "step": 2}
    assert_bitwise_equal(list(fresh.parameters()), expected_params)
    assert_bitwise_equal(optimizer_tensors(fresh_optimizer), expected_state)
    assert random_draws() == expected_draws


def test_sharded_save_on_a_full_disk_keeps_the_previous(tmp_path: Path, monkeypatch) -> None:
    model = tiny_model()
    optimizer = make_optimizer(model)
    train_steps(model, optimizer, 1)
    make_sharded_checkpointer(tmp_path).save(1, model, optimizer, {})
    monkeypatch.setattr(os, "fsync", _fail_with_enospc)
    with pytest.raises(CheckpointError) as caught:
        make_sharded_checkpointer(tmp_path).save(2, model, optimizer, {})
    monkeypatch.undo()
    assert str(caught.value) == (
        "checkpoint for step 2 could not be written (No space left on device); "
        "the previous checkpoint step 1 is intact: free space or set RUN_DIR elsewhere"
    )
    assert saved_steps(tmp_path) == ["step-000001", "step-000001.json"]


def test_a_checkpoint_of_the_other_strategy_is_refused(tmp_path: Path) -> None:
    save_trained(tmp_path, [1])
    model = tiny_model()
    with pytest.raises(CheckpointError, match=r"train\.strategy='ddp' but this run has train\.strategy='fsdp'"):
        make_sharded_checkpointer(tmp_path).load_latest(model, make_optimizer(model))


def test_metadata_enum_members_pickled_by_getattr_load_but_other_lookups_do_not() -> None:
    """Python 3.11.0-3.11.4 (Debian 12's python3) pickle Enum members as getattr(cls, name)."""
    import io
    import pickle

    from torch.distributed.checkpoint.planner import WriteItemType

    from train.checkpoint import _MetadataUnpickler

    class Member:
        def __reduce__(self):
            return (getattr, (WriteItemType, "TENSOR"))

    class Attribute:
        def __reduce__(self):
            return (getattr, (WriteItemType, "__class__"))

    assert _MetadataUnpickler(io.BytesIO(pickle.dumps(Member()))).load() is WriteItemType.TENSOR
    with pytest.raises(pickle.UnpicklingError):
        _MetadataUnpickler(io.BytesIO(pickle.dumps(Attribute()))).load()
