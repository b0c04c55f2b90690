"""A rank's place in the job, from torchrun's environment: the worker measures with it, the report judges by it."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerPlace:
    rank: int
    world: int
    local_rank: int
    local_world: int

    @classmethod
    def from_env(cls) -> WorkerPlace:
        world = int(os.environ["WORLD_SIZE"])
        return cls(
            rank=int(os.environ["RANK"]),
            world=world,
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
            local_world=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))),
        )
