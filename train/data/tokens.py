"""Token files: what `make prepare` writes and every token source reads.

Format (write it yourself from any tokenizer):

- NAME.bin: the token ids as raw little-endian unsigned integers, no header.
- NAME.json: {"dtype": "uint8", "uint16" or "uint32", "vocab_size": V, "count": number of tokens};
  the smallest that holds every id (uint8 for bytes, uint16 up to V = 65536, else uint32). Other
  keys are kept as information; prepare adds "tokenizer": {"file", "sha256", "vocab_size"} when
  the ids come from NAME.tokenizer.json (train/tokenizer.py).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from env.common.atomic import replace_atomically
from train.errors import DataError

BYTE_VOCAB = 256
TOKEN_DTYPES = {"uint8": np.dtype("<u1"), "uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


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
