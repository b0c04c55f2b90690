"""Which config changes a resume allows: the model's shape, the sample stream and the global batch stay fixed.

The global batch is world_size x micro_batch x accum; how it is split may change between runs of
one RUN_DIR (the data order is a pure function of (seed, step) and the global batch, train/data.py),
so a run may resume at another GPU count with MICRO_BATCH or ACCUM adjusted.
"""

from __future__ import annotations

from typing import Any

from train.checkpoint.errors import CheckpointError
from train.config import flatten, resume_fixed_keys

# Config keys whose change breaks an exact resume: every model key, and those the schema marks
# (train/config.py RESUME_FIXED; the validation split shapes the training stream too). Everything else
# (budget, logging, timeouts, lr schedule, workers, and the split of the global batch) may change
# between runs of one RUN_DIR.
RESUME_FIXED_PREFIXES = ("model.",)
RESUME_FIXED_KEYS = frozenset(resume_fixed_keys())
BATCH_KEYS = ("world_size", "train.micro_batch", "train.accum")


def _fixed_for_resume(key: str) -> bool:
    return key.startswith(RESUME_FIXED_PREFIXES) or key in RESUME_FIXED_KEYS


# Keys whose empty value stands for a default chosen elsewhere: a message names that default, not "[]".
EMPTY_MEANS = {"train.lora.targets": "the model family's default targets"}


def shown(key: str, value: Any) -> str:
    if key in EMPTY_MEANS and value in ([], "", None):
        return f"{key} empty ({EMPTY_MEANS[key]})"
    return f"{key}={value!r}"


def mismatch(key: str, saved: Any, current: Any) -> CheckpointError:
    return CheckpointError(
        f"RUN_DIR holds a checkpoint with {shown(key, saved)} but this run has {shown(key, current)}; "
        "use a new RUN_DIR or restore the config"
    )


def _global_batch(flat: dict[str, Any]) -> tuple[int, str]:
    """The global batch and how it is made, e.g. (6, 'world_size=2 x train.micro_batch=3 x train.accum=1')."""
    values = {key: flat.get(key, 1) for key in BATCH_KEYS}  # a config without world_size is one process's
    total = 1
    for value in values.values():
        total *= value if isinstance(value, int) else 0
    return total, " x ".join(f"{key}={value!r}" for key, value in values.items())


def check_compatible(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Raise naming the first key whose change breaks resuming `saved` under `current`.

    Both are RunConfig.to_dict() output, optionally with a top-level "world_size". A key
    that only one side has (a config field added or removed since) is not compared.
    """
    saved_flat, current_flat = flatten(saved), flatten(current)
    for key, value in current_flat.items():
        if _fixed_for_resume(key) and key in saved_flat and saved_flat[key] != value:
            raise mismatch(key, saved_flat[key], value)
    (was, was_made), (now, now_made) = _global_batch(saved_flat), _global_batch(current_flat)
    if was != now:
        raise CheckpointError(
            f"RUN_DIR holds a checkpoint with global batch {was} ({was_made}) but this run has global batch {now} "
            f"({now_made}); resuming needs the same global batch: set MICRO_BATCH and ACCUM so that "
            f"GPUS x MICRO_BATCH x ACCUM = {was}, or use a new RUN_DIR"
        )
