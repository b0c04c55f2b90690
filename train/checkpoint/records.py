"""File records: the sha256 and size of every checkpoint file, and the sidecar that lists them.

A checkpoint is complete exactly when its sidecar exists: the sidecar is written last, through
env.common.atomic, and a checkpoint is read only after every file it lists matches, and only when it
lists exactly the files that are there (so no file is ever read unverified).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from env.common.atomic import open_exclusive, write_text_atomically
from env.common.readfile import ReadRefused, open_bounded, read_json

FORMAT_VERSION = 2  # 1: DDP as one step-N.pt file, FSDP as DCP (torchrig before checkpoints were Stateful parts)
HASH_CHUNK_BYTES = 8 * 2**20
# A sidecar lists one record per file of its entry (a few per rank); far above that is not one.
SIDECAR_LIMIT = 16 * 2**20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclasses.dataclass(frozen=True)
class FileRecord:
    sha256: str
    size: int


class _HashingWriter:
    """A file wrapper that hashes what passes through, so a checkpoint is never read back to hash it."""

    def __init__(self, file: io.BufferedWriter) -> None:
        self.file = file
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def hash_file(path: Path) -> FileRecord:
    """sha256 and size of a regular file (a FIFO or device planted in an entry is an OSError, never a hang)."""
    digest = hashlib.sha256()
    size = 0
    try:
        handle, _ = open_bounded(path, None)
    except ReadRefused as exc:
        raise OSError(errno.ENOENT if exc.missing else errno.EINVAL, exc.reason, str(path)) from None
    with handle as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return FileRecord(digest.hexdigest(), size)


def save_hashed(obj: Any, path: Path) -> FileRecord:
    """torch.save into a new file `path` (created exclusively: never through a link), durably, hashing on the way."""
    with open_exclusive(path) as f:
        hashing = _HashingWriter(f)
        torch.save(obj, hashing)
        f.flush()
        os.fsync(f.fileno())
    return FileRecord(hashing.digest.hexdigest(), hashing.size)


def remove(path: Path) -> None:
    """Remove a file, link or folder; a link is removed itself, never what it points at."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_sidecar(path: Path, fields: dict[str, Any], records: dict[str, FileRecord]) -> None:
    sidecar = {**fields, "format": FORMAT_VERSION, "files": {n: dataclasses.asdict(r) for n, r in records.items()}}
    write_text_atomically(path, json.dumps(sidecar, indent=1))


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def read_sidecar(path: Path, entry: str) -> dict[str, Any] | str:
    """The sidecar with its files as FileRecords, or one line saying why it cannot be used.

    Every listed name must lie inside `entry` (no absolute path, no `..`): a sidecar is input too.
    A sidecar of another format comes back as {"format": n} only: refusing it is the caller's call.
    """
    try:
        sidecar = read_json(path, SIDECAR_LIMIT)
    except ReadRefused as exc:
        if exc.missing:
            return f"checkpoint {entry} is incomplete (no {path.name}: still being saved, or its save was interrupted)"
        return f"checkpoint sidecar {path.name} is unreadable (it {exc.reason})"
    found = sidecar.get("format") if isinstance(sidecar, dict) else None
    if type(found) is not int:
        return f"checkpoint sidecar {path.name} names no format"
    if found != FORMAT_VERSION:
        return {"format": found}  # another format's layout: the caller refuses it, naming the format
    files = sidecar.get("files")
    if not isinstance(files, dict) or not files:
        return f"checkpoint sidecar {path.name} lists no files"
    records: dict[str, FileRecord] = {}
    for name, record in files.items():
        parts = name.split("/")
        if parts[0] != entry or len(parts) < 2 or any(p in ("", ".", "..") for p in parts) or "\\" in name:
            return f"checkpoint sidecar {path.name} lists {name!r}, which is not a file of {entry}"
        sha, size = (record.get("sha256"), record.get("size")) if isinstance(record, dict) else (None, None)
        if not (isinstance(sha, str) and _SHA256.match(sha) and type(size) is int and size >= 0):
            return f"checkpoint sidecar {path.name} has a malformed record for {name!r}"
        records[name] = FileRecord(sha, size)
    return {**sidecar, "files": records}


def files_under(directory: Path, entry: str) -> set[str]:
    """Every file below directory/entry, named as a sidecar names them ("entry/…")."""
    root = directory / entry
    return {f"{entry}/{p.relative_to(root).as_posix()}" for p in root.rglob("*") if not p.is_dir() or p.is_symlink()}


def listing_problem(directory: Path, entry: str, files: dict[str, FileRecord]) -> str | None:
    """A file the sidecar does not list (it would be read unverified), or a listed one that is missing or resized."""
    try:
        present = files_under(directory, entry)
    except OSError as exc:
        return f"checkpoint {entry} cannot be listed ({exc.strerror})"
    unlisted = sorted(present - set(files))
    if unlisted:
        return f"checkpoint file {unlisted[0]} is not in its sidecar"
    for name, record in files.items():
        path = directory / name
        if path.is_symlink():
            return f"checkpoint file {name} is a symlink"
        try:
            size = path.stat().st_size
        except OSError as exc:
            return f"checkpoint file {name} is missing ({exc.strerror})"
        if size != record.size:
            return f"checkpoint file {name} is truncated or damaged ({size} bytes, expected {record.size})"
    return None


def checksum_problem(directory: Path, names: list[str], files: dict[str, FileRecord]) -> str | None:
    for name in names:
        try:
            actual = hash_file(directory / name).sha256
        except OSError as exc:
            return f"checkpoint file {name} cannot be read ({exc.strerror})"
        if actual != files[name].sha256:
            return f"checkpoint file {name} is corrupt (sha256 differs from its sidecar)"
    return None
