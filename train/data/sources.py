"""The data sources (data.source) as map-style datasets, and what the data decides about the config.

- corpus: the built-in byte-level text (train/data/corpus.py).
- synthetic: random tokens (random images and labels for an image model), a pure function of
  (seed, index), for benchmarks.
- files: data.path is a glob of text files (each byte is a token), a prepared token file or set of shards
  (NAME.bin, from make prepare), or llm.c shards: one .bin, a glob of them, or a directory holding them.
- images: a torchvision ImageFolder tree at data.path, with the usual training augmentations.

A data.path given with the default source (corpus) picks the source from the path: a .bin token
file or a text glob is `files`, a directory is `images`; a path that contradicts a source given on
the same command line is refused (resolve_data). model.vocab_size=auto takes the vocabulary from
the data: 256 for bytes, the sidecar's vocab_size for a token file.

Image augmentations draw from the DataLoader's worker RNG (seeded from seed, rank and start step),
or from the global torch RNG with num_workers=0: the image ORDER resumes exactly, the crops and
flips after a resume are not bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from train.config import VOCAB_AUTO, RunConfig
from train.data.corpus import build_corpus
from train.data.text import document_chunks, expand_globs
from train.data.tokens import (
    BYTE_VOCAB,
    TokenStream,
    is_llmc_file,
    read_llmc,
    read_mask,
    read_token_file,
    sidecar_path,
)
from train.errors import ConfigError, DataError
from train.models import get_spec
from train.models.loss import IGNORE_INDEX
from train.tokenizer import ANY, BYTES, TokenizerId, recorded_tokenizer, sha256_of

# Stream length of the synthetic sources: large enough that an epoch boundary is rare.
SYNTHETIC_SAMPLES = 2**16
# Distinct random images behind the synthetic image source, made once: a sample is then a lookup,
# so a benchmark measures the GPU and not the making of noise (as NVIDIA's synthetic backends do).
SYNTHETIC_IMAGE_POOL = 64
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# A shard name that marks validation data (llm.c's and modded-nanogpt's fineweb_val_000000.bin).
VALIDATION_NAME = re.compile(r"(^|[_.-])val([_.-]|$)")
# What each source gives ("synthetic" follows the model); each model's spec says what it eats.
SOURCE_INPUT = {"corpus": "tokens", "files": "tokens", "images": "images"}


class TokenWindows(Dataset):
    """Non-overlapping windows of seq_len+1 tokens; sample i is (inputs, targets), int64 [seq_len].

    With a mask (chat data: one uint8 per token, train/data/chat.py) a target whose token the mask does not
    learn is IGNORE_INDEX, which the loss leaves out.
    """

    def __init__(
        self,
        tokens: np.ndarray | TokenStream,
        seq_len: int,
        source: str,
        origin: str,
        mask: np.ndarray | TokenStream | None = None,
    ) -> None:
        if len(tokens) < seq_len + 1:
            raise DataError(
                f"{origin} holds {len(tokens)} token{'' if len(tokens) == 1 else 's'}, fewer than "
                f"data.seq_len+1={seq_len + 1}; "
                "use more text or lower data.seq_len"
            )
        self.tokens = tokens
        self.mask = mask
        self.seq_len = seq_len
        self.source = source
        self.origin = origin
        self.num_samples = (len(tokens) - 1) // seq_len

    @property
    def masked(self) -> bool:
        """Whether some targets are left out of the loss (the trainer then counts them, train/models/loss.py)."""
        return self.mask is not None

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} is outside 0..{self.num_samples - 1}")
        start = index * self.seq_len
        window = torch.from_numpy(self.tokens[start : start + self.seq_len + 1].astype(np.int64))
        if self.mask is None:
            return window[:-1], window[1:]
        learned = torch.from_numpy(self.mask[start + 1 : start + self.seq_len + 1].astype(np.bool_))
        return window[:-1], window[1:].masked_fill(~learned, IGNORE_INDEX)

    def summary(self) -> str:
        tokens = self.num_samples * self.seq_len
        line = f"{self.source}: {self.origin} · {self.num_samples:,} samples × {self.seq_len} = {tokens:,} tokens"
        if self.mask is not None:
            line += " · loss over the tokens its mask learns (chat)"
        return line

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("tokens", "mask"):
            if isinstance(state[key], np.memmap):
                # Worker processes started by spawn reopen the file rather than receive a copy of it.
                state[key] = (state[key].filename, state[key].dtype.str, state[key].shape)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        for key in ("tokens", "mask"):
            if isinstance(state.get(key), tuple):
                filename, dtype, shape = state[key]
                state[key] = np.memmap(filename, dtype=np.dtype(dtype), mode="r", shape=shape)
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


def _check_vocab(tokens: np.ndarray | TokenStream, vocab_size: int, origin: str, meta: dict | None = None) -> None:
    # A set prepare wrote records its largest id: no need to read gigabytes to find it.
    recorded = (meta or {}).get("max_token")
    largest = int(recorded) if isinstance(recorded, int) else int(tokens.max())
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


def _shard_files(path: str) -> list[Path] | None:
    """The llm.c shards a glob of .bin files or a directory holding .bin files names, sorted; None for other paths."""
    if os.path.isdir(path):
        found = sorted(Path(path).glob("*.bin"))
        kinds = {bool(VALIDATION_NAME.search(p.stem)) for p in found}
        if len(kinds) > 1:
            val = next(p for p in found if VALIDATION_NAME.search(p.stem))
            raise DataError(
                f"{path} holds training and validation shards ({val.name}); give data.path='{path}/*train*.bin' "
                f"and data.val_path='{path}/*val*.bin'"
            )
        return found or None
    if not glob.has_magic(path) or not path.endswith(".bin"):
        return None
    return sorted(Path(p) for p in glob.glob(path, recursive=True) if os.path.isfile(p))


def token_source(path: str, what: str = "data.path") -> tuple[np.ndarray | TokenStream, dict] | None:
    """A token file or set (NAME.bin), or llm.c shards (a .bin, a glob or a directory of them); None for text."""
    shards = _shard_files(path)
    if shards is not None:
        if not shards:
            raise DataError(f"{what}={path!r} matches no .bin files; check the path")
        strangers = [p for p in shards if not is_llmc_file(p)]
        if strangers:
            raise DataError(
                f"{strangers[0]} is not an llm.c shard; a glob or directory of .bin files reads llm.c shards: give a "
                "set that make prepare wrote by its name (data/NAME.bin)"
            )
        return read_llmc(shards)
    if path.endswith(".bin"):
        return read_token_file(path, what)
    return None


def _files_dataset(cfg: RunConfig) -> Dataset:
    path = cfg.data.path
    if not path:
        raise DataError('data.source=files needs data.path, e.g. ARGS="data.path=corpus/*.txt"')
    found = token_source(path)
    meta = None
    if found is not None:
        tokens, meta = found
    else:
        documents = list(document_chunks(expand_globs([path], "data.path", "check the path or use data.source=corpus")))
        tokens = np.concatenate(documents)
    if len(tokens):
        _check_vocab(tokens, cfg.model.vocab_size, f"data.path='{path}'", meta)
    mask = token_mask(path, meta, cfg.data.seq_len, "data.seq_len") if meta is not None else None
    return TokenWindows(tokens, cfg.data.seq_len, "files", path, mask)


def packed_seq_len(path: str, meta: dict) -> int | None:
    """The windows a chat token set (one with a mask) was packed into: its sidecar's chat.seq_len; None for a set
    without a mask. A masked set whose chat.seq_len is not a window length is damaged, and named so."""
    if not isinstance(meta.get("mask"), dict):
        return None
    chat = meta.get("chat")
    packed = chat.get("seq_len") if isinstance(chat, dict) else None
    if not isinstance(packed, int) or isinstance(packed, bool) or packed < 1:
        shown = f"chat.seq_len={packed!r}" if isinstance(chat, dict) else f"chat={chat!r}"
        raise DataError(
            f"the sidecar {sidecar_path(Path(path))} is damaged: it has a mask but {shown[:80]}, not the window "
            "length its conversations were packed into; re-run make prepare"
        )
    return packed


def token_mask(path: str, meta: dict, seq_len: int, what: str) -> np.ndarray | TokenStream | None:
    """A token set's mask (chat data), whose conversations were packed into windows of the seq_len it records:
    another seq_len would cut them, so it is refused."""
    packed = packed_seq_len(path, meta)
    mask = read_mask(path, meta)
    if mask is not None and packed != seq_len:
        raise DataError(
            f"{path} packs its conversations into windows of {packed} tokens, but {what}={seq_len}; set "
            f"{what}={packed}, or prepare it again with SEQ_LEN={seq_len}"
        )
    return mask


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


def source_of_path(path: str) -> str:
    """The source a data path means: a directory is an image folder unless it holds .bin shards; else text or tokens."""
    return "images" if os.path.isdir(path) and not any(Path(path).glob("*.bin")) else "files"


def resolve_data(cfg: RunConfig, source_given: bool) -> None:
    """Settle what the data decides, in place: a source inferred from data.path, and vocab_size=auto.

    source_given: data.source was set on this command line (not only by the config file), so a
    data.path that contradicts it is refused instead of silently winning or losing.
    """
    data = cfg.data
    if data.path:
        inferred = source_of_path(data.path)
        if not source_given:
            data.source = inferred
        elif data.source != inferred:
            kind = "a directory (an image folder)" if inferred == "images" else "a text glob or token file"
            raise ConfigError(
                f"data.path={data.path!r} is {kind}, which data.source={data.source} does not read; "
                f"drop data.source (the path picks data.source={inferred}) or drop data.path"
            )
    if data.val_path and SOURCE_INPUT.get(source_of_path(data.val_path)) != SOURCE_INPUT.get(data.source, "tokens"):
        raise ConfigError(f"data.val_path={data.val_path!r} is not the same kind of data as data.source={data.source}")
    if getattr(cfg.model, "vocab_size", None) == VOCAB_AUTO:  # a token model's (INPUT_KEYS)
        cfg.model.vocab_size = _data_vocab_size(cfg)


def _data_vocab_size(cfg: RunConfig) -> int:
    source, path = cfg.data.source, cfg.data.path
    if source == "synthetic":
        raise ConfigError(
            "model.vocab_size=auto takes the size from the data; data.source=synthetic has none: give a number"
        )
    if source != "files":
        return BYTE_VOCAB
    if path.endswith(".bin") and not glob.has_magic(path) and not Path(path).exists():
        if not sidecar_path(Path(path)).is_file():
            raise DataError(
                f"model.vocab_size=auto reads the vocabulary of data.path={path!r}, which does not exist; "
                "make it with make prepare (see the config file's header) or set model.vocab_size"
            )
    found = token_source(path)
    if found is None:
        return BYTE_VOCAB
    meta = found[1]
    try:
        return int(meta["vocab_size"])
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{sidecar_path(Path(path))} has no vocab_size; add it or set model.vocab_size") from None


def data_tokenizer(cfg: RunConfig) -> Path | None:
    """The tokenizer.json the run's token file was made with (checked against its sidecar), or None without one."""
    path = cfg.data.path
    return token_file_tokenizer(path) if cfg.data.source == "files" and path else None


def token_file_tokenizer(path: str, what: str = "data.path") -> Path | None:
    """The tokenizer.json beside a token file that made its ids (its sha256 checked against the sidecar's
    record), or None when the path is text, the ids are bytes or the sidecar names no file."""
    found = token_source(path, what)
    if found is None:
        return None
    record = found[1].get("tokenizer")
    if not isinstance(record, dict) or not isinstance(record.get("file"), str):
        return None
    tokenizer = Path(path).parent / Path(record["file"]).name
    try:
        actual = sha256_of(tokenizer)
    except DataError as exc:
        raise DataError(f"{path} was made with {tokenizer}, which cannot be used ({exc}); restore it") from None
    if actual != record.get("sha256"):
        raise DataError(f"{tokenizer} is not the tokenizer {path} was made with (sha256 differs); re-run make prepare")
    return tokenizer


def path_tokenizer(path: str, what: str = "data.path") -> TokenizerId:
    """What made the ids of a data path: a text glob is read as bytes; a token file says so in its sidecar."""
    found = token_source(path, what)
    return BYTES if found is None else recorded_tokenizer(found[1])


def data_tokenizer_id(cfg: RunConfig) -> TokenizerId:
    """What made the ids this run trains on (train/tokenizer.py TokenizerId)."""
    source = cfg.data.source
    if source == "files":
        return path_tokenizer(cfg.data.path)
    return BYTES if source == "corpus" else ANY  # synthetic ids and images stand for no text


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


def describe(dataset: Dataset) -> str:
    """One console line: source, origin, samples and tokens."""
    return dataset.summary()
