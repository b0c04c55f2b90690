"""llm.c token shards: read and written as they are, so llm.c's and modded-nanogpt's shards train here unchanged.

The format (llm.c dev/data/data_common.py, write_datafile): a header of 256 little-endian int32, of
which [0] is the magic 20240520, [1] the version 1 and [2] the token count N; then N little-endian
uint16 tokens (GPT-2 ids: llm.c's fineweb.py puts <|endoftext|> = 50256 before every document). A
file is exactly 1024 + 2N bytes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from train.errors import DataError

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")
# What a version-1 shard holds: GPT-2 ids (tiktoken's gpt2), whose <|endoftext|> separates documents.
GPT2_VOCAB = 50257
GPT2_END_OF_TEXT = 50256
# The most tokens a shard's int32 count can hold.
MAX_TOKENS = 2**31 - 1


def is_llmc(head: bytes) -> bool:
    """Whether a file's first bytes carry the llm.c magic."""
    return len(head) >= 4 and int.from_bytes(head[:4], "little") == MAGIC


def header(count: int) -> bytes:
    values = np.zeros(HEADER_INTS, dtype="<i4")
    values[:3] = (MAGIC, VERSION, count)
    return values.tobytes()


def shard_count(path: Path) -> int:
    """The token count of an llm.c shard, after checking its header and its length; DataError (one line) if wrong."""
    try:
        with open(path, "rb") as file:
            raw = file.read(HEADER_BYTES)
            size = file.seek(0, 2)
    except OSError as exc:
        raise DataError(f"cannot read the llm.c shard {path} ({exc.strerror}); check the path") from None
    if len(raw) < HEADER_BYTES:
        raise DataError(f"{path} is {len(raw)} bytes, shorter than an llm.c header ({HEADER_BYTES}); it is truncated")
    magic, version, count = (int(v) for v in np.frombuffer(raw, dtype="<i4", count=3))
    if magic != MAGIC:
        raise DataError(f"{path} has magic {magic}, not llm.c's {MAGIC}; it is not an llm.c shard")
    if version != VERSION:
        raise DataError(
            f"{path} is llm.c shard version {version}; this reads version {VERSION} (uint16 GPT-2 tokens)"
        )
    expected = HEADER_BYTES + count * TOKEN_DTYPE.itemsize
    if count < 0 or size != expected:
        raise DataError(
            f"{path}'s header says {count:,} tokens ({expected:,} bytes) but the file holds {size:,} bytes; "
            "it is truncated or damaged: fetch or write it again"
        )
    return count


def open_shard(path: Path) -> np.ndarray:
    """An llm.c shard's tokens, memory-mapped after the header check."""
    count = shard_count(path)
    if count == 0:  # np.memmap refuses an empty map
        return np.zeros(0, TOKEN_DTYPE)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(count,))
