"""Training data, one module per concern:

- tokens.py: token files and sets of shards (NAME.bin + NAME.json), the format every token source reads;
- formats.py: the input formats of make prepare (text, JSON lines, Parquet, datasets, llm.c), read as units;
- streams.py: opening those inputs (regular files only; gzip and zstd in bounded memory);
- encode.py: units to token ids, in PROCS processes;
- shards.py: writing a set of shards, resumably, with one writer and no stranger's file replaced;
- llmc.py: llm.c's token shard files;
- text.py: text files as documents (globs, the document separator);
- corpus.py: the built-in byte-level corpus;
- sources.py: data.source as datasets, and what the data decides (vocab_size=auto, the source of a path);
- split.py: the validation split, independent of seed and world size;
- stream.py: the global sample stream, a pure function of (seed, step), and the loader.

The names below are the package's interface; the modules import each other directly. They are
imported when first used, so that `make prepare`, which needs no torch, starts without it.
"""

from __future__ import annotations

import importlib
from typing import Any

_INTERFACE = {
    "BYTE_VOCAB": "train.data.tokens",
    "build_corpus": "train.data.corpus",
    "build_dataset": "train.data.sources",
    "build_loader": "train.data.stream",
    "data_tokenizer": "train.data.sources",
    "describe": "train.data.sources",
    "read_token_file": "train.data.tokens",
    "resolve_data": "train.data.sources",
    "validation_set": "train.data.split",
    "write_token_file": "train.data.tokens",
}
__all__ = sorted(_INTERFACE)


def __getattr__(name: str) -> Any:
    if name not in _INTERFACE:
        raise AttributeError(f"module 'train.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_INTERFACE[name]), name)
