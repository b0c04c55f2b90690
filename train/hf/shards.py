"""Weights as Hugging Face writes them: `model.safetensors`, or shards `model-00001-of-00003.safetensors` with
`model.safetensors.index.json` ({"metadata": {"total_size", "total_parameters"}, "weight_map": {name: file}})
once they pass a size (transformers' max_shard_size; its default "5GB" in 4.x, 10**9-byte units as there).

Reading checks before it loads: the index names only plain file names in the directory, every shard it names
is there, and each tensor's header (name, dtype, shape) is read first, so a caller can compare them with what
config.json implies without reading the weights.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from train.hf.files import WeightsError, is_regular, read_json, write_json

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
DEFAULT_SHARD = "5GB"
UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([A-Za-z]*)")
_SHARD_NAME = re.compile(r"[\w][\w.\-]*\.safetensors")
# The safetensors dtypes of floating-point tensors, and which torch dtype each is.
FLOAT_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def parse_size(text: str) -> int:
    """SHARD's bytes: a number with B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB; a bare number is bytes."""
    found = _SIZE.fullmatch(text.strip()) if text.isascii() else None
    unit = found[2].upper() if found else ""
    if not found or unit not in {**UNITS, "": 1}:
        raise WeightsError(f"SHARD={text!r} is not a size; give e.g. 5GB (the default), 500MB or 2GiB")
    size = int(float(found[1]) * UNITS.get(unit, 1))
    if size < 1:
        raise WeightsError(f"SHARD={text} is less than a byte; give e.g. 5GB")
    return size


def write_weights(tensors: dict[str, torch.Tensor], folder: Path, max_shard: int) -> list[str]:
    """Write tensors (in order) as one file or as shards of at most max_shard bytes each (a larger tensor gets a
    shard of its own); the file names written."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], folder / SINGLE, metadata={"format": "pt"})
        return [SINGLE]
    names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    for name, shard in zip(names, shards, strict=True):
        save_file(shard, folder / name, metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    weight_map = {key: name for name, shard in zip(names, shards, strict=True) for key in shard}
    metadata = {"total_size": total, "total_parameters": sum(t.numel() for t in tensors.values())}
    write_json(folder / INDEX, {"metadata": metadata, "weight_map": weight_map})
    return [*names, INDEX]


@dataclass(frozen=True)
class Header:
    dtype: str  # safetensors' name: F32, BF16, ...
    shape: tuple[int, ...]
    file: str


def weight_files(directory: Path) -> dict[str, str]:
    """{tensor name: file} of a directory's weights, from the index or the single file; WeightsError otherwise."""
    if is_regular(directory / INDEX):
        index = read_json(directory / INDEX, "give a model.safetensors.index.json as save_pretrained writes it")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise WeightsError(f"{directory / INDEX} has no weight_map; save the checkpoint again")
        for name, file in weight_map.items():
            if not isinstance(file, str) or not _SHARD_NAME.fullmatch(file):
                raise WeightsError(
                    f"{directory / INDEX} maps {name!r} to {file!r}, not a .safetensors file name in the directory"
                )
        missing = sorted({file for file in weight_map.values() if not is_regular(directory / file)})
        if missing and os.path.lexists(directory / missing[0]):
            raise WeightsError(f"{directory / missing[0]} is not a regular file; give the weights file itself")
        if missing:
            raise WeightsError(
                f"{directory / INDEX} names the shard {missing[0]}, which is not in {directory}; copy every shard"
            )
        return dict(weight_map)
    if is_regular(directory / SINGLE):
        return dict.fromkeys(read_headers(directory, [SINGLE]), SINGLE)
    for name in (SINGLE, INDEX):  # there, but not a regular file (a FIFO, a device, a dangling link)
        if os.path.lexists(directory / name):
            raise WeightsError(f"{directory / name} is not a regular file; give the weights file itself")
    raise WeightsError(f"{directory} has neither {SINGLE} nor {INDEX}; it holds no weights")


def read_headers(directory: Path, files: list[str]) -> dict[str, Header]:
    """Every tensor's header in these files, without reading the tensors."""
    from safetensors import SafetensorError, safe_open

    headers: dict[str, Header] = {}
    for file in files:
        try:
            with safe_open(str(directory / file), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 - safe_open has keys(), not __iter__
                    part = handle.get_slice(name)
                    headers[name] = Header(part.get_dtype(), tuple(part.get_shape()), file)
        except (SafetensorError, OSError, ValueError) as exc:
            reason = " ".join(str(exc).split())[:160] or type(exc).__name__
            raise WeightsError(f"{directory / file} is not a safetensors file ({reason}); copy it again") from None
    return headers


def read_tensors(directory: Path, headers: dict[str, Header], names: list[str]) -> dict[str, torch.Tensor]:
    """The named tensors, on the CPU, file by file."""
    from safetensors import SafetensorError, safe_open

    by_file: dict[str, list[str]] = {}
    for name in names:
        by_file.setdefault(headers[name].file, []).append(name)
    tensors: dict[str, torch.Tensor] = {}
    for file, wanted in by_file.items():
        try:
            with safe_open(str(directory / file), framework="pt", device="cpu") as handle:
                for name in wanted:
                    tensors[name] = handle.get_tensor(name)
        except (SafetensorError, OSError, ValueError) as exc:
            reason = " ".join(str(exc).split())[:160] or type(exc).__name__
            raise WeightsError(f"{directory / file} cannot be read ({reason}); copy it again") from None
    return {name: tensors[name] for name in names}
