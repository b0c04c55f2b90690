"""Checkpoints: exact round trips, atomic writes, pruning, corruption, code-running pickles, resume rules."""

from __future__ import annotations

import collections
import copy
import errno
import hashlib
import io
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
from tests.helpers.trainrun import checkpoint_state, launch_train, metrics
from train.checkpoint import (
    Checkpointer,
    CheckpointError,
    ModelState,
    OptimizerState,
    RNGState,
    capture_rng,
    check_compatible,
    load_model,
    plain,
    records,
    restore_rng,
)
from train.config_loader import default_config


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


class Extra:
    """A toy Stateful defined here, in the test: plain values and tensors, which the checkpointer knows nothing of."""

    def __init__(self, values: dict | None = None) -> None:
        self.values = dict(values or {})

    def state_dict(self) -> dict:
        return self.values

    def load_state_dict(self, state: dict) -> None:
        self.values = state


def parts(model: nn.Module, optimizer: torch.optim.Optimizer, extra: Extra, rank: int = 0, world_size: int = 1):
    return {
        "model": ModelState(model),
        "optimizer": OptimizerState(model, optimizer),
        "rng": RNGState(rank, world_size),
        "extra": extra,
    }


def make_checkpointer(
    run_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: Extra | None = None,
    keep: int = 3,
    strategy: str = "ddp",
    config: dict | None = None,
) -> Checkpointer:
    return Checkpointer(
        run_dir,
        parts(model, optimizer, extra if extra is not None else Extra()),
        keep=keep,
        rank=0,
        world_size=1,
        strategy=strategy,
        config=config,
    )


def save(run_dir: Path, step: int, model, optimizer, values: dict, keep: int = 3, strategy: str = "ddp", **kw) -> Path:
    return make_checkpointer(run_dir, model, optimizer, Extra(values), keep, strategy, **kw).save(step)


def load(run_dir: Path, model, optimizer, strategy: str = "ddp", config: dict | None = None) -> tuple[int | None, dict]:
    """The step loaded into `model` and `optimizer`, and the toy part's values after it."""
    extra = Extra()
    step = make_checkpointer(run_dir, model, optimizer, extra, strategy=strategy, config=config).load_latest()
    return step, extra.values


def extra_state(step: int, dim: int = 128) -> dict:
    config = default_config()
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
    for step in steps:
        train_steps(model, optimizer, 1)
        save(run_dir, step, model, optimizer, extra_state(step), keep, config=extra_state(step)["config"])
    return model, optimizer


def saved_after_two_steps(run_dir: Path, seed: int, strategy: str = "ddp") -> tuple[nn.Module, torch.optim.Optimizer]:
    """A model and optimizer trained two steps from seed and saved as step 2: the RNGs are as the save found them."""
    seed_all(seed)
    model = tiny_model()
    optimizer = make_optimizer(model)
    train_steps(model, optimizer, 2)
    save(run_dir, 2, model, optimizer, extra_state(2), strategy=strategy)
    return model, optimizer


def loaded_fresh(run_dir: Path, seed: int, strategy: str = "ddp") -> tuple[nn.Module, torch.optim.Optimizer, int, dict]:
    """A new model and optimizer, made under other RNGs (seed), with the newest checkpoint loaded into them."""
    seed_all(seed)
    model = tiny_model()
    optimizer = make_optimizer(model)
    step, extra = load(run_dir, model, optimizer, strategy)
    return model, optimizer, step, extra


# ---------------------------------------------------------------------------------------------
# Round trip and exact resume


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


def test_rng_capture_and_restore() -> None:
    seed_all(5)
    state = capture_rng()
    expected = random_draws()
    seed_all(6)
    restore_rng(state)
    assert random_draws() == expected


class Counter:
    """Another toy Stateful: a tensor and a count, added to the dict with no other file changing."""

    def __init__(self) -> None:
        self.total = torch.zeros(3)
        self.count = 0

    def state_dict(self) -> dict:
        return {"total": self.total, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.total, self.count = state["total"], state["count"]


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
    save(tmp_path, 2, model, optimizer, values)
    step, extra = load(tmp_path, model, optimizer)
    assert step == 2
    assert torch.equal(extra.pop("nested")["t"], torch.arange(3))
    assert extra == {k: v for k, v in values.items() if k != "nested"}


def test_extra_that_is_not_plain_data_is_refused_before_writing(tmp_path: Path) -> None:
    model, optimizer = save_trained(tmp_path, [1])
    with pytest.raises(CheckpointError) as caught:
        save(tmp_path, 2, model, optimizer, {"data": {"pos": np.int64(3)}})
    message = str(caught.value)
    assert "\n" not in message and "['data']['pos']" in message and "numpy" in message
    assert saved_steps(tmp_path) == ["step-000001", "step-000001.json"]


class KeepsNumpyExtraState(nn.Linear):
    def get_extra_state(self) -> object:
        return np.zeros(2)

    def set_extra_state(self, state: object) -> None:
        pass


def test_model_state_that_is_not_plain_data_is_refused_before_writing(tmp_path: Path) -> None:
    model = nn.Sequential(KeepsNumpyExtraState(2, 2))
    with pytest.raises(CheckpointError, match=r"\['model'\]\['0\._extra_state'\] is a numpy\.ndarray"):
        save(tmp_path, 1, model, make_optimizer(model), {})
    assert saved_steps(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# Layout, atomicity, pruning


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
    "write": lambda mp: mp.setattr(records._HashingWriter, "write", _fail_with_enospc),
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
    monkeypatch.setattr(os, "replace", _fail_with_enospc)
    with pytest.raises(CheckpointError, match=r"could not be written .*; none was written before: free space"):
        save(tmp_path, 1, model, make_optimizer(model), {})


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


# ---------------------------------------------------------------------------------------------
# Damaged and hostile checkpoints


def warnings_in(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def load_fresh(run_dir: Path) -> int | None:
    model = tiny_model()
    return load(run_dir, model, make_optimizer(model))[0]


def tensor_file(run_dir: Path, step: int) -> Path:
    return next((run_dir / "checkpoints" / f"step-{step:06d}").glob("*.distcp"))


def test_truncated_newest_checkpoint_falls_back_to_the_one_before(tmp_path: Path, caplog) -> None:
    save_trained(tmp_path, [1, 2])
    newest = tensor_file(tmp_path, 2)
    newest.write_bytes(newest.read_bytes()[:-100])
    assert load_fresh(tmp_path) == 1
    (line,) = warnings_in(caplog)
    assert "step-000002" in line and "truncated" in line and "\n" not in line


def test_corrupted_bytes_of_the_same_size_are_caught_by_the_checksum(tmp_path: Path, caplog) -> None:
    save_trained(tmp_path, [1, 2])
    newest = tensor_file(tmp_path, 2)
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    assert load_fresh(tmp_path) == 1
    (line,) = warnings_in(caplog)
    assert "step-000002" in line and "sha256" in line


def test_checkpoint_without_sidecar_is_incomplete_and_skipped(tmp_path: Path, caplog) -> None:
    save_trained(tmp_path, [1, 2])
    (tmp_path / "checkpoints" / "step-000002.json").unlink()
    model = tiny_model()
    assert make_checkpointer(tmp_path, model, make_optimizer(model)).latest_step() == 1
    assert load_fresh(tmp_path) == 1
    (line,) = warnings_in(caplog)
    assert "step-000002" in line and "incomplete" in line


class MakesMarkerWhenUnpickled:
    """Pickles to a call of os.mkdir(marker): harmless, but visible if a loader ever ran it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def rehash_sidecar(run_dir: Path, step: int) -> None:
    """Make the sidecar of `step` match whatever its files now hold, as an attacker would."""
    sidecar_path = run_dir / "checkpoints" / f"step-{step:06d}.json"
    sidecar = json.loads(sidecar_path.read_text())
    entry = run_dir / "checkpoints" / f"step-{step:06d}"
    sidecar["files"] = {
        f"{entry.name}/{p.name}": {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "size": p.stat().st_size}
        for p in entry.iterdir()
    }
    sidecar_path.write_text(json.dumps(sidecar))


def write_with_matching_sidecar(run_dir: Path, step: int, header: bytes) -> None:
    """A hostile checkpoint that passes the checksum: a copy of step 1 with `header` as its header file."""
    ckpts = run_dir / "checkpoints"
    shutil.copytree(ckpts / "step-000001", ckpts / f"step-{step:06d}")
    shutil.copy(ckpts / "step-000001.json", ckpts / f"step-{step:06d}.json")
    (ckpts / f"step-{step:06d}" / "header.pt").write_bytes(header)
    rehash_sidecar(run_dir, step)


def torch_saved(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_pickle_that_would_run_code_is_refused_and_the_previous_used(tmp_path: Path, caplog) -> None:
    save_trained(tmp_path, [1])
    marker = tmp_path / "code-ran"
    write_with_matching_sidecar(tmp_path, 2, torch_saved({"model": MakesMarkerWhenUnpickled(marker), "step": 2}))
    assert load_fresh(tmp_path) == 1
    assert not marker.exists()
    (line,) = warnings_in(caplog)
    assert "step-000002" in line and "not plain data" in line and "refused" in line


HOSTILE_HEADERS = {
    # Issue 10 item 10: hand-made pickles, re-hashed: a global outside the allow-list, plain data of a wrong shape.
    "a non-allow-listed global": pickle.dumps({"format": 2, "step": 2, "parts": collections.Counter("ab")}, protocol=2),
    "a raw pickle of a list": pickle.dumps([1, 2, 3], protocol=2),
    "plain data of the wrong shape": torch_saved({"format": 2, "step": 2, "parts": [], "part_names": "model"}),
    "a header of another step": torch_saved({"format": 2, "step": 1, "parts": {}, "part_names": [], "config": None}),
}


@pytest.mark.parametrize("kind", HOSTILE_HEADERS)
def test_a_hand_made_header_with_a_rehashed_sidecar_is_skipped(tmp_path: Path, caplog, kind: str) -> None:
    save_trained(tmp_path, [1])
    write_with_matching_sidecar(tmp_path, 2, HOSTILE_HEADERS[kind])
    assert load_fresh(tmp_path) == 1
    (line,) = warnings_in(caplog)
    assert "step-000002" in line and "skipped" in line and "\n" not in line


def test_hand_made_dcp_metadata_with_a_rehashed_sidecar_is_skipped(tmp_path: Path, caplog) -> None:
    save_trained(tmp_path, [1])
    marker = tmp_path / "code-ran"
    write_with_matching_sidecar(tmp_path, 2, (tmp_path / "checkpoints" / "step-000001" / "header.pt").read_bytes())
    (tmp_path / "checkpoints" / "step-000002" / ".metadata").write_bytes(pickle.dumps(MakesMarkerWhenUnpickled(marker)))
    rehash_sidecar(tmp_path, 2)
    assert load_fresh(tmp_path) == 1
    assert not marker.exists()
    (line,) = warnings_in(caplog)
    assert "step-000002" in line and "not plain data" in line


def edit_sidecar_files(files: object) -> object:
    return lambda sidecar: {**sidecar, "files": files}


SIDECAR_EDITS = {
    # Issue 10 item 10: a sidecar is input too; each of these once crashed the resume or read a file unverified.
    "files is an empty list": (edit_sidecar_files([]), "lists no files"),
    "files is empty": (edit_sidecar_files({}), "lists no files"),
    "a file left out": (lambda s: {**s, "files": dict(list(s["files"].items())[1:])}, "is not in its sidecar"),
    "a name outside the entry": (
        lambda s: {**s, "files": {"../../victim": next(iter(s["files"].values()))}},
        "which is not a file of step-000002",
    ),
    "a malformed record": (lambda s: {**s, "files": {k: {"sha256": 1} for k in s["files"]}}, "malformed record"),
    "not an object": (lambda s: [s], "names no format"),
    "nested too deep": (None, "unreadable"),
}


@pytest.mark.parametrize("kind", SIDECAR_EDITS)
def test_a_hand_made_sidecar_is_skipped_for_the_one_before(tmp_path: Path, caplog, kind: str) -> None:
    save_trained(tmp_path, [1, 2])
    sidecar = tmp_path / "checkpoints" / "step-000002.json"
    edit, expected = SIDECAR_EDITS[kind]
    sidecar.write_text(json.dumps(edit(json.loads(sidecar.read_text()))) if edit else "[" * 100_000)
    assert load_fresh(tmp_path) == 1
    (line,) = warnings_in(caplog)
    assert "step-000002" in line and expected in line and "\n" not in line


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


def test_dcp_metadata_that_would_run_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    metadata = tmp_path / ".metadata"
    metadata.write_bytes(pickle.dumps(MakesMarkerWhenUnpickled(marker)))
    with pytest.raises(pickle.UnpicklingError, match="mkdir"):
        plain.check_dcp_metadata(metadata)
    assert not marker.exists()


def test_dcp_metadata_declaring_pickled_bytes_is_refused(tmp_path: Path) -> None:
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

    metadata = tmp_path / ".metadata"
    metadata.write_bytes(pickle.dumps(Metadata(state_dict_metadata={"model.w": BytesStorageMetadata()})))
    with pytest.raises(pickle.UnpicklingError, match="other than tensors"):
        plain.check_dcp_metadata(metadata)


# ---------------------------------------------------------------------------------------------
# Preflight


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


# ---------------------------------------------------------------------------------------------
# Resume rules


def test_model_shape_change_is_refused_naming_the_key() -> None:
    saved, current = default_config().to_dict(), default_config().to_dict()
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
    current = default_config().to_dict()
    current[section][key] = value
    with pytest.raises(CheckpointError, match=rf"{section}\.{key}="):
        check_compatible(default_config().to_dict(), current)


def test_budget_logging_and_schedule_changes_are_allowed() -> None:
    current = default_config().to_dict()
    current["train"].update(steps=5000, log_every=1, ckpt_every=7, keep_ckpts=1, lr=3e-4, warmup_steps=5)
    current["data"]["num_workers"] = 4
    check_compatible(default_config().to_dict(), current)


def with_batch(world_size: int, micro_batch: int, accum: int = 1) -> dict:
    config = default_config().to_dict()
    config["train"].update(micro_batch=micro_batch, accum=accum)
    return {**config, "world_size": world_size}


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


# ---------------------------------------------------------------------------------------------
# Several processes (gloo)


def join_group(rank: int, port: int, world_size: int = 2) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))


def ddp_checkpointer(run_dir: Path, model, optimizer, extra: Extra, rank: int, world_size: int, **kw) -> Checkpointer:
    return Checkpointer(run_dir, parts(model, optimizer, extra, rank, world_size), keep=2, rank=rank,
                        world_size=world_size, strategy="ddp", **kw)  # fmt: skip


def ddp_worker(rank: int, port: int, run_dir: str) -> None:
    join_group(rank, port)
    model = nn.parallel.DistributedDataParallel(tiny_model())
    optimizer = make_optimizer(model)
    seed_all(100 + rank)  # each rank's own data and dropout
    train_steps(model, optimizer, 2)
    extra = Extra(extra_state(2))
    ckpt = ddp_checkpointer(Path(run_dir), model, optimizer, extra, rank, 2)
    ckpt.save(2)
    expected_params = [p.detach().clone() for p in model.parameters()]
    expected_state = copy.deepcopy(optimizer.state_dict()["state"])
    expected_draws = random_draws()

    # A failed write on rank 0 must reach every rank as the same error, not a hang.
    train_steps(model, optimizer, 1)
    extra.values = extra_state(3)
    if rank == 0:
        real_replace, os.replace = os.replace, _fail_with_enospc
    with pytest.raises(CheckpointError, match=r"step 3 could not be written .* previous checkpoint step 2 is intact"):
        ckpt.save(3)
    if rank == 0:
        os.replace = real_replace

    seed_all(7)
    extra.values = {}
    assert ckpt.load_latest() == 2 and extra.values == extra_state(2)
    assert_bitwise_equal([p.detach() for p in model.parameters()], expected_params)
    for index, state in optimizer.state_dict()["state"].items():
        assert_bitwise_equal(list(state.values()), list(expected_state[index].values()))
    draws = random_draws()
    assert draws == expected_draws
    both = [None, None]
    dist.all_gather_object(both, draws)
    assert both[0] != both[1]  # each rank got its own generator back, not rank 0's
    if rank == 0:  # the checkpoint holds the bare model: no "module." prefix
        plain_model = tiny_model()
        step = Checkpointer(Path(run_dir), {"model": ModelState(plain_model)}, keep=2, rank=0, world_size=1,
                            strategy="ddp")  # fmt: skip
        saved = step._entry(2)
        from torch.distributed.checkpoint import FileSystemReader

        keys = FileSystemReader(Path(run_dir) / "checkpoints" / saved).read_metadata().state_dict_metadata
        assert {k for k in keys if k.startswith("model.")} == {f"model.{k}" for k in plain_model.state_dict()}
    # A node that cannot see rank 0's RUN_DIR is told so on every rank, instead of starting afresh.
    own_dir = Path(run_dir) if rank == 0 else Path(run_dir) / "elsewhere"
    unshared = ddp_checkpointer(own_dir, model, optimizer, Extra(), rank, 2)
    with pytest.raises(CheckpointError, match=r"rank 1 cannot see .*; put RUN_DIR on storage that every node shares"):
        unshared.load_latest()
    finish_gloo_worker()


@pytest.mark.slow
def test_ddp_two_ranks_save_on_rank0_and_both_restore(tmp_path: Path) -> None:
    mp.spawn(ddp_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    assert saved_steps(tmp_path) == ["step-000002", "step-000002.json"]


def reshard_save_worker(rank: int, port: int, run_dir: str) -> None:
    join_group(rank, port, world_size=2)
    model = nn.parallel.DistributedDataParallel(tiny_model())
    optimizer = make_optimizer(model)
    seed_all(300 + rank)
    train_steps(model, optimizer, 2)
    counter = Counter()
    counter.count = 5
    checkpoint_parts = {**parts(model, optimizer, Extra(extra_state(2)), rank, 2), "counter": counter}
    Checkpointer(Path(run_dir), checkpoint_parts, keep=1, rank=rank, world_size=2, strategy="ddp",
                 config=with_batch(2, 3)).save(2)  # fmt: skip
    if rank == 0:
        saved = {"params": [p.detach().clone() for p in model.parameters()], "optim": optimizer_tensors(optimizer)}
        torch.save(saved, Path(run_dir) / "saved.pt")
    finish_gloo_worker()


def reshard_load_worker(rank: int, port: int, run_dir: str) -> None:
    join_group(rank, port, world_size=3)
    model = nn.parallel.DistributedDataParallel(tiny_model())
    optimizer = make_optimizer(model)
    extra, counter = Extra(), Counter()
    checkpoint_parts = {**parts(model, optimizer, extra, rank, 3), "counter": counter}
    ckpt = Checkpointer(Path(run_dir), checkpoint_parts, keep=1, rank=rank, world_size=3, strategy="ddp",
                        config=with_batch(3, 2))  # fmt: skip
    assert ckpt.load_latest() == 2
    saved = torch.load(Path(run_dir) / "saved.pt", weights_only=True)
    assert_bitwise_equal([p.detach() for p in model.parameters()], saved["params"])
    assert_bitwise_equal(optimizer_tensors(optimizer), saved["optim"])
    assert extra.values == extra_state(2) and counter.count == 5
    # A changed global batch is refused on every rank, in one line naming it.
    wrong = Checkpointer(Path(run_dir), checkpoint_parts, keep=1, rank=rank, world_size=3, strategy="ddp",
                         config=with_batch(3, 3))  # fmt: skip
    with pytest.raises(CheckpointError, match=r"^RUN_DIR holds a checkpoint with global batch 6 .* global batch 9 "):
        wrong.load_latest()
    finish_gloo_worker()


@pytest.mark.slow
def test_a_checkpoint_of_two_ranks_loads_bitwise_on_three(tmp_path: Path) -> None:
    mp.spawn(reshard_save_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    mp.spawn(reshard_load_worker, args=(free_port(), str(tmp_path)), nprocs=3)


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
    extra = Extra(extra_state(1))
    ckpt = Checkpointer(Path(run_dir), parts(model, optimizer, extra, rank, 2), keep=1, rank=rank, world_size=2,
                        strategy="fsdp")  # fmt: skip
    ckpt.save(1)
    fsdp_train_steps(model, optimizer, 1)
    extra.values = extra_state(2)
    ckpt.save(2)
    expected_params = local_shards(model.parameters())
    expected_state = local_shards(optimizer_tensors(optimizer))
    expected_lr = [g["lr"] for g in optimizer.param_groups]
    expected_draws = random_draws()

    fsdp_train_steps(model, optimizer, 2)
    for group in optimizer.param_groups:
        group["lr"] = 0.5
    seed_all(9)
    extra.values = {}
    assert ckpt.load_latest() == 2 and extra.values["data_position"] == 32
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
    assert set(sidecar["files"]) == on_disk and "step-000002/header.pt" in on_disk
    for name, record in sidecar["files"].items():
        assert hashlib.sha256((tmp_path / "checkpoints" / name).read_bytes()).hexdigest() == record["sha256"]


# ---------------------------------------------------------------------------------------------
# The FSDP strategy's checkpoints in one process


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
    monkeypatch.setattr(os, "fsync", _fail_with_enospc)
    with pytest.raises(CheckpointError) as caught:
        save(tmp_path, 2, model, optimizer, {}, strategy="fsdp")
    monkeypatch.undo()
    assert str(caught.value) == (
        "checkpoint for step 2 could not be written (No space left on device); "
        "the previous checkpoint step 1 is intact: free space or set RUN_DIR elsewhere"
    )
    assert saved_steps(tmp_path) == ["step-000001", "step-000001.json"]


def test_load_model_reads_the_weights_of_either_strategy_in_one_process(tmp_path: Path) -> None:
    for strategy in ("ddp", "fsdp"):
        model, _ = saved_after_two_steps(tmp_path / strategy, seed=13, strategy=strategy)
        fresh = tiny_model()
        assert load_model(tmp_path / strategy, fresh) == 2
        assert_bitwise_equal(list(fresh.parameters()), [p.detach() for p in model.parameters()])
    assert load_model(tmp_path / "none", tiny_model()) is None


def test_a_checkpoint_of_the_other_strategy_is_refused(tmp_path: Path) -> None:
    save_trained(tmp_path, [1])
    model = tiny_model()
    with pytest.raises(CheckpointError, match=r"train\.strategy='ddp' but this run has train\.strategy='fsdp'"):
        load(tmp_path, model, make_optimizer(model), strategy="fsdp")


def test_metadata_enum_members_pickled_by_getattr_load_but_other_lookups_do_not() -> None:
    """Python 3.11.0-3.11.4 (Debian 12's python3) pickle Enum members as getattr(cls, name)."""
    from torch.distributed.checkpoint.planner import WriteItemType

    class Member:
        def __reduce__(self):
            return (getattr, (WriteItemType, "TENSOR"))

    class Attribute:
        def __reduce__(self):
            return (getattr, (WriteItemType, "__class__"))

    assert plain.MetadataUnpickler(io.BytesIO(pickle.dumps(Member()))).load() is WriteItemType.TENSOR
    with pytest.raises(pickle.UnpicklingError):
        plain.MetadataUnpickler(io.BytesIO(pickle.dumps(Attribute()))).load()


# ---------------------------------------------------------------------------------------------
# Real runs, launched as `make train` launches them (2-3 ranks, gloo, fp32)

RUN_CKPT = ["train.ckpt_every=2", "train.lr_decay_steps=12", "train.keep_ckpts=10"]


def torchrig_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("torchrig")]


def sidecar_files(run_dir: Path, step: int) -> list[str]:
    return sorted(json.loads((run_dir / "checkpoints" / f"step-{step:06d}.json").read_text())["files"])


@pytest.mark.slow
def test_a_run_resumes_at_another_gpu_count_with_the_same_global_batch(tmp_path: Path) -> None:
    """2 ranks x MICRO_BATCH 3 for 6 steps, then 3 ranks x MICRO_BATCH 2 to step 12 in the same RUN_DIR."""
    reference = tmp_path / "reference"
    assert launch_train(reference, 2, 12, *RUN_CKPT, "train.micro_batch=3").returncode == 0
    run_dir = tmp_path / "run"
    assert launch_train(run_dir, 2, 6, *RUN_CKPT, "train.micro_batch=3").returncode == 0
    logged = (run_dir / "metrics.jsonl").read_text()

    refused = launch_train(run_dir, 3, 12, *RUN_CKPT, "train.micro_batch=3")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    (line,) = torchrig_lines(refused)
    assert "global batch 6 (world_size=2 x train.micro_batch=3" in line and "global batch 9" in line
    assert (run_dir / "metrics.jsonl").read_text() == logged

    resumed = launch_train(run_dir, 3, 12, *RUN_CKPT, "train.micro_batch=2")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from step 6" in resumed.stdout
    assert "saved by 2 ranks and this run has 3" in resumed.stderr  # what happens to the per-rank RNG
    expected = {r["step"]: r["loss"] for r in metrics(reference)}
    got = {r["step"]: r["loss"] for r in metrics(run_dir)}
    assert sorted(got) == list(range(1, 13))
    for step in range(7, 13):
        assert got[step] == pytest.approx(expected[step], rel=1e-5), step


@pytest.mark.slow
def test_a_run_never_saves_through_a_planted_symlink(tmp_path: Path) -> None:
    """Issue 10 item 2, through a real run: links at every temporary name a save used, and at summary.json."""
    run_dir = tmp_path / "run"
    assert launch_train(run_dir, 2, 4, *RUN_CKPT).returncode == 0
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    (tmp_path / "victim-dir").mkdir()
    ckpts = run_dir / "checkpoints"
    for name in (".tmp-step-000006.pt", ".tmp-step-000006.json"):
        (ckpts / name).symlink_to(victim)
    (ckpts / ".tmp-step-000006").symlink_to(tmp_path / "victim-dir")
    (run_dir / "summary.json").unlink()
    (run_dir / "summary.json").symlink_to(victim)  # replaced by the new summary, never written through
    resumed = launch_train(run_dir, 2, 6, *RUN_CKPT)
    assert resumed.returncode == 0, resumed.stderr
    assert victim.read_text() == "untouched" and list((tmp_path / "victim-dir").iterdir()) == []
    assert not (run_dir / "summary.json").is_symlink()
    assert checkpoint_state(run_dir)[2]["step"] == 6


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_a_run_whose_checkpoints_are_all_damaged_is_refused_and_keeps_its_records(tmp_path: Path) -> None:
    """Issue 10 item 8: not a silent restart at step 0 that duplicates the metrics rows."""
    run_dir = tmp_path / "run"
    assert launch_train(run_dir, 2, 4, *RUN_CKPT).returncode == 0
    logged = (run_dir / "metrics.jsonl").read_text()
    for step in (2, 4):
        flip_a_byte(run_dir / "checkpoints" / sidecar_files(run_dir, step)[-1])
    rerun = launch_train(run_dir, 2, 8, *RUN_CKPT)
    assert rerun.returncode == 2 and "Traceback" not in rerun.stderr, rerun.stderr
    (line,) = torchrig_lines(rerun)
    assert "step-000004, step-000002" in line and "move them away" in line and "fresh RUN_DIR" in line
    assert (run_dir / "metrics.jsonl").read_text() == logged


@pytest.mark.slow
def test_a_run_skips_a_hand_made_sidecar_and_a_hand_made_pickle_for_the_good_one(tmp_path: Path) -> None:
    """Issue 10 item 10: `"files": []`, and a re-hashed pickle with a non-allow-listed global, each skipped."""
    run_dir = tmp_path / "run"
    assert launch_train(run_dir, 2, 6, *RUN_CKPT).returncode == 0
    newest = run_dir / "checkpoints" / "step-000006.json"
    newest.write_text(json.dumps({**json.loads(newest.read_text()), "files": []}))
    sidecar_path = run_dir / "checkpoints" / "step-000004.json"
    sidecar = json.loads(sidecar_path.read_text())
    marker = tmp_path / "code-ran"
    for name in [n for n in sidecar["files"] if n.endswith(".pt")]:
        hostile = torch_saved({"step": 4, "model": MakesMarkerWhenUnpickled(marker)})
        (run_dir / "checkpoints" / name).write_bytes(hostile)
        sidecar["files"][name] = {"sha256": hashlib.sha256(hostile).hexdigest(), "size": len(hostile)}
    sidecar_path.write_text(json.dumps(sidecar))
    resumed = launch_train(run_dir, 2, 8, *RUN_CKPT)
    assert resumed.returncode == 0 and "Traceback" not in resumed.stderr, resumed.stderr
    assert "resuming from step 2" in resumed.stdout and not marker.exists()
    warned = [line for line in resumed.stderr.splitlines() if "trying the one before" in line]
    assert len(warned) == 2 and "step-000006" in warned[0] and "step-000004" in warned[1]
