"""Training data: the sources, the global sample stream, and the loader the trainer iterates.

Sources (data.source):

- corpus: built-in byte-level text that needs no download: the running Python's standard
  library sources (every *.py under sysconfig's stdlib path, sorted, without test directories
  or site-packages), each file followed by a NUL byte, capped at CORPUS_MAX_BYTES. It is built
  once into a cached token file under $TORCHRIG_DATA_DIR (default <repo>/data/), named with the
  Python version. The corpus therefore depends on the Python version (3.10 in the image, 3.11
  in a typical local venv), and so do the losses: compare runs only on the same corpus (its
  sha256 is in the cache's .json and in describe()).
- synthetic: random tokens (random images and labels for an image model), a pure function
  of (seed, index), for benchmarks.
- files: data.path is a glob of text files (each byte is a token) or a prepared token file (.bin).
- images: a torchvision ImageFolder tree at data.path, with the usual training augmentations.

A data.path given with the default source (corpus) picks the source from the path: a .bin token
file or a text glob is `files`, a directory is `images`; a path that contradicts a source given on
the same command line is refused (resolve_data). model.vocab_size=auto takes the vocabulary from
the data: 256 for bytes, the sidecar's vocab_size for a token file.

Token file format (what `python -m train.prepare` writes; write it yourself from any tokenizer):

- NAME.bin: the token ids as raw little-endian unsigned integers, no header.
- NAME.json: {"dtype": "uint8", "uint16" or "uint32", "vocab_size": V, "count": number of tokens};
  the smallest that holds every id (uint8 for bytes, uint16 up to V = 65536, else uint32). Other
  keys are kept as information; prepare adds "tokenizer": {"file", "sha256", "vocab_size"} when
  the ids come from NAME.tokenizer.json (train/tokenizer.py).

The validation split (data.val_fraction, or data.val_path): the LAST ceil(val_fraction * N) samples
of a token source (a contiguous tail, so no validation text sits next to training text), or for
images and synthetic data the samples that a fixed permutation (SPLIT_SEED, not the run's seed)
puts first. It depends on nothing but the data and val_fraction: no seed or world size changes
which samples are held out, and the training stream below runs over the remaining N' samples
only. With data.val_path the whole of data.path trains and val_path is the validation set.

The sample stream: a language-model sample is a non-overlapping window, sample i being
tokens[i*T : i*T + T + 1] with inputs w[:-1] and targets w[1:], so there are N = (len-1) // T
samples. Epoch e is a permutation of the N' training samples drawn from (seed, e), and the stream is the epochs
one after another. Optimizer step s consumes the G = world_size * micro_batch * accum stream
positions from s*G on; micro-batch m of rank r takes the micro_batch positions from
s*G + (m*world_size + r) * micro_batch. Within an epoch no sample is seen twice and none is
dropped (an epoch's tail spills into the next global batch), ranks agree without talking, and a
resumed run needs only its step number.

Image augmentations draw from the DataLoader's worker RNG (seeded from seed, rank and start step),
or from the global torch RNG with num_workers=0: the image ORDER resumes exactly, the crops and
flips after a resume are not bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import math
import os
import sys
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from env.common.atomic import replace_atomically
from env.common.cli import UserError
from train.config import VOCAB_AUTO, ConfigError, RunConfig
from train.models import get_spec

REPO_ROOT = Path(__file__).resolve().parent.parent
CORPUS_MAX_BYTES = 16 * 2**20
BYTE_VOCAB = 256
# Ends every document; Python sources and ordinary text never contain a NUL byte.
DOC_SEPARATOR = b"\x00"
# Stream length of the synthetic sources: large enough that an epoch boundary is rare.
SYNTHETIC_SAMPLES = 2**16
# Distinct random images behind the synthetic image source, made once: a sample is then a lookup,
# so a benchmark measures the GPU and not the making of noise (as NVIDIA's synthetic backends do).
SYNTHETIC_IMAGE_POOL = 64
TOKEN_DTYPES = {"uint8": np.dtype("<u1"), "uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
# Directory names left out of the corpus so that it is the same on every install of a version.
CORPUS_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# What each source gives ("synthetic" follows the model); each model's spec says what it eats.
SOURCE_INPUT = {"corpus": "tokens", "files": "tokens", "images": "images"}
# The validation split of sources without a natural order is drawn with this seed, never the run's.
SPLIT_SEED = 20240601


class DataError(UserError):
    """A user-caused data problem; its message is one line naming the problem and the fix."""


# ---------------------------------------------------------------------------- token files


def token_dtype(vocab_size: int) -> str:
    """The narrowest token file dtype that holds every id below vocab_size."""
    return "uint8" if vocab_size <= 2**8 else "uint16" if vocab_size <= 2**16 else "uint32"


def sidecar_path(bin_path: Path) -> Path:
    return Path(bin_path).with_suffix(".json")


def write_token_file(
    path: Path | str,
    chunks: Iterable[np.ndarray],
    vocab_size: int,
    dtype: str | None = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write token chunks to PATH.bin and its PATH.json sidecar (last, so its presence means done)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = dtype or token_dtype(vocab_size)
    np_dtype = TOKEN_DTYPES[dtype]
    digest = hashlib.sha256()
    count = 0

    def write_chunks(out: Any) -> None:
        nonlocal count
        for chunk in chunks:
            tokens = np.asarray(chunk)
            if tokens.size and (tokens.min() < 0 or tokens.max() >= min(vocab_size, 2 ** (8 * np_dtype.itemsize))):
                raise DataError(
                    f"token id {tokens.max()} does not fit vocab_size={vocab_size} as {dtype}; "
                    "pass the tokenizer's vocab size"
                )
            raw = tokens.astype(np_dtype).tobytes()
            out.write(raw)
            digest.update(raw)
            count += tokens.size

    replace_atomically(path, write_chunks, "wb")
    info = {"dtype": dtype, "vocab_size": vocab_size, "count": count, "sha256": digest.hexdigest(), **(meta or {})}
    replace_atomically(sidecar_path(path), lambda out: out.write(json.dumps(info, indent=1) + "\n"), "w")
    return info


def read_token_file(path: Path | str) -> tuple[np.ndarray, dict[str, Any]]:
    """Memory-map a token file after checking it against its sidecar."""
    path = Path(path)
    meta_path = sidecar_path(path)
    if not path.is_file():
        raise DataError(f"data.path='{path}' does not exist; check the path or make it with python -m train.prepare")
    if not meta_path.is_file():
        raise DataError(
            f"{path} has no sidecar {meta_path}; write one with dtype, vocab_size and count "
            "(see train/data.py) or re-run python -m train.prepare"
        )
    try:
        meta = json.loads(meta_path.read_text())
        dtype, count = meta["dtype"], int(meta["count"])
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"{meta_path} is not a valid sidecar ({exc.__class__.__name__}: {exc}); "
            "it needs dtype, vocab_size and count"
        ) from None
    if dtype not in TOKEN_DTYPES:
        raise DataError(f"{meta_path}: dtype={dtype!r} is not one of {', '.join(TOKEN_DTYPES)}; fix the sidecar")
    expected_bytes = count * TOKEN_DTYPES[dtype].itemsize
    if path.stat().st_size != expected_bytes:
        raise DataError(
            f"{path} holds {path.stat().st_size} bytes but its sidecar says {count} {dtype} tokens "
            f"({expected_bytes} bytes); re-run python -m train.prepare"
        )
    if count == 0:  # np.memmap refuses empty files
        return np.zeros(0, TOKEN_DTYPES[dtype]), meta
    return np.memmap(path, dtype=TOKEN_DTYPES[dtype], mode="r", shape=(count,)), meta


def document_chunks(paths: Iterable[Path], max_bytes: int | None = None) -> Iterator[np.ndarray]:
    """Each file's bytes followed by DOC_SEPARATOR, as uint8 arrays, stopping at max_bytes in all."""
    remaining = sys.maxsize if max_bytes is None else max_bytes
    for path in paths:
        try:
            document = (Path(path).read_bytes() + DOC_SEPARATOR)[:remaining]
        except OSError as exc:
            raise DataError(f"cannot read {path} ({exc.strerror}); check its permissions or leave it out") from None
        remaining -= len(document)
        yield np.frombuffer(document, dtype=np.uint8)
        if remaining == 0:
            return


def expand_globs(patterns: Iterable[str], what: str, fix: str) -> list[Path]:
    """Files matching any of the globs (** recurses), sorted; DataError naming `what` and `fix` when none match."""
    patterns = list(patterns)
    files = sorted({Path(p) for pattern in patterns for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)})
    shown = " ".join(repr(p) for p in patterns)
    if not files:
        raise DataError(f"{what}={shown} matches no files; {fix}")
    if not any(_size(path) for path in files):  # an unreadable one says so when it is read
        count = f"{len(files)} file{'' if len(files) == 1 else 's'}"
        raise DataError(f"{what}={shown} matches only empty files ({count}, 0 bytes); give files that hold text")
    return files


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 1


# ---------------------------------------------------------------------------- datasets


class TokenWindows(Dataset):
    """Non-overlapping windows of seq_len+1 tokens; sample i is (inputs, targets), int64 [seq_len]."""

    def __init__(self, tokens: np.ndarray, seq_len: int, source: str, origin: str) -> None:
        if len(tokens) < seq_len + 1:
            raise DataError(
                f"{origin} holds {len(tokens)} token{'' if len(tokens) == 1 else 's'}, fewer than "
                f"data.seq_len+1={seq_len + 1}; "
                "use more text or lower data.seq_len"
            )
        self.tokens = tokens
        self.seq_len = seq_len
        self.source = source
        self.origin = origin
        self.num_samples = (len(tokens) - 1) // seq_len

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} is outside 0..{self.num_samples - 1}")
        start = index * self.seq_len
        window = torch.from_numpy(self.tokens[start : start + self.seq_len + 1].astype(np.int64))
        return window[:-1], window[1:]

    def summary(self) -> str:
        tokens = self.num_samples * self.seq_len
        return f"{self.source}: {self.origin} · {self.num_samples:,} samples × {self.seq_len} = {tokens:,} tokens"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if isinstance(self.tokens, np.memmap):
            # Worker processes started by spawn reopen the file rather than receive a copy of it.
            state["tokens"] = (self.tokens.filename, self.tokens.dtype.str, self.tokens.shape)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state["tokens"], tuple):
            filename, dtype, shape = state["tokens"]
            state["tokens"] = np.memmap(filename, dtype=np.dtype(dtype), mode="r", shape=shape)
        self.__dict__.update(state)


def sample_seed(*values: int) -> int:
    """A 63-bit seed from integers (e.g. run seed and sample index); nearby inputs give unrelated seeds."""
    digest = hashlib.blake2b(":".join(map(str, values)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _sample_generator(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(sample_seed(seed, index))


class SyntheticTokens(Dataset):
    """Uniform random token windows, each a pure function of (seed, index)."""

    def __init__(self, vocab_size: int, seq_len: int, seed: int, num_samples: int = SYNTHETIC_SAMPLES) -> None:
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.seed = seed
        self.num_samples = num_samples

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        window = torch.randint(self.vocab_size, (self.seq_len + 1,), generator=_sample_generator(self.seed, index))
        return window[:-1], window[1:]

    def summary(self) -> str:
        tokens = self.num_samples * self.seq_len
        return (
            f"synthetic: random tokens below {self.vocab_size} · {self.num_samples:,} samples × "
            f"{self.seq_len} = {tokens:,} tokens"
        )


class SyntheticImages(Dataset):
    """Random normalized images and labels, each a pure function of (seed, index).

    The images come from a pool of SYNTHETIC_IMAGE_POOL drawn once from the seed; which one a
    sample shows, and its label, are drawn from (seed, index). A sample costs a lookup.
    """

    def __init__(self, image_size: int, num_classes: int, seed: int, num_samples: int = SYNTHETIC_SAMPLES) -> None:
        self.image_size = image_size
        self.num_classes = num_classes
        self.seed = seed
        self.num_samples = num_samples
        self.pool = torch.randn(
            SYNTHETIC_IMAGE_POOL, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed)
        )

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        draw = sample_seed(self.seed, index)
        return self.pool[draw % SYNTHETIC_IMAGE_POOL], (draw // SYNTHETIC_IMAGE_POOL) % self.num_classes

    def summary(self) -> str:
        size = self.image_size
        return f"synthetic: random images 3×{size}×{size}, {self.num_classes} classes · {self.num_samples:,} samples"


class ImageFolderSamples(Dataset):
    """A torchvision ImageFolder with RandomResizedCrop, horizontal flip and ImageNet normalization."""

    def __init__(self, root: str, image_size: int, num_classes: int) -> None:
        from torchvision import datasets, transforms  # only image runs pay for the import

        if not root or not Path(root).is_dir():
            raise DataError(
                f"data.path='{root}' is not a directory; point it at an ImageFolder tree ROOT/<class>/<image>"
            )
        augment = transforms.Compose(
            [
                transforms.RandomResizedCrop(image_size),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )
        try:
            self.folder = datasets.ImageFolder(root, transform=augment)
        except FileNotFoundError:
            raise DataError(
                f"data.path='{root}' holds no class folders with images; lay it out as ROOT/<class>/<image>.jpg"
            ) from None
        if len(self.folder.classes) > num_classes:
            raise DataError(
                f"data.path='{root}' has {len(self.folder.classes)} classes but model.num_classes="
                f"{num_classes}; set model.num_classes={len(self.folder.classes)}"
            )
        self.root = root
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.folder[index]

    def summary(self) -> str:
        return f"images: {self.root} · {len(self.folder):,} images in {len(self.folder.classes)} classes"


# ---------------------------------------------------------------------------- sources


def data_dir() -> Path:
    return Path(os.environ.get("TORCHRIG_DATA_DIR") or REPO_ROOT / "data")


def corpus_files(stdlib: Path) -> list[Path]:
    """The standard library's *.py files, in a stable order, without tests or installed packages."""
    found = []
    for folder, subdirs, names in os.walk(stdlib):
        subdirs[:] = [d for d in subdirs if d not in CORPUS_EXCLUDED_DIRS]
        found += [Path(folder, name) for name in names if name.endswith(".py")]
    return sorted(found, key=lambda path: path.relative_to(stdlib).as_posix())


def build_corpus(cache_dir: Path | None = None, max_bytes: int = CORPUS_MAX_BYTES) -> Path:
    """The cached corpus token file, built first if missing or stale; safe for ranks to race."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    version = ".".join(map(str, sys.version_info[:3]))
    path = Path(cache_dir or data_dir()) / f"corpus-{sys.implementation.name}-{version}.bin"
    identity = {"source": "corpus", "python": version, "stdlib": str(stdlib), "max_bytes": max_bytes}
    try:
        meta = json.loads(sidecar_path(path).read_text())
        if {k: meta.get(k) for k in identity} == identity and path.stat().st_size == meta["count"]:
            return path
    except (OSError, ValueError, KeyError):
        pass  # missing or unreadable cache: build it
    files = corpus_files(stdlib)
    if not files:
        raise DataError(f"found no Python sources under {stdlib} for the corpus; use data.source=synthetic or files")
    try:
        write_token_file(path, document_chunks(files, max_bytes), BYTE_VOCAB, dtype="uint8", meta=identity)
    except OSError as exc:
        raise DataError(
            f"cannot write the corpus cache {path} ({exc.strerror}); set TORCHRIG_DATA_DIR to a writable directory"
        ) from None
    return path


def _check_vocab(tokens: np.ndarray, vocab_size: int, origin: str) -> None:
    largest = int(tokens.max())
    if largest >= vocab_size:
        raise DataError(
            f"{origin} holds token id {largest} but model.vocab_size={vocab_size}; "
            f"set model.vocab_size={largest + 1} or more"
        )


def _corpus_dataset(cfg: RunConfig) -> Dataset:
    path = build_corpus()
    tokens, meta = read_token_file(path)
    origin = f"Python {meta['python']} stdlib ({len(tokens) / 2**20:.1f} MiB, sha256 {meta['sha256'][:12]})"
    _check_vocab(tokens, cfg.model.vocab_size, "the corpus")
    return TokenWindows(tokens, cfg.data.seq_len, "corpus", origin)


def _files_dataset(cfg: RunConfig) -> Dataset:
    path = cfg.data.path
    if not path:
        raise DataError('data.source=files needs data.path, e.g. ARGS="data.path=corpus/*.txt"')
    if path.endswith(".bin"):
        tokens, _ = read_token_file(path)
    else:
        documents = list(document_chunks(expand_globs([path], "data.path", "check the path or use data.source=corpus")))
        tokens = np.concatenate(documents)
    if len(tokens):
        _check_vocab(tokens, cfg.model.vocab_size, f"data.path='{path}'")
    return TokenWindows(tokens, cfg.data.seq_len, "files", path)


def _synthetic_dataset(cfg: RunConfig) -> Dataset:
    m = cfg.model
    if get_spec(m.arch).inputs == "images":
        return SyntheticImages(m.image_size, m.num_classes, cfg.train.seed)
    return SyntheticTokens(m.vocab_size, cfg.data.seq_len, cfg.train.seed)


def _images_dataset(cfg: RunConfig) -> Dataset:
    return ImageFolderSamples(cfg.data.path, cfg.model.image_size, cfg.model.num_classes)


SOURCES: dict[str, Callable[[RunConfig], Dataset]] = {
    "corpus": _corpus_dataset,
    "synthetic": _synthetic_dataset,
    "files": _files_dataset,
    "images": _images_dataset,
}


def _source_of_path(path: str) -> str:
    """The source a data path means: a directory is an image folder, anything else text or tokens."""
    return "images" if os.path.isdir(path) else "files"


def resolve_data(cfg: RunConfig, source_given: bool) -> None:
    """Settle what the data decides, in place: a source inferred from data.path, and vocab_size=auto.

    source_given: data.source was set on this command line (not only by the config file), so a
    data.path that contradicts it is refused instead of silently winning or losing.
    """
    data = cfg.data
    if data.path:
        inferred = _source_of_path(data.path)
        if not source_given:
            data.source = inferred
        elif data.source != inferred:
            kind = "a directory (an image folder)" if inferred == "images" else "a text glob or token file"
            raise ConfigError(
                f"data.path={data.path!r} is {kind}, which data.source={data.source} does not read; "
                f"drop data.source (the path picks data.source={inferred}) or drop data.path"
            )
    if data.val_path and SOURCE_INPUT.get(_source_of_path(data.val_path)) != SOURCE_INPUT.get(data.source, "tokens"):
        raise ConfigError(f"data.val_path={data.val_path!r} is not the same kind of data as data.source={data.source}")
    if getattr(cfg.model, "vocab_size", None) == VOCAB_AUTO:  # a token model's (INPUT_KEYS)
        cfg.model.vocab_size = _data_vocab_size(cfg)


def _data_vocab_size(cfg: RunConfig) -> int:
    source, path = cfg.data.source, cfg.data.path
    if source == "synthetic":
        raise ConfigError(
            "model.vocab_size=auto takes the size from the data; data.source=synthetic has none: give a number"
        )
    if source == "files" and path.endswith(".bin"):
        if not Path(path).is_file():
            raise DataError(
                f"model.vocab_size=auto reads the vocabulary of data.path={path!r}, which does not exist; "
                "make it with make prepare (see the config file's header) or set model.vocab_size"
            )
        _, meta = read_token_file(path)
        try:
            return int(meta["vocab_size"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{sidecar_path(Path(path))} has no vocab_size; add it or set model.vocab_size") from None
    return BYTE_VOCAB


def data_tokenizer(cfg: RunConfig) -> Path | None:
    """The tokenizer.json the run's token file was made with (checked against its sidecar), or None for bytes."""
    path = cfg.data.path
    if cfg.data.source != "files" or not path.endswith(".bin"):
        return None
    _, meta = read_token_file(path)
    record = meta.get("tokenizer")
    if not isinstance(record, dict) or not isinstance(record.get("file"), str):
        return None
    tokenizer = Path(path).parent / Path(record["file"]).name
    try:
        actual = hashlib.sha256(tokenizer.read_bytes()).hexdigest()
    except OSError as exc:
        raise DataError(
            f"{path} was made with {tokenizer}, which cannot be read ({exc.strerror}); restore it"
        ) from None
    if actual != record.get("sha256"):
        raise DataError(f"{tokenizer} is not the tokenizer {path} was made with (sha256 differs); re-run make prepare")
    return tokenizer


def build_dataset(cfg: RunConfig) -> Dataset:
    """The map-style dataset of cfg.data.source; DataError (one line with the fix) for bad data."""
    source, arch = cfg.data.source, cfg.model.arch
    wanted, needed = SOURCE_INPUT.get(source), get_spec(arch).inputs
    if wanted and wanted != needed:
        fits = [name for name, kind in SOURCE_INPUT.items() if kind == needed] + ["synthetic"]
        raise DataError(
            f"data.source={source} gives {wanted} but model.arch={arch} needs {needed}; "
            f"use data.source={' or '.join(fits)}"
        )
    return SOURCES[source](cfg)


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
        own = replace(cfg, data=replace(cfg.data, path=cfg.data.val_path, source=_source_of_path(cfg.data.val_path)))
        val = build_dataset(own)
        return val, np.arange(len(val), dtype=np.int64)
    return dataset, split_samples(dataset, cfg).val


def describe(dataset: Dataset) -> str:
    """One console line: source, origin, samples and tokens."""
    return dataset.summary()


# ---------------------------------------------------------------------------- the stream


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
