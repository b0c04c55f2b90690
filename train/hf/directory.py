"""A Hugging Face model directory, read into torchrig and written from it.

Reading (`open_directory`, `read_directory`): config.json names the family by its model_type (the ModelSpec
whose `hf` lists it); the family's from_config gives the model.* keys, torchrig.json (when the directory is a
torchrig export) the training-only ones. Before any weight is read, the model that config implies is built
on the meta device and mapped to transformers' names, and every tensor header is compared with it: a missing
or unexpected weight, a shape or a dtype that contradicts config.json is one line naming the first such key.
Only JSON and safetensors are read: a checkpoint whose model type needs its own code (auto_map) is refused,
and a known model type's auto_map is never used (DeepSeek's published checkpoints carry one; transformers'
own classes read them too). Quantized checkpoints (quantization_config) are refused.

Writing (`write_directory`, train/export.py): config.json (the family's to_config, the tokenizer's special token
ids, torch_dtype), the weights (shards.py), the tokenizer files (tokenizer_files.py) and torchrig.json: where
the weights came from (the run's path relative to the export, its name, step and manifest digest), their
dtype, the training-only model keys and the run's data.seq_len.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from train.config import ModelConfig
from train.config_loader import config_from_dict, validate_model
from train.errors import ConfigError
from train.hf import tokenizer_files
from train.hf.files import WeightsError, check_fits, is_regular, read_json, write_json
from train.hf.shards import FLOAT_DTYPES, Header, read_headers, read_tensors, weight_files, write_weights
from train.models import build_model, registered
from train.models.spec import ModelSpec

CONFIG = "config.json"
PROVENANCE = "torchrig.json"
PROVENANCE_FORMAT = 2  # 1 was the previous release's export (config.json {"model", "export"}): train/weights.py
# Buffers some older checkpoints saved, which every model here derives from the config.
DERIVED = re.compile(r".*\.rotary_emb\.inv_freq")
# config.json's dtype names (torch_dtype in 4.x, dtype in 5.x) as safetensors names them.
DTYPE_NAMES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2}


def is_hf_directory(path: Path) -> bool:
    """A directory whose config.json names a model_type (torchrig's own exports of an earlier release do not)."""
    if not (path / CONFIG).exists() and not (path / CONFIG).is_symlink():
        return False
    config = read_json(path / CONFIG, "give a config.json as save_pretrained writes it")
    return isinstance(config, dict) and "model_type" in config


@dataclass
class Source:
    """An opened directory: what config.json says, the model it implies, and the weights' headers."""

    directory: Path
    config: dict[str, Any]  # config.json
    spec: ModelSpec
    model: ModelConfig
    headers: dict[str, Header]
    provenance: dict[str, Any]

    def tree(self) -> dict[str, Any]:
        """The config tree (RunConfig.to_dict()-shaped) the rest of train/ reads: the model, and the data.seq_len
        a torchrig export recorded."""
        tree: dict[str, Any] = {"model": dataclasses.asdict(self.model)}
        seq_len = (self.provenance.get("data") or {}).get("seq_len")
        if isinstance(seq_len, int) and not isinstance(seq_len, bool):
            tree["data"] = {"seq_len": seq_len}
        return tree

    @property
    def step(self) -> int:
        step = (self.provenance.get("source") or {}).get("step", 0)
        return step if isinstance(step, int) and not isinstance(step, bool) else 0


def _family(config: dict[str, Any], path: Path) -> ModelSpec:
    by_type = {kind: spec for spec in registered().values() if spec.hf for kind in spec.hf.model_types}
    kind = config.get("model_type")
    if kind in by_type:
        return by_type[kind]
    supported = ", ".join(sorted(by_type))
    if config.get("auto_map"):
        raise WeightsError(
            f"{path}: model_type {kind!r} needs the checkpoint's own code (auto_map), which torchrig never runs; "
            f"it reads {supported}"
        )
    raise WeightsError(f"{path}: model_type {kind!r} is not supported; supported: {supported}")


def open_directory(directory: Path) -> Source:
    """config.json, the model it implies (validated) and the weights' headers; nothing of the weights is read."""
    path = directory / CONFIG
    config = read_json(path, "give a config.json as save_pretrained writes it")
    if not isinstance(config, dict):
        raise WeightsError(f"{path} is not a JSON object; give a config.json as save_pretrained writes it")
    if config.get("quantization_config") is not None:
        method = (config["quantization_config"] or {}).get("quant_method", "?")
        raise WeightsError(
            f"{path}: a quantized checkpoint (quantization_config {method}); give its bf16 or fp32 weights"
        )
    spec = _family(config, path)
    weights = weight_files(directory)
    headers = read_headers(directory, sorted(set(weights.values())))
    for name, file in weights.items():
        if headers.get(name) is None or headers[name].file != file:
            raise WeightsError(f"{directory}: the index maps '{name}' to {file}, which does not hold it; save it again")
    provenance = _provenance(directory)
    try:
        keys = spec.hf.from_config(config, set(headers))
    except ConfigError as exc:
        raise WeightsError(f"{path}: {exc}") from None
    training = {k: v for k, v in (provenance.get("model") or {}).items() if k in spec.hf.training_keys}
    try:
        model = config_from_dict({"model": {"arch": spec.name, **keys, **training}}).model
        validate_model(model)
    except ConfigError as exc:
        raise WeightsError(f"{path}: the model it describes is not valid here ({exc})") from None
    return Source(directory, config, spec, model, headers, provenance)


def _provenance(directory: Path) -> dict[str, Any]:
    if not is_regular(directory / PROVENANCE):
        return {}
    tree = read_json(directory / PROVENANCE, "export again or remove it")
    return tree if isinstance(tree, dict) else {}


def expected_weights(source: Source) -> dict[str, torch.Tensor]:
    """The model config.json implies, as transformers' names and meta tensors (shape and dtype kind)."""
    with torch.device("meta"):
        model = build_model(source.model)
    return source.spec.hf.to_state(source.model, model.state_dict())


def check_headers(source: Source, expected: dict[str, torch.Tensor]) -> None:
    """Every weight config.json implies is there with its shape and a floating dtype config.json allows (its
    torch_dtype, or float32), and nothing else; the first problem named, by transformers' name."""
    where, headers = source.directory, source.headers
    declared = DTYPE_NAMES.get(source.config.get("torch_dtype") or source.config.get("dtype"))
    allowed = {declared, "F32"} if declared else set(FLOAT_DTYPES)
    for name, tensor in expected.items():
        header = headers.get(name)
        if header is None:
            raise WeightsError(
                f"{where} has no weight '{name}', which the model in its config.json needs; copy it whole"
            )
        if header.shape != tuple(tensor.shape):
            raise WeightsError(
                f"{where}: weight '{name}' has shape {list(header.shape)} but its config.json implies "
                f"{list(tensor.shape)}; the weights and config.json are of different models"
            )
        if header.dtype not in allowed:
            says = (
                f"config.json says {source.config.get('torch_dtype') or source.config.get('dtype')}"
                if declared
                else ("a model needs floating-point weights")
            )
            raise WeightsError(
                f"{where}: weight '{name}' is {header.dtype}, but {says}; give the checkpoint's own weights"
            )
    extra = [name for name in headers if name not in expected and not DERIVED.fullmatch(name)]
    if extra:
        raise WeightsError(
            f"{where} has weight '{extra[0]}', which the model in its config.json does not; the weights and "
            "config.json are of different models"
        )


def read_directory(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], int]:
    """(torchrig state dict on the CPU, config tree, step) of a Hugging Face directory."""
    source = open_directory(directory)
    expected = expected_weights(source)
    check_headers(source, expected)
    stored = sum(math.prod(source.headers[name].shape) * DTYPE_BYTES[source.headers[name].dtype] for name in expected)
    check_fits(stored, torch.device("cpu"), f"reading {directory}'s weights", "read them on a host with more memory")
    weights = read_tensors(directory, source.headers, list(expected))
    return source.spec.hf.from_state(source.model, weights), source.tree(), source.step


def write_directory(
    folder: Path,
    model: ModelConfig,
    state: dict[str, torch.Tensor],
    tokenizer: tokenizer_files.TokenizerFiles,
    provenance: dict[str, Any],
    dtype: torch.dtype,
    max_shard: int,
) -> list[str]:
    """Write a Hugging Face directory of `model` with torchrig's `state` into folder; the file names written."""
    spec = _spec_of(model)
    names = write_weights(spec.hf.to_state(model, state), folder, max_shard)
    config = {**spec.hf.to_config(model), **tokenizer.ids, "torch_dtype": str(dtype).removeprefix("torch.")}
    write_json(folder / CONFIG, config)
    tokenizer_files.write(tokenizer, folder)
    training = {key: getattr(model, key) for key in spec.hf.training_keys}
    write_json(folder / PROVENANCE, {"format": PROVENANCE_FORMAT, **provenance, "model": training})
    return sorted([*names, CONFIG, PROVENANCE, *tokenizer.files])


def _spec_of(model: ModelConfig) -> ModelSpec:
    spec = registered()[model.arch]
    if spec.hf is None:
        raise WeightsError(f"model.arch={model.arch} has no Hugging Face mapping")
    return spec
