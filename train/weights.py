"""Model weights out of a run, and into a new one: the seam between checkpoints and their users.

`load_model_weights(path) -> (state_dict, config, step)` is the one way sampling, evaluation, export and
fine-tuning (`train.init_from`) read weights. `path` is one of SOURCES, told apart in this order:

- a Hugging Face model directory (train/hf/): config.json with a model_type, safetensors single or
  sharded: torchrig's own exports (make export) and checkpoints saved by transformers alike;
- an export of the previous release (config.json {"model": ..., "export": ...} and model.safetensors);
- a run directory: its newest valid checkpoint (a DDP file or an FSDP DCP directory), verified
  against its sidecar's sha256 as training's resume does; a damaged one is reported and the one
  before is used.

`config` is a RunConfig.to_dict()-shaped tree holding at least "model". Everything read is data:
safetensors holds only tensors, checkpoints load with weights_only=True, the DCP metadata passes
train.checkpoint's allow-list before DCP reads the shards, and no code of a checkpoint ever runs.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from train import lora
from train.checkpoint import Checkpointer, CheckpointError, load_model
from train.checkpoint.parts import in_model_layout
from train.config import LoRAConfig, ModelConfig, RunConfig, TrainConfig
from train.config_loader import config_from_dict, validate_model
from train.errors import ConfigError
from train.hf.directory import is_hf_directory, open_directory, read_directory
from train.hf.files import WeightsError, check_fits, read_json
from train.hf.tokenizer_files import check_special_tokens
from train.models import build_model, count_params

EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.json"
TOKENIZER_FILE = "tokenizer.json"
EXPORT_FORMAT = 1  # the previous release's export (train/hf/directory.py's torchrig.json is format 2)


def load_model_weights(path: Path | str, adapters: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any], int]:
    """(model state dict on the CPU, config tree, training step) from any of SOURCES.

    A LoRA run's checkpoint holds the frozen base and the adapters (train/lora.py): by default they come merged,
    each adapted weight W + alpha / r * B A, the plain model's weights computing what base and adapter compute;
    `adapters=True` gives them as held (`...wq.weight` beside `...wq.lora_A` and `...wq.lora_B`)."""
    path = Path(path)
    state, config, step = weights_source(path).weights(path)
    if not adapters and any(lora.is_adapter_key(key) for key in state):
        state = lora.merged(state, lora_config(config))
    return state, config, step


def lora_config(config: dict[str, Any]) -> LoRAConfig:
    """train.lora of a saved config tree (the default, LoRA off, when it has none)."""
    train = config.get("train") if isinstance(config, dict) else None
    return config_from_dict({"train": {"lora": train.get("lora") or {}}}).train.lora if train else LoRAConfig()


def saved_config(path: Path | str) -> dict[str, Any]:
    """The config tree of any of SOURCES (an HF directory's model from its config.json), without its weights."""
    path = Path(path)
    return weights_source(path).config(path)


def model_config(config: dict[str, Any], where: Path | str) -> ModelConfig:
    """The ModelConfig of a config tree read from disk, type-checked field by field."""
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, dict):
        raise WeightsError(f"{where} holds no model config; re-export it or use the run directory")
    try:
        cfg = config_from_dict({"model": model}).model
        validate_model(cfg)
    except ConfigError as exc:
        raise WeightsError(f"{where}: its model config is not valid ({exc})") from None
    return cfg


def build_loaded_model(path: Path | str, device: torch.device) -> tuple[nn.Module, dict[str, Any], int]:
    """A model from load_model_weights(path) in eval mode on `device`: (model, config tree, step)."""

    state, config, step = load_model_weights(path)
    cfg = model_config(config, path)
    with torch.device("meta"):
        model = build_model(cfg)
    state = in_model_layout(model, state)  # an export written before the model's layout changed
    check_weights(model.state_dict(), state, str(path))  # shapes first, on the meta model: nothing allocated yet
    fits(cfg, device, f"the model of {path}", "sample or evaluate on a device with more memory")
    model = model.to_empty(device=device)
    if hasattr(model, "init_weights"):
        model.init_weights()  # fills the derived buffers (RoPE tables), which no state dict holds
    model.load_state_dict(state)
    return model.eval(), config, step


def fits(cfg: ModelConfig, device: torch.device, what: str, fix: str) -> None:
    """Refuse, before it is allocated, a model whose fp32 parameters exceed what `device` has free."""
    total = count_params(cfg).total
    check_fits(4 * total, device, f"{what} ({total:,} parameters in fp32)", fix)


def load_checked(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """load_state_dict, with a mismatch named by its first key in the model's order (one line)."""
    state = in_model_layout(model, state)  # an export written before the model's layout changed
    check_weights(model.state_dict(), state, where)
    model.load_state_dict(state)


def check_weights(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], where: str) -> None:
    """Every weight the model needs, of its shape and kind (floating or not), finite; the first problem named."""
    for key, tensor in expected.items():
        if key not in state:
            raise WeightsError(f"{where} has no weight '{key}', which this model config needs; use a matching config")
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise WeightsError(
                f"{where}: weight '{key}' has shape {list(state[key].shape)} there but {list(tensor.shape)} in this "
                "model config; use the model config it was trained with"
            )
        if state[key].is_floating_point() != tensor.is_floating_point():
            raise WeightsError(f"{where}: weight '{key}' is {state[key].dtype}, not {tensor.dtype}; export it again")
        if state[key].is_floating_point() and not bool(torch.isfinite(state[key]).all()):
            raise WeightsError(f"{where}: weight '{key}' holds NaN or inf; use an earlier checkpoint or export")
    extra = [key for key in state if key not in expected]
    if extra:
        raise WeightsError(f"{where} has weight '{extra[0]}', which this model config lacks; use a matching config")


# ---------------------------------------------------------------------------------------------
# Exports


def _export_config(directory: Path) -> dict[str, Any]:
    """An export's config.json, its model section checked; the weights are not read."""
    if not (directory / EXPORT_CONFIG).exists():
        raise WeightsError(f"{directory} has {EXPORT_WEIGHTS} but no {EXPORT_CONFIG}; export it again")
    config = read_json(directory / EXPORT_CONFIG, "export it again")
    model_config(config, directory / EXPORT_CONFIG)
    return config


def read_export(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], int]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config = _export_config(directory)
    try:
        state = load_file(directory / EXPORT_WEIGHTS, device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise WeightsError(
            f"{directory / EXPORT_WEIGHTS} is not a safetensors file ({reason}); export it again"
        ) from None
    step = config.get("export", {}).get("step", 0) if isinstance(config.get("export"), dict) else 0
    return state, config, int(step) if isinstance(step, int) else 0


# ---------------------------------------------------------------------------------------------
# Checkpoints (train/checkpoint/: any strategy, any world size, read in this one process)


def _checkpoint_config(run_dir: Path) -> dict[str, Any]:

    newest = Checkpointer(run_dir, {}, keep=1, rank=0, world_size=1, strategy=None).newest_header()
    if newest is None:
        raise WeightsError(
            f"{run_dir} has no usable checkpoint (none was written, or each is damaged: the lines above say which); "
            f"train it (make train RUN_DIR={shlex.quote(str(run_dir))}) or give another run"
        )
    saved = newest[1].get("config")
    return {k: v for k, v in saved.items() if k != "world_size"} if isinstance(saved, dict) else {}


def _checkpoint_weights(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], int]:

    config = _checkpoint_config(run_dir)
    cfg = model_config(config, run_dir)
    fits(cfg, torch.device("cpu"), f"reading {run_dir}'s weights", "read them on a host with more memory")
    model = build_model(cfg)
    lora.apply(model, RunConfig(model=cfg, train=replace(TrainConfig(), lora=lora_config(config))))  # LoRA's run
    try:
        step = load_model(run_dir, model)
    except CheckpointError as exc:
        raise WeightsError(str(exc)) from None
    return dict(model.state_dict()), config, int(step or 0)


# ---------------------------------------------------------------------------------------------
# Which kind of path: the table load_model_weights and saved_config walk


def _is_export(path: Path) -> bool:
    """An export of the previous release: model.safetensors beside a config.json without a model_type."""
    return (path / EXPORT_WEIGHTS).is_file()


def _is_run_dir(path: Path) -> bool:
    if not path.is_dir():
        raise WeightsError(f"{path} is not a directory; give a run directory (RUN_DIR) or an export directory")
    return True


@dataclass(frozen=True)
class WeightsSource:
    """One kind of place weights come from: how to recognise it, read its weights, and read its config alone."""

    name: str
    probe: Callable[[Path], bool]
    weights: Callable[[Path], tuple[dict[str, torch.Tensor], dict[str, Any], int]]
    config: Callable[[Path], dict[str, Any]]


SOURCES = (
    WeightsSource("Hugging Face directory", is_hf_directory, read_directory, lambda path: open_directory(path).tree()),
    WeightsSource("export of the previous release", _is_export, read_export, _export_config),
    WeightsSource("run directory", _is_run_dir, _checkpoint_weights, _checkpoint_config),
)


def weights_source(path: Path | str) -> WeightsSource:
    """Which of SOURCES path is (the first whose probe says so); WeightsError for none."""
    path = Path(path)
    return next(source for source in SOURCES if source.probe(path))


def is_weights_directory(path: Path | str) -> bool:
    """A directory of weights alone (an export or an HF checkpoint), not a training run."""
    return weights_source(path) is not SOURCES[-1]


# ---------------------------------------------------------------------------------------------
# Tokenizers


def find_tokenizer(path: Path | str, config: dict[str, Any]) -> Path | None:
    """The tokenizer.json of a run or export: in the directory itself (its tokenizer_config.json's special
    tokens checked), else beside the run's token file (data/x.bin -> data/x.tokenizer.json, as `make prepare
    TOKENIZER=...` writes it). None: bytes."""
    path = Path(path)
    if (path / TOKENIZER_FILE).is_file():
        check_special_tokens(path)
        return path / TOKENIZER_FILE
    data_path = str(config.get("data", {}).get("path", "")) if isinstance(config.get("data"), dict) else ""
    if data_path.endswith(".bin"):
        beside = Path(data_path).with_suffix(".tokenizer.json")
        if beside.is_file():
            return beside
    return None


# ---------------------------------------------------------------------------------------------
# Fine-tuning: train.init_from


def _resumes(run_dir: Path) -> bool:
    """The run already has a checkpoint of its own."""
    return Checkpointer(run_dir, {}, keep=1, rank=0, world_size=1, strategy=None).latest_step() is not None


def init_source_config(source: str, run_dir: Path | None = None) -> dict[str, Any]:
    """The config tree whose model a run with train.init_from=source builds (config_loader.model_from_source):
    the run's own newest checkpoint's when it resumes (the source may be gone by then), else the source's."""
    if run_dir is not None and _resumes(run_dir):
        return _checkpoint_config(run_dir)
    try:
        return saved_config(source)
    except WeightsError as exc:
        raise WeightsError(f"train.init_from={source}: {exc}") from None


def init_from(model: nn.Module, cfg: RunConfig, run_dir: Path) -> int | None:
    """Load train.init_from's weights into a freshly built `model` (before wrapping); the step they
    came from, or None when init_from is unset or the run resumes from its own checkpoint."""
    source = cfg.train.init_from
    if not source:
        return None
    if _resumes(run_dir):
        return None  # resuming: the run's own checkpoint holds newer weights
    try:
        state, _, step = load_model_weights(source)
    except WeightsError as exc:
        raise WeightsError(f"train.init_from={source}: {exc}") from None
    device = next(model.parameters()).device
    with torch.no_grad():
        load_checked(model, {k: v.to(device) for k, v in state.items()}, f"train.init_from={source}")
    return step
