"""The global sample stream and the loader the trainer iterates.

A language-model sample is a non-overlapping window, sample i being tokens[i*T : i*T + T + 1] with
inputs w[:-1] and targets w[1:], so there are N = (len-1) // T samples. Epoch e is a permutation of
the N' training samples drawn from (seed, e), and the stream is the epochs one after another.
Optimizer step s consumes the G = world_size * micro_batch * accum stream positions from s*G on;
micro-batch m of rank r takes the micro_batch positions from s*G + (m*world_size + r) * micro_batch.
Within an epoch no sample is seen twice and none is dropped (an epoch's tail spills into the next
global batch), ranks agree without talking, and a resumed run needs only its step number.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from train.config import RunConfig
from train.data.sources import sample_seed
from train.data.split import split_samples
from train.errors import DataError


_permutation_cache: dict[tuple[int, int, int], np.ndarray] = {}


def epoch_permutation(n_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The order of epoch `epoch`: a permutation of range(n_samples) drawn from (seed, epoch)."""
    key = (n_samples, seed, epoch)
    if key not in _permutation_cache:
        if len(_permutation_cache) >= 4:  # a batch touches at most two epochs; keep a few
            _permutation_cache.pop(next(iter(_permutation_cache)))
        rng = np.random.default_rng([seed % 2**64, epoch])
        _permutation_cache[key] = rng.permutation(n_samples)
    return _permutation_cache[key]


def stream_indices(
    step: int, micro: int, rank: int, world_size: int, micro_batch: int, accum: int, n_samples: int, seed: int
) -> list[int]:
    """Sample indices of micro-batch `micro` of `rank` in optimizer step `step` (see the module docstring)."""
    if not (0 <= rank < world_size and 0 <= micro < accum and step >= 0 and micro_batch >= 1 and n_samples >= 1):
        raise ValueError(
            f"bad stream coordinates step={step} micro={micro}/{accum} rank={rank}/{world_size} "
            f"micro_batch={micro_batch} n_samples={n_samples}"
        )
    first = step * world_size * micro_batch * accum + (micro * world_size + rank) * micro_batch
    positions = np.arange(first, first + micro_batch, dtype=np.int64)
    epochs, offsets = np.divmod(positions, n_samples)
    indices = np.empty(micro_batch, dtype=np.int64)
    for epoch in np.unique(epochs):
        in_epoch = epochs == epoch
        indices[in_epoch] = epoch_permutation(n_samples, seed, int(epoch))[offsets[in_epoch]]
    return indices.tolist()


class StreamBatchSampler(Sampler):
    """This rank's micro-batches of the global stream, forever, from optimizer step start_step."""

    def __init__(
        self, samples: np.ndarray, rank: int, world_size: int, micro_batch: int, accum: int, seed: int, start_step: int
    ) -> None:
        super().__init__()
        # Stream position p reads dataset index samples[p]: the training split, in dataset order.
        self.samples = samples
        self.n_samples = len(samples)
        self.rank = rank
        self.world_size = world_size
        self.micro_batch = micro_batch
        self.accum = accum
        self.seed = seed
        self.start_step = start_step

    def __iter__(self) -> Iterator[list[int]]:
        for step in itertools.count(self.start_step):
            for micro in range(self.accum):
                positions = stream_indices(
                    step, micro, self.rank, self.world_size, self.micro_batch, self.accum, self.n_samples, self.seed
                )
                yield self.samples[positions].tolist()


def build_loader(dataset: Dataset, cfg: RunConfig, rank: int, world_size: int, start_step: int) -> DataLoader:
    """An endless iterable of this rank's (inputs, targets) micro-batches, accum per step, from start_step."""
    workers = cfg.data.num_workers
    if workers < 0:
        raise DataError(f"data.num_workers={workers} must be 0 or more")
    sampler = StreamBatchSampler(
        split_samples(dataset, cfg).train,
        rank,
        world_size,
        cfg.train.micro_batch,
        cfg.train.accum,
        cfg.train.seed,
        start_step,
    )
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        pin_memory=cfg.data.pin_memory and torch.cuda.is_available(),
        persistent_workers=workers > 0,
        # Seeds the workers' RNGs (image augmentations) reproducibly per run, rank and start.
        generator=torch.Generator().manual_seed(sample_seed(cfg.train.seed, rank, start_step)),
    )
