"""Rank agreement: every rank takes part in a checkpoint step, and a failure anywhere is the same line everywhere."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch.distributed as dist

from train.checkpoint.errors import CheckpointError

T = TypeVar("T")


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (works on gloo and NCCL; NCCL needs torch.cuda.set_device first)."""
    if not distributed():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def from_rank0(obj: Any) -> Any:
    if not distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def failures() -> tuple[type[BaseException], ...]:
    """What a checkpoint step can raise: DCP's CheckpointException derives from BaseException, not Exception."""
    from torch.distributed.checkpoint.api import CheckpointException

    return (Exception, CheckpointException)


def first_problem(problem: str | None) -> str | None:
    """Agree across ranks: the first rank's problem, or None when every rank is fine."""
    return next((p for p in all_gather(problem) if p), None)


def collectively(action: Callable[[], T], describe: Callable[[BaseException], str]) -> T:
    """Run `action` on every rank; a failure anywhere raises CheckpointError(describe(it)) on every rank."""
    result: Any = None
    problem, error = None, None
    try:
        result = action()
    except failures() as exc:
        problem, error = (str(exc) if isinstance(exc, CheckpointError) else describe(exc)), exc
    agreed = first_problem(problem)
    if agreed:
        raise CheckpointError(agreed) from error
    return result
