"""Process group, data parallelism (DDP or FSDP2) and the collectives the trainer needs.

The backend is NCCL on GPUs and gloo on the CPU; the code path is otherwise the same, so
multi-process behaviour is tested on CPU. Wrapping choices, and why:
- DDP: gradient_as_bucket_view avoids a gradient copy into the buckets; broadcast_buffers
  is off because the only buffers (MoE selection biases) are updated identically on every
  rank from globally summed counts; an optional bf16/fp16 compression hook halves the
  bytes on the wire, which matters on PCIe boxes without NVLink.
- FSDP2: fully_shard per block, then the root, with bf16 parameters and fp32 gradient
  reduction when training in bf16.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from train.config import RunConfig
from train.models import get_spec


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def initialized(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def _fully_shard():
    """FSDP2's entry point and mixed-precision policy; the module moved in torch 2.6."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    return fully_shard, MixedPrecisionPolicy


def init_distributed(cfg: RunConfig, run_dir: Path, store: dist.Store | None) -> DistInfo:
    """Join the process group that torchrun described in the environment (or run alone)."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
        # NCCL errors abort the job instead of hanging it; the flight recorder dumps into RUN_DIR.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        os.environ.setdefault("TORCH_NCCL_TRACE_BUFFER_SIZE", "2000")
        os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
        os.environ.setdefault("TORCH_NCCL_DEBUG_INFO_TEMP_FILE", str(run_dir / "nccl_trace_rank_"))
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if store is not None:
        # The watchdog (train/watchdog.py) ends a hung job first, with a message naming the rank;
        # the process-group timeout is only the backstop behind it.
        dist.init_process_group(
            backend=backend,
            store=dist.PrefixStore(attempt_prefix("pg"), store),
            rank=rank,
            world_size=world_size,
            timeout=backstop_timeout(cfg),
        )
    return DistInfo(rank, local_rank, world_size, device, backend)


def connect_store(timeout: timedelta) -> dist.Store | None:
    """The job's key-value store at MASTER_ADDR:MASTER_PORT, or None when running alone.

    torchrun's agent hosts it where TORCHELASTIC_USE_AGENT_STORE says so (current torch); otherwise
    rank 0 hosts it (torch 2.4). The process group and the watchdog share it.
    """
    if "MASTER_ADDR" not in os.environ or "RANK" not in os.environ:
        return None
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    rank_zero = int(os.environ["RANK"]) == 0
    return dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=rank_zero and not agent_hosts,
        timeout=timeout, wait_for_workers=False,
    )  # fmt: skip


def attempt_prefix(name: str) -> str:
    """A store prefix of `name` for this restart of the worker group.

    After torchrun restarts the group (MAX_RESTARTS), the new workers must not read the keys the
    previous attempt left in the same store: on current torch, gloo then dials a dead peer.
    """
    return f"torchrig/{name}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"


def backstop_timeout(cfg: RunConfig) -> timedelta:
    return timedelta(seconds=cfg.train.timeout_s * 2 + 60)


def all_reduce_sum(tensor: torch.Tensor) -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def wrap_model(model: nn.Module, cfg: RunConfig, info: DistInfo, param_dtype: torch.dtype | None) -> nn.Module:
    """DDP or FSDP2 around the model, per cfg.train.strategy; the bare model when alone."""
    if not info.initialized:
        return model
    if cfg.train.strategy == "fsdp":
        fully_shard, MixedPrecisionPolicy = _fully_shard()
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        for block in get_spec(cfg.model.arch).shard_units(model):
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    # Newer torch renames broadcast_buffers; both mean "do not sync buffers before each forward".
    no_buffer_sync = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
        else {"broadcast_buffers": False}
    )
    ddp = DDP(
        model,
        device_ids=[info.local_rank] if info.device.type == "cuda" else None,
        bucket_cap_mb=cfg.train.bucket_cap_mb,
        gradient_as_bucket_view=True,
        **no_buffer_sync,
    )
    if cfg.train.grad_compression != "none":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        hook = {"bf16": default_hooks.bf16_compress_hook, "fp16": default_hooks.fp16_compress_hook}
        ddp.register_comm_hook(state=None, hook=hook[cfg.train.grad_compression])
    return ddp


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    if enabled or not dist.is_initialized():
        yield
    elif hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def shutdown() -> None:
    """NCCL wants its communicators destroyed; gloo's teardown can block on torch 2.4, so the worker
    process simply exits (train/worker.py) and the sockets close with it."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        dist.destroy_process_group()
