"""The validation split (data.val_fraction, or data.val_path).

The LAST ceil(val_fraction * N) samples of a token source (a contiguous tail, so no validation text
sits next to training text), or for images and synthetic data the samples that a fixed permutation
(SPLIT_SEED, not the run's seed) puts first. It depends on nothing but the data and val_fraction: no
seed or world size changes which samples are held out, and the training stream (train/data/stream.py)
runs over the remaining N' samples only. With data.val_path the whole of data.path trains and
val_path is the validation set: other data (no file, token file or image folder of data.path), made
by the same tokenizer (check_held_out), or the validation figures would not be what they claim.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from train.config import RunConfig
from train.data.sources import TokenWindows, build_dataset, data_tokenizer_id, path_tokenizer, source_of_path
from train.data.text import expand_globs
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
        check_held_out(cfg)
        own = replace(cfg, data=replace(cfg.data, path=cfg.data.val_path, source=source_of_path(cfg.data.val_path)))
        val = build_dataset(own)
        return val, np.arange(len(val), dtype=np.int64)
    return dataset, split_samples(dataset, cfg).val


def _files_of(path: str, what: str) -> set[tuple[int, int]]:
    """The real files (device, inode) a data path reads: a token file, a text glob, or an image folder."""
    if source_of_path(path) == "images":
        return {(info.st_dev, info.st_ino) for info in _tree(path)}
    paths = [Path(path)] if path.endswith(".bin") else expand_globs([path], what, "check the path")
    found = set()
    for file in paths:
        try:
            info = file.stat()
        except OSError:
            continue  # a missing file is reported where the data is read
        found.add((info.st_dev, info.st_ino))
    return found


def _tree(root: str) -> list[os.stat_result]:
    """Every file under an image folder, links to directories not followed."""
    found = []
    for folder, _, names in os.walk(root):
        for name in names:
            try:
                found.append(os.stat(os.path.join(folder, name)))
            except OSError:
                continue
    return found


def check_held_out(cfg: RunConfig) -> None:
    """data.val_path must be other data than data.path, made by the same tokenizer; DataError otherwise."""
    train, val = cfg.data.path, cfg.data.val_path
    shared = _files_of(val, "data.val_path") & _files_of(train, "data.path") if train else set()
    if shared:
        raise DataError(
            f"data.val_path={val!r} shares {len(shared)} file(s) with data.path={train!r}: validation would be on "
            "training data; give data.val_path held-out data, or drop it to hold out data.val_fraction of data.path"
        )
    made_by, val_made_by = data_tokenizer_id(cfg), path_tokenizer(val, "data.val_path")
    if made_by.conflicts(val_made_by):
        raise DataError(
            f"data.val_path={val!r} holds ids of {val_made_by.describe()} but the training data "
            f"({train or cfg.data.source}) those of {made_by.describe()}: the same ids would be other text; "
            "prepare both with one tokenizer"
        )
