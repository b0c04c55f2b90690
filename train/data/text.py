"""Text files as documents: globs expanded, each file's bytes followed by the document separator.

Only text is read so: a structured or compressed file (JSON lines, Parquet, gzip, an llm.c shard, …,
train/data/formats.py) is refused in one line that names `make prepare`, never trained as bytes.
"""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from train.data.formats import refuse_unless_text
from train.errors import DataError

# Ends every document; Python sources and ordinary text never contain a NUL byte.
DOC_SEPARATOR = b"\x00"


def document_chunks(paths: Iterable[Path], max_bytes: int | None = None) -> Iterator[np.ndarray]:
    """Each file's bytes followed by DOC_SEPARATOR, as uint8 arrays, stopping at max_bytes in all."""
    paths = list(paths)
    refuse_unless_text(paths)
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
    files = [path for path in glob_paths(patterns) if path.is_file()]
    shown = " ".join(repr(p) for p in patterns)
    if not files:
        raise DataError(f"{what}={shown} matches no files; {fix}")
    if not any(_size(path) for path in files):  # an unreadable one says so when it is read
        count = f"{len(files)} file{'' if len(files) == 1 else 's'}"
        raise DataError(f"{what}={shown} matches only empty files ({count}, 0 bytes); give files that hold text")
    return files


def glob_paths(patterns: Iterable[str]) -> list[Path]:
    """Everything (files and directories) any of the globs matches, sorted, each once."""
    return sorted({Path(p) for pattern in patterns for p in glob.glob(pattern, recursive=True)})


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 1
