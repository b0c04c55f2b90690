"""Text files as documents: globs expanded, each file's bytes followed by the document separator.

Only text is read so: a structured or compressed file (JSON lines, Parquet, gzip, an llm.c shard, …,
train/data/formats.py) is refused in one line that names `make prepare`, never trained as bytes.

Globs are expanded without following links to directories: `**` and every wildcard walk real
directories only, so a link loop (`loop/self -> .`) or /proc (whose per-process `root` and `cwd`
link back to /) is walked once, not again through each link, and a file is one file however many
paths reach it (each real file, by device and inode, counted once). A component the user wrote
out in full is taken as written, link or not. Only regular files are taken (a link to one
counts as that file): a FIFO, device or directory that matches is left out, and every file is
read through the bounded reader (env/common/readfile.py), never past the size it had when opened.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import stat
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from env.common.readfile import ReadRefused, read_bounded
from train.data.formats import refuse_unless_text
from train.errors import DataError

# Ends every document; Python sources and ordinary text never contain a NUL byte.
DOC_SEPARATOR = b"\x00"


def read_document(path: Path | str) -> bytes:
    """A text file's bytes, through the bounded reader (a regular file only); DataError naming the file."""
    try:
        return read_bounded(path, None)
    except ReadRefused as exc:
        raise DataError(f"{path} {exc.reason}; check its permissions or leave it out") from None


def document_chunks(paths: Iterable[Path], max_bytes: int | None = None) -> Iterator[np.ndarray]:
    """Each file's bytes followed by DOC_SEPARATOR, as uint8 arrays, stopping at max_bytes in all."""
    paths = list(paths)
    refuse_unless_text(paths)
    remaining = sys.maxsize if max_bytes is None else max_bytes
    for path in paths:
        document = (read_document(path) + DOC_SEPARATOR)[:remaining]
        remaining -= len(document)
        yield np.frombuffer(document, dtype=np.uint8)
        if remaining == 0:
            return


def _hidden(name: str, pattern: str) -> bool:
    """glob's rule: a wildcard does not match a name starting with '.' unless the pattern does too."""
    return name.startswith(".") and not pattern.startswith(".")


def _entries(folder: str) -> list[os.DirEntry]:
    try:
        with os.scandir(folder or os.curdir) as found:
            return sorted(found, key=lambda entry: entry.name)
    except OSError:  # unreadable or vanished: matches nothing, as glob does
        return []


def _expand(pattern: str) -> Iterator[str]:
    """Paths matching `pattern` (glob's syntax, ** recursive), wildcards never entering a link to a directory.

    Each (real directory, rest of the pattern) is walked once, so several `**` cost no more than one; the
    walk keeps its own stack, so a tree thousands of directories deep is no RecursionError.
    """
    anchor, rest = (os.sep, pattern.lstrip(os.sep)) if pattern.startswith(os.sep) else ("", pattern)
    parts = [part for part in rest.split(os.sep) if part]
    walked: set[tuple[int, int, int]] = set()
    pending = [(anchor, 0)]
    while pending:
        base, index = pending.pop()
        if index == len(parts):
            yield base
            continue
        try:
            here = os.stat(base or os.curdir)
        except OSError:
            continue
        key = (here.st_dev, here.st_ino, index)
        if key in walked:
            continue
        walked.add(key)
        part = parts[index]
        if part == "**":
            pending.append((base, index + 1))  # no directory at all
            for entry in _entries(base):
                if _hidden(entry.name, part):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    pending.append((os.path.join(base, entry.name), index))
                elif index + 1 == len(parts):  # a trailing ** matches the files below too, as glob's does
                    yield os.path.join(base, entry.name)
        elif not glob.has_magic(part):
            path = os.path.join(base, part)
            if index + 1 == len(parts) or os.path.isdir(path):  # written out in full: followed as written
                pending.append((path, index + 1))
        else:
            last = index + 1 == len(parts)
            pending += [
                (os.path.join(base, entry.name), index + 1)
                for entry in _entries(base)
                if not _hidden(entry.name, part)
                and fnmatch.fnmatchcase(entry.name, part)
                and (last or entry.is_dir(follow_symlinks=False))
            ]


def expand_globs(patterns: Iterable[str], what: str, fix: str) -> list[Path]:
    """Regular files matching any of the globs (** recurses), sorted, each real file once; DataError naming
    `what` and `fix` when none match, or only empty ones do."""
    patterns = list(patterns)
    first_path: dict[tuple[int, int], str] = {}
    for pattern in patterns:
        for path in _expand(pattern):
            try:
                info = os.stat(path)  # a link to a file is that file
            except OSError:
                continue
            if stat.S_ISREG(info.st_mode):
                key = (info.st_dev, info.st_ino)
                first_path[key] = min(first_path.get(key, path), path)
    files = sorted(Path(p) for p in first_path.values())
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
