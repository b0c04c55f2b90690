"""A checkpoint is data, never code: the plain-data check on save, and the allow-listed loaders.

Files load with torch.load(weights_only=True). DCP unpickles its own metadata freely, so that
file is first replayed through an allow-list, and must name tensors only: DCP would fully unpickle
any entry its metadata calls bytes. Every non-tensor value therefore travels in the header file.
"""

from __future__ import annotations

import dataclasses
import enum
import pickle
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from train.checkpoint.errors import CheckpointError
from train.checkpoint.records import first_line

# Types torch.load(weights_only=True) rebuilds on torch 2.4 and later; a header must hold only these.
PLAIN_LEAF_TYPES = (type(None), bool, int, float, str, torch.dtype, torch.device)
PLAIN_CONTAINER_TYPES = (dict, OrderedDict, list, tuple, torch.Size)


def check_plain(obj: Any, where: str) -> None:
    """Refuse values torch.load(weights_only=True) would not rebuild, naming where they sit."""
    if type(obj) in (torch.Tensor, nn.Parameter) or type(obj) in PLAIN_LEAF_TYPES:
        return
    if type(obj) in PLAIN_CONTAINER_TYPES:
        items = obj.items() if isinstance(obj, dict) else enumerate(obj)
        for key, value in items:
            check_plain(key, f"{where} key {key!r}")
            check_plain(value, f"{where}[{key!r}]")
        return
    kind = f"{type(obj).__module__}.{type(obj).__qualname__}"
    raise CheckpointError(f"{where} is a {kind}, which a weights-only checkpoint cannot hold; make it a list or tensor")


class MetadataUnpickler(pickle.Unpickler):
    """Rebuilds DCP metadata only from DCP's own dataclasses and enums and a few torch values."""

    EXTRA_ALLOWED = frozenset(
        {
            ("torch", "Size"),
            ("torch.serialization", "_get_layout"),
            ("collections", "OrderedDict"),
            ("pathlib", "PosixPath"),
            ("pathlib", "WindowsPath"),
            ("pathlib", "PurePosixPath"),
            ("pathlib", "Path"),
        }
    )

    TORCH_VALUE_TYPES = (torch.dtype, torch.layout, torch.memory_format)

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("builtins", "getattr"):
            return _enum_member  # Python 3.11.0-3.11.4 pickle Enum members as getattr(cls, name)
        if (module, name) in self.EXTRA_ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), self.TORCH_VALUE_TYPES):
            return getattr(torch, name)
        if module.startswith("torch.distributed.checkpoint.") and "." not in name:
            found = super().find_class(module, name)
            if isinstance(found, type) and (dataclasses.is_dataclass(found) or issubclass(found, enum.Enum)):
                return found
        raise pickle.UnpicklingError(f"it would import {module}.{name}")


def _enum_member(cls: Any, name: str) -> enum.Enum:
    """getattr limited to a member of an Enum class the unpickler already allowed."""
    if isinstance(cls, type) and issubclass(cls, enum.Enum) and isinstance(name, str):
        try:
            return cls[name]
        except KeyError:
            pass
    raise pickle.UnpicklingError(f"it would look up {name!r} on {cls!r}")


def check_dcp_metadata(path: Path) -> None:
    """Raise pickle.UnpicklingError unless `path` is DCP metadata naming tensors only."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    with path.open("rb") as f:
        metadata = MetadataUnpickler(f).load()
    entries = getattr(metadata, "state_dict_metadata", None)
    if not isinstance(entries, dict) or not all(isinstance(v, TensorStorageMetadata) for v in entries.values()):
        raise pickle.UnpicklingError("its metadata lists entries other than tensors")


def load_plain(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def read_problem(name: str, exc: Exception) -> str:
    """One line for a checkpoint file that failed to load after its checksum passed."""
    if isinstance(exc, pickle.UnpicklingError):
        named = re.search(r"GLOBAL ([\w.]+)", str(exc))
        why = f"it would import {named.group(1)}" if named else str(exc).strip().splitlines()[0]
        return f"checkpoint {name} is not plain data ({why}); refused and skipped"
    return f"checkpoint {name} cannot be read ({first_line(exc)}); skipped"
