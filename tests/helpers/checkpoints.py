"""The toy training state of the checkpoint tests: a tiny model, its optimizer, toy Stateful parts, and
the saves, loads and hand-made damage that tests/train/checkpoint/ share."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from train.checkpoint import Checkpointer, ModelState, OptimizerState, RNGState
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


class Counter:
    """Another toy Stateful: a tensor and a count, added to the dict with no other file changing."""

    def __init__(self) -> None:
        self.total = torch.zeros(3)
        self.count = 0

    def state_dict(self) -> dict:
        return {"total": self.total, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.total, self.count = state["total"], state["count"]


def fail_with_enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def warnings_in(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def load_fresh(run_dir: Path) -> int | None:
    model = tiny_model()
    return load(run_dir, model, make_optimizer(model))[0]


def tensor_file(run_dir: Path, step: int) -> Path:
    return next((run_dir / "checkpoints" / f"step-{step:06d}").glob("*.distcp"))


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


def with_batch(world_size: int, micro_batch: int, accum: int = 1) -> dict:
    config = default_config().to_dict()
    config["train"].update(micro_batch=micro_batch, accum=accum)
    return {**config, "world_size": world_size}
