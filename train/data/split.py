"""The validation split (data.val_fraction, or data.val_path).

The LAST ceil(val_fraction * N) samples of a token source (a contiguous tail, so no validation text
sits next to training text), or for images and synthetic data the samples that a fixed permutation
(SPLIT_SEED, not the run's seed) puts first. It depends on nothing but the data and val_fraction: no
seed or world size changes which samples are held out, and the training stream (train/data/stream.py)
runs over the remaining N' samples only. With data.val_path the whole of data.path trains and
val_path is the validation set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from torch.utils.data import Dataset

from train.config import RunConfig
from train.data.sources import TokenWindows, build_dataset, source_of_path
from train.errors import DataError

# The validation split of sources without a natural order is drawn with this seed, never the run's.
SPLIT_SEED = 20240601


@dataclass(frozen=True)
class Split:
    """Dataset indices: those the training stream draws from, and the held-out ones."""

    train: np.ndarray
    val: np.ndarray


def split_samples(dataset: Dataset, cfg: RunConfig) -> Split:
    """The validation split of the module docstring: a function of the data and data.val_fraction only."""
    n = len(dataset)
    everything = np.arange(n, dtype=np.int64)
    if cfg.data.val_path or not cfg.data.val_fraction:
        return Split(everything, everything[:0])
    # ceil, less a rounding hair: 100 samples at 0.05 hold out 5, not 6
    n_val = math.ceil(n * cfg.data.val_fraction - 1e-9)
    if n_val >= n:
        raise DataError(
            f"data.val_fraction={cfg.data.val_fraction} holds out all {n} samples; lower it or use more data"
        )
    if isinstance(dataset, TokenWindows):
        return Split(everything[: n - n_val], everything[n - n_val :])
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    return Split(np.sort(order[n_val:]), np.sort(order[:n_val]))


def validation_set(dataset: Dataset, cfg: RunConfig) -> tuple[Dataset, np.ndarray]:
    """The dataset and indices evaluation reads: data.val_path whole, or the held-out part of `dataset`."""
    if cfg.data.val_path:
        own = replace(cfg, data=replace(cfg.data, path=cfg.data.val_path, source=source_of_path(cfg.data.val_path)))
        val = build_dataset(own)
        return val, np.arange(len(val), dtype=np.int64)
    return dataset, split_samples(dataset, cfg).val
