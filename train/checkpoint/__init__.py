"""Checkpoints: atomic, verified, data-only, resumable bit for bit, and at another GPU count.

records.py       file records (sha256, size) and the sidecar, on top of env.common.atomic
plain.py         the plain-data check and the allow-list loaders (weights-only)
ranks.py         rank agreement: one failure, the same line on every rank
storage.py       one entry on disk: torch.distributed.checkpoint tensors plus a plain header
parts.py         the Stateful parts: model, optimizer, RNG (a GradScaler is one already)
resume.py        which config changes a resume allows (the global batch, not its split)
checkpointer.py  save / load_latest of a dict of parts, pruning, the fallback to older ones
"""

from train.checkpoint.checkpointer import Checkpointer, load_model, read_model
from train.checkpoint.errors import CheckpointError, EveryCheckpointDamaged
from train.checkpoint.parts import ModelState, OptimizerState, RNGState, capture_rng, restore_rng, unwrap_model
from train.checkpoint.resume import check_compatible

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "EveryCheckpointDamaged",
    "ModelState",
    "OptimizerState",
    "RNGState",
    "capture_rng",
    "check_compatible",
    "load_model",
    "read_model",
    "restore_rng",
    "unwrap_model",
]
