"""Checkpoints of several processes (gloo): DDP saves on rank 0 and every rank restores, a failure is the
same line on every rank, two ranks' checkpoint loads on three, FSDP2 saves and restores its shards."""

from __future__ import annotations

import copy
import hashlib
import json
import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from tests.helpers.checkpoints import (
    Counter,
    Extra,
    assert_bitwise_equal,
    extra_state,
    fail_with_enospc,
    make_optimizer,
    optimizer_tensors,
    parts,
    random_draws,
    saved_steps,
    seed_all,
    tiny_model,
    train_steps,
    with_batch,
)
from tests.helpers.gloo import finish_gloo_worker, free_port
from train.checkpoint import Checkpointer, CheckpointError, ModelState


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
        real_replace, os.replace = os.replace, fail_with_enospc
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
