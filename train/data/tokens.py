"""Token files: what `make prepare` writes and every token source reads, one file or a set of shards.

Format (write it yourself from any tokenizer):

- NAME.bin: the token ids as raw little-endian unsigned integers, no header.
- NAME.json, the sidecar: {"dtype": "uint8", "uint16" or "uint32", "vocab_size": V, "count": number of
  tokens, "sha256": of the ids' bytes}; the dtype is the smallest that holds every id (uint8 for
  bytes, uint16 up to V = 65536, else uint32). "tokenizer" records what made the ids: {"kind",
  "file", "sha256", "vocab_size", "end_of_document"}; kind is bytes, bpe (trained by prepare), file
  (a given tokenizer.json, copied to NAME.tokenizer.json) or gpt2 (llm.c's shards). sha256 is the
  tokenizer.json's digest, or for a built-in tokenizer (bytes, gpt2) the digest of the text
  "torchrig tokenizer: <kind>", so that two token files compare by it alone. Other keys are kept
  as information.
- A set of shards (train/data/shards.py writes them): the sidecar also lists "shards", each {"file",
  "count", "sha256"} beside it, read in order as one stream; count and sha256 are then the whole
  stream's. With one shard that file is NAME.bin itself. "complete": false marks a prepare that has
  not finished: it is refused until a rerun of the same prepare finishes it. A shard with
  "shard_format": "llmc" is an llm.c file (its 1024-byte header before the ids).
- An llm.c shard (train/data/llmc.py) given by itself, or a glob or directory of them, is read as
  GPT-2 ids without any sidecar.
- A mask (chat data, train/data/chat.py): "mask": {"dtype": "uint8", "learned"} in the sidecar, and each
  shard's {"mask": {"file", "sha256", "learned"}}: a file of one uint8 per id beside the shard, 1 where the
  loss learns that token (a target the loader does not mark IGNORE_INDEX); "learned" counts the 1s.

Every file is read through a bounded reader: a FIFO, a device or an oversized file at either name
is refused in one line. Every consumer compares the tokenizer record with the tokenizer it uses
(train/tokenizer.py TokenizerId).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from env.common.atomic import replace_atomically
from env.common.readfile import ReadRefused, open_bounded, read_json
from train.data import llmc
from train.data.streams import read_head
from train.errors import DataError

BYTE_VOCAB = 256
TOKEN_DTYPES = {"uint8": np.dtype("<u1"), "uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
# A sidecar lists a set's shards; a larger one is not a sidecar (a planted /dev/zero or a huge file).
SIDECAR_LIMIT = 64 << 20
SHARD_HEADERS = {"tokens": 0, "llmc": llmc.HEADER_BYTES}


def builtin_tokenizer(kind: str, vocab_size: int, end_of_document: int) -> dict[str, Any]:
    """The tokenizer record of a tokenizer without a file: its digest is that of its name (module docstring)."""
    digest = hashlib.sha256(f"torchrig tokenizer: {kind}".encode()).hexdigest()
    return {"kind": kind, "file": None, "sha256": digest, "vocab_size": vocab_size, "end_of_document": end_of_document}


BYTES_TOKENIZER = builtin_tokenizer("bytes", BYTE_VOCAB, 0)
GPT2_TOKENIZER = builtin_tokenizer("gpt2", llmc.GPT2_VOCAB, llmc.GPT2_END_OF_TEXT)


def token_dtype(vocab_size: int) -> str:
    """The narrowest token file dtype that holds every id below vocab_size."""
    return "uint8" if vocab_size <= 2**8 else "uint16" if vocab_size <= 2**16 else "uint32"


def sidecar_path(bin_path: Path) -> Path:
    return Path(bin_path).with_suffix(".json")


def write_token_file(
    path: Path | str,
    chunks: Iterable[np.ndarray],
    vocab_size: int,
    *,
    tokenizer: dict[str, Any],
    dtype: str | None = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write token chunks to PATH.bin and its PATH.json sidecar (last, so its presence means done).

    tokenizer: the record of what made the ids (BYTES_TOKENIZER, say), kept in the sidecar.
    """
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
    if tokenizer is not None:
        info["tokenizer"] = tokenizer
    replace_atomically(sidecar_path(path), lambda out: out.write(json.dumps(info, indent=1) + "\n"), "w")
    return info


class TokenStream:
    """Token files (shards) read as one memory-mapped stream: len, slices, max; pickled as file names."""

    def __init__(self, parts: list[tuple[str, int, int]], dtype: np.dtype) -> None:
        self.parts = parts  # (file, byte offset of the ids, count)
        self.dtype = np.dtype(dtype)
        self._open()

    def _open(self) -> None:
        self.maps = [
            np.memmap(name, dtype=self.dtype, mode="r", offset=offset, shape=(count,))
            for name, offset, count in self.parts
            if count
        ]
        self.starts = np.cumsum([0, *(len(m) for m in self.maps)])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, key: int | slice) -> Any:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise IndexError("a token stream is sliced without a step")
            first = int(np.searchsorted(self.starts, start, side="right")) - 1
            pieces = []
            while start < stop:
                local = start - int(self.starts[first])
                take = min(stop - start, len(self.maps[first]) - local)
                pieces.append(self.maps[first][local : local + take])
                start += take
                first += 1
            if len(pieces) == 1:
                return np.asarray(pieces[0])
            return np.concatenate(pieces) if pieces else np.zeros(0, self.dtype)
        index = key + len(self) if key < 0 else key
        if not 0 <= index < len(self):
            raise IndexError(f"token {key} is outside a stream of {len(self)}")
        part = int(np.searchsorted(self.starts, index, side="right")) - 1
        return self.maps[part][index - int(self.starts[part])]

    def max(self) -> Any:
        return max(m.max() for m in self.maps)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = self[0 : len(self)]
        return whole.astype(dtype) if dtype is not None else whole

    def __getstate__(self) -> dict[str, Any]:
        return {"parts": self.parts, "dtype": self.dtype.str}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.parts, self.dtype = state["parts"], np.dtype(state["dtype"])
        self._open()


def is_llmc_file(path: Path) -> bool:
    """Whether path is a regular file that starts with the llm.c magic (read without blocking)."""
    try:
        return path.is_file() and llmc.is_llmc(read_head(path, 4))
    except DataError:
        return False


def read_sidecar(meta_path: Path) -> dict[str, Any]:
    """A sidecar's JSON through the one bounded reader (a regular file of at most SIDECAR_LIMIT bytes)."""
    try:
        meta = read_json(meta_path, SIDECAR_LIMIT)
    except ReadRefused as exc:
        raise DataError(f"the sidecar {meta_path} {exc.reason}; re-run make prepare") from None
    if not isinstance(meta, dict):
        raise DataError(f"{meta_path} is not a valid sidecar (not a JSON object); re-run make prepare")
    return meta


def _shard_parts(path: Path, meta: dict[str, Any], dtype: np.dtype) -> list[tuple[str, int, int]]:
    header = SHARD_HEADERS.get(meta.get("shard_format", "tokens"))
    if header is None:
        raise DataError(f"{sidecar_path(path)}: shard_format={meta.get('shard_format')!r} is not tokens or llmc")
    if meta.get("complete") is False:
        done = len(meta["shards"]) if isinstance(meta.get("shards"), list) else 0
        raise DataError(
            f"{path} is a prepare that has not finished ({done} shards written); rerun the same make prepare to "
            "finish it"
        )
    parts, total = [], 0
    for entry in meta["shards"]:
        try:
            name, count = entry["file"], int(entry["count"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{sidecar_path(path)} lists a shard without file and count; re-run make prepare") from None
        if not isinstance(name, str) or "/" in name or name.startswith("."):
            raise DataError(f"{sidecar_path(path)} lists the shard {name!r}, which is not a file beside it")
        shard = path.parent / name
        expected = header + count * dtype.itemsize
        size = shard.stat().st_size if shard.is_file() else None
        if size != expected:
            state = "is missing" if size is None else f"holds {size:,} bytes, not {expected:,}"
            raise DataError(f"{shard}, a shard of {path}, {state}; re-run the make prepare that wrote it")
        parts.append((str(shard), header, count))
        total += count
    if total != int(meta["count"]):
        raise DataError(f"{sidecar_path(path)}'s shards hold {total} tokens, not its count {meta['count']}")
    return parts


def read_token_file(path: Path | str, what: str = "data.path") -> tuple[np.ndarray | TokenStream, dict[str, Any]]:
    """Memory-map a token file or a set of shards after checking it against its sidecar; or an llm.c shard.
    `what` names the path in errors (DATA)."""
    path = Path(path)
    meta_path = sidecar_path(path)
    if not meta_path.exists() and is_llmc_file(path):
        return read_llmc([path])
    if not path.exists() and not meta_path.exists():
        raise DataError(f"{what}='{path}' does not exist; check the path or make it with make prepare")
    if not os.path.lexists(meta_path):
        raise DataError(
            f"{path} has no sidecar {meta_path}; write one with dtype, vocab_size and count "
            "(docs/data.md#the-token-file-format) or re-run make prepare"
        )
    meta = read_sidecar(meta_path)
    try:
        dtype, count = meta["dtype"], int(meta["count"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(
            f"{meta_path} is not a valid sidecar ({exc.__class__.__name__}: {exc}); "
            "it needs dtype, vocab_size and count"
        ) from None
    if dtype not in TOKEN_DTYPES:
        raise DataError(f"{meta_path}: dtype={dtype!r} is not one of {', '.join(TOKEN_DTYPES)}; fix the sidecar")
    if isinstance(meta.get("shards"), list):
        parts = _shard_parts(path, meta, TOKEN_DTYPES[dtype])
        if len(parts) == 1 and parts[0][1] == 0 and parts[0][2]:  # one raw shard: a plain map, as a token file
            return np.memmap(parts[0][0], dtype=TOKEN_DTYPES[dtype], mode="r", shape=(parts[0][2],)), meta
        return TokenStream(parts, TOKEN_DTYPES[dtype]), meta
    try:  # a regular file (a FIFO or device is named as one), opened without blocking
        handle, _ = open_bounded(path, None)
    except ReadRefused as exc:
        raise DataError(f"{what}='{path}' {exc.reason}; give a token file made by make prepare") from None
    handle.close()
    expected_bytes = count * TOKEN_DTYPES[dtype].itemsize
    if path.stat().st_size != expected_bytes:
        raise DataError(
            f"{path} holds {path.stat().st_size} bytes but its sidecar says {count} {dtype} tokens "
            f"({expected_bytes} bytes); re-run make prepare"
        )
    if count == 0:  # np.memmap refuses empty files
        return np.zeros(0, TOKEN_DTYPES[dtype]), meta
    return np.memmap(path, dtype=TOKEN_DTYPES[dtype], mode="r", shape=(count,)), meta


def read_mask(path: Path | str, meta: dict[str, Any]) -> np.ndarray | TokenStream | None:
    """The mask of a token set that has one (its sidecar's "mask"), read as the ids are; None without one."""
    path = Path(path)
    if not isinstance(meta.get("mask"), dict):
        return None
    parts = []
    for entry in meta.get("shards") or []:
        mask = entry.get("mask") if isinstance(entry, dict) else None
        name = mask.get("file") if isinstance(mask, dict) else None
        if not isinstance(name, str) or "/" in name or name.startswith("."):
            raise DataError(
                f"{sidecar_path(path)} has a mask but lists a shard without its mask file; re-run make prepare"
            )
        count = int(entry["count"])
        file = path.parent / name
        size = file.stat().st_size if file.is_file() else None
        if size != count:
            state = "is missing" if size is None else f"holds {size:,} bytes, not {count:,}"
            raise DataError(f"{file}, the mask of a shard of {path}, {state}; re-run the make prepare that wrote it")
        parts.append((str(file), 0, count))
    if len(parts) == 1 and parts[0][2]:
        return np.memmap(parts[0][0], dtype=np.uint8, mode="r", shape=(parts[0][2],))
    return TokenStream(parts, np.dtype(np.uint8))


def read_llmc(paths: list[Path]) -> tuple[np.ndarray | TokenStream, dict[str, Any]]:
    """llm.c shards, in the order given, as one stream of GPT-2 ids (each header and length checked)."""
    parts = [(str(p), llmc.HEADER_BYTES, llmc.shard_count(p)) for p in paths]
    count = sum(part[2] for part in parts)
    meta = {
        "dtype": "uint16",
        "vocab_size": llmc.GPT2_VOCAB,
        "count": count,
        "sha256": None,  # not hashed: reading gigabytes at every start would cost more than it tells
        "tokenizer": GPT2_TOKENIZER,
        "shard_format": "llmc",
        "shards": [{"file": Path(name).name, "count": size} for name, _, size in parts],
    }
    return TokenStream(parts, llmc.TOKEN_DTYPE), meta
