"""The storage layer: one checkpoint entry as a torch.distributed.checkpoint folder plus a plain-data header.

    step-000100/          written under a temporary name, moved into place when complete
        .metadata         DCP's index of the tensors (tensors only: plain.check_dcp_metadata)
        __<rank>_0.distcp DCP's tensor files: each rank writes its shards, a replicated tensor once
        header.pt         rank 0: step, world size, config, and every non-tensor value of the parts

These functions act on paths only and know nothing of who calls them; every function that names
no rank is collective (each rank calls it) when torch.distributed is initialized.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from env.common.atomic import fsync_dir, make_temp_dir
from train.checkpoint.plain import check_dcp_metadata, load_plain
from train.checkpoint.records import remove, save_hashed

HEADER_FILE = "header.pt"
METADATA_FILE = ".metadata"


def split_tensors(tree: dict[Any, Any]) -> tuple[dict[Any, Any], dict[Any, Any]]:
    """Split a nested dict into its tensor leaves (for DCP) and everything else (same nesting in both)."""
    import torch

    tensors: dict[Any, Any] = {}
    rest: dict[Any, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            sub_tensors, sub_rest = split_tensors(value)
            if sub_tensors:
                tensors[key] = sub_tensors
            if sub_rest or not sub_tensors:
                rest[key] = sub_rest
        elif isinstance(value, torch.Tensor):
            tensors[key] = value
        else:
            rest[key] = value
    return tensors, rest


def skeleton(tensors: dict[Any, Any]) -> dict[Any, Any]:
    """The tensors' nesting with each leaf as [global shape, dtype]: plain data, kept in the header."""
    return {k: skeleton(v) if isinstance(v, dict) else [list(v.shape), v.dtype] for k, v in tensors.items()}


def targets(saved: dict[Any, Any], current: dict[Any, Any]) -> dict[Any, Any]:
    """Where to load each saved tensor: the part's own tensor there (read in place, sharded as it is), else a new one.

    A part's state may hold a tensor only once it exists (a toy Stateful, a lazily made buffer); the
    saved shapes make room for it.
    """
    import torch

    found: dict[Any, Any] = {}
    for key, leaf in saved.items():
        mine = current.get(key) if isinstance(current, dict) else None
        if isinstance(leaf, dict):
            found[key] = targets(leaf, mine if isinstance(mine, dict) else {})
        else:
            shape, dtype = leaf
            found[key] = mine if isinstance(mine, torch.Tensor) else torch.empty(shape, dtype=dtype)
    return found


def merge(tensors: dict[Any, Any], rest: dict[Any, Any]) -> dict[Any, Any]:
    merged = dict(tensors)
    for key, value in rest.items():
        merged[key] = merge(merged.get(key, {}), value) if isinstance(value, dict) else value
    return merged


def _not_from_dcp(record: logging.LogRecord) -> bool:
    return f"{os.sep}distributed{os.sep}checkpoint{os.sep}" not in record.pathname


@contextlib.contextmanager
def _quiet_dcp() -> Iterator[None]:
    """Hide DCP's notes that ask nothing of the user: torch 2.4 tripping its own TypedStorage
    deprecation, the reminder that one process without a process group saves alone, and the root-logger
    lines newer torch writes about a file that vanished mid-read ("Rank local metadata is not found."):
    the checkpointer tells a pruned checkpoint from a damaged one itself, in its own words."""
    root = logging.getLogger()
    root.addFilter(_not_from_dcp)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
            warnings.filterwarnings("ignore", message="torch.distributed is .*uninitialized")
            yield
    finally:
        root.removeFilter(_not_from_dcp)


def make_temp(directory: Path, name: str) -> Path:
    """Rank 0: a new private folder for entry `name` (random name, created exclusively: DCP's files land inside)."""
    return make_temp_dir(directory, name)


def write_tensors(temp: Path, tensors: dict[str, Any]) -> None:
    import torch.distributed.checkpoint as dcp

    with _quiet_dcp():
        dcp.save(tensors, checkpoint_id=temp)


def write_header(temp: Path, header: dict[str, Any]) -> list[str]:
    """Rank 0: the header file; returns the names of every file in the entry, for hashing."""
    save_hashed(header, temp / HEADER_FILE)
    return sorted(p.name for p in temp.iterdir())


def commit(directory: Path, temp: Path, name: str) -> None:
    """Rank 0: move a finished entry into place (an existing one of that name is removed first)."""
    fsync_dir(temp)
    target = directory / name
    if target.exists() or target.is_symlink():
        remove(target)
    os.replace(temp, target)
    fsync_dir(directory)


def read_header(entry: Path) -> Any:
    """The header of a verified entry, after its DCP metadata passed the allow-list (both: data only)."""
    check_dcp_metadata(entry / METADATA_FILE)
    return load_plain(entry / HEADER_FILE)


def read_tensors(entry: Path, tensors: dict[str, Any]) -> None:
    """Load the entry's tensors into `tensors` in place (DCP reshards them to this world size)."""
    import torch.distributed.checkpoint as dcp

    with _quiet_dcp():
        dcp.load(tensors, checkpoint_id=entry)
