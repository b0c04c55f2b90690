"""Token files: what `make prepare` writes and every token source reads.

Format (write it yourself from any tokenizer):

- NAME.bin: the token ids as raw little-endian unsigned integers, no header.
- NAME.json: {"dtype": "uint8", "uint16" or "uint32", "vocab_size": V, "count": number of tokens,
  "tokenizer": what made the ids}; dtype is the smallest that holds every id (uint8 for bytes,
  uint16 up to V = 65536, else uint32). "tokenizer" is {"kind": "bytes"} for bytes, or
  {"kind", "file", "sha256", "vocab_size", "end_of_document"} for the ids of a tokenizer.json (prepare
  writes it as NAME.tokenizer.json; train/tokenizer.py). Every consumer compares it with the
  tokenizer it uses (train/tokenizer.py TokenizerId). Other keys are kept as information.

Both files are read through the one bounded reader (env/common/readfile.py): a FIFO, a device or an
oversized file at either name is refused in one line.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from env.common.atomic import replace_atomically
from env.common.readfile import ReadRefused, open_bounded, read_json
from train.errors import DataError

BYTE_VOCAB = 256
TOKEN_DTYPES = {"uint8": np.dtype("<u1"), "uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
# A sidecar is a few hundred bytes; far above that is not one.
SIDECAR_LIMIT = 1 << 20


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

    `tokenizer` is what made the ids, recorded in the sidecar: train.tokenizer.BYTES_RECORD, or the
    record of a tokenizer.json (its "sha256" at least). A chunk iterator that raises (an
    EncodingAudit, say) leaves nothing published.
    """
    if not (tokenizer.get("kind") == "bytes" or isinstance(tokenizer.get("sha256"), str)):
        raise ValueError(f"a token file records its tokenizer: {{'kind': 'bytes'}} or a sha256, not {tokenizer!r}")
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
    info = {"dtype": dtype, "vocab_size": vocab_size, "count": count, "sha256": digest.hexdigest(), **(meta or {}),
            "tokenizer": tokenizer}  # fmt: skip
    replace_atomically(sidecar_path(path), lambda out: out.write(json.dumps(info, indent=1) + "\n"), "w")
    return info


def read_token_file(path: Path | str, what: str = "data.path") -> tuple[np.ndarray, dict[str, Any]]:
    """Memory-map a token file after checking it against its sidecar; `what` names the path in errors (DATA)."""
    path = Path(path)
    meta_path = sidecar_path(path)
    fix = "re-run make prepare"
    try:
        handle, size = open_bounded(path, None)
    except ReadRefused as exc:
        if exc.missing:
            raise DataError(f"{what}='{path}' does not exist; check the path or make it with make prepare") from None
        raise DataError(f"{what}='{path}' {exc.reason}; give a token file made by make prepare") from None
    with handle:
        try:
            meta = read_json(meta_path, SIDECAR_LIMIT)
        except ReadRefused as exc:
            if exc.missing:
                raise DataError(
                    f"{path} has no sidecar {meta_path}; write one with dtype, vocab_size and count "
                    f"(see train/data/tokens.py) or {fix}"
                ) from None
            raise DataError(f"the sidecar {meta_path} {exc.reason}; {fix}") from None
        try:
            dtype, count = meta["dtype"], int(meta["count"])
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(
                f"{meta_path} is not a valid sidecar ({exc.__class__.__name__}: {exc}); "
                "it needs dtype, vocab_size and count"
            ) from None
        if dtype not in TOKEN_DTYPES:
            raise DataError(f"{meta_path}: dtype={dtype!r} is not one of {', '.join(TOKEN_DTYPES)}; fix the sidecar")
        expected_bytes = count * TOKEN_DTYPES[dtype].itemsize
        if size != expected_bytes:
            raise DataError(
                f"{path} holds {size} bytes but its sidecar says {count} {dtype} tokens "
                f"({expected_bytes} bytes); {fix}"
            )
        if count == 0:  # np.memmap refuses empty files
            return np.zeros(0, TOKEN_DTYPES[dtype]), meta
        # Mapped from the file that was checked, not from its name again.
        return np.memmap(handle, dtype=TOKEN_DTYPES[dtype], mode="r", shape=(count,)), meta
