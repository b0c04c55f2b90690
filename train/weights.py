"""Model weights out of a run, and into a new one: the seam between checkpoints and their users.

`load_model_weights(path) -> (state_dict, config, step)` is the one way sampling, export and
fine-tuning (`train.init_from`) read weights. `path` is either

- a run directory: its newest valid checkpoint (a DDP file or an FSDP DCP directory), verified
  against its sidecar's sha256 as training's resume does; a damaged one is reported and the one
  before is used; or
- an export directory (train/export.py): `model.safetensors` and `config.json`.

`config` is a RunConfig.to_dict()-shaped tree holding at least "model". Everything read is data:
safetensors holds only tensors, checkpoints load with weights_only=True, and the DCP metadata
passes train.checkpoint's allow-list before DCP reads the shards.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from env.common.readfile import ReadRefused, read_json
from train.checkpoint import Checkpointer, CheckpointError, EveryCheckpointDamaged, read_model
from train.config import ModelConfig, RunConfig
from train.config_loader import config_from_dict, validate_model
from train.data.sources import data_tokenizer_id, path_tokenizer, token_file_tokenizer
from train.data.tokens import BYTE_VOCAB
from train.errors import ConfigError, DataError
from train.memory_bound import check_need, reading_need
from train.models import build_model, get_spec
from train.tokenizer import ANY, BYTES, UNKNOWN, TokenizerId, tokenizer_id

EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.json"
TOKENIZER_FILE = "tokenizer.json"
EXPORT_FORMAT = 1
# The floating dtypes a weight may have when read: those an export writes, and float16. Others (float8,
# float64) would be cast silently, or fail inside torch (torch.isfinite has no float8 kernel).
LOADED_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
# An export's config.json is a few kilobytes (a Hugging Face one a few more); far above that is not one.
CONFIG_LIMIT = 4 * 2**20


class WeightsError(ConfigError):
    """Weights cannot be found, read or used; one line with the fix. A ConfigError too, so the
    training worker reports it as one (train.init_from)."""


class DamagedCheckpoints(WeightsError):
    """Every committed checkpoint of a run failed its checks (not one pruned while read: train/checkpoint/).

    A reader's words: a training run's refusal (train over the records?) says nothing to one who reads."""

    def __init__(self, directory: str, damaged: list[str]) -> None:
        self.directory, self.damaged = directory, damaged
        super().__init__(
            f"every checkpoint in {directory} is damaged ({', '.join(damaged)}; the warnings above say how); "
            "nothing to read: restore them from a copy"
        )


def _is_export(path: Path) -> bool:
    """True for an export directory, False for a run directory; WeightsError for anything else."""
    if (path / EXPORT_WEIGHTS).is_file():
        return True
    if not path.is_dir():
        raise WeightsError(f"{path} is not a directory; give a run directory (RUN_DIR) or an export directory")
    return False


def load_model_weights(
    path: Path | str, samples: int | None = 0, seq_len: int | None = 0, on_gpu: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, Any], int]:
    """(model state dict on the CPU, config tree, training step) from a run or an export directory.

    Before anything is built or read, the model its config describes is checked against the memory
    available (train/memory_bound.py), with the forwards the caller will run at once: `samples`
    sequences (None: the saved train.micro_batch) of seq_len tokens (None: the saved data.seq_len;
    0: the model's longest), or images.
    """
    path = Path(path)

    def fits(config: dict[str, Any]) -> None:
        check_reading(config, path, samples, seq_len, on_gpu)

    return read_export(path, fits) if _is_export(path) else _checkpoint_weights(path, fits)


def check_reading(config: dict[str, Any], where: Path, samples: int | None, seq_len: int | None, on_gpu: bool) -> None:
    """Refuse a model that reading (and running the forwards load_model_weights describes) cannot fit."""
    cfg = model_config(config, where)
    saved = {name: config.get(name) if isinstance(config.get(name), dict) else {} for name in ("data", "train")}
    limit = get_spec(cfg.arch).seq_len_limit
    longest = getattr(cfg, limit) if limit else 1
    if seq_len is None:
        seq_len = saved["data"].get("seq_len") if isinstance(saved["data"].get("seq_len"), int) else 0
    if samples is None:
        samples = saved["train"].get("micro_batch") if isinstance(saved["train"].get("micro_batch"), int) else 1
    need = reading_need(cfg, min(seq_len or longest, longest), max(0, samples), on_gpu)
    try:
        check_need(
            need, f"the model of {where} (model.arch={cfg.arch})", "use a machine with more memory", on_gpu=on_gpu
        )
    except ConfigError as exc:
        raise WeightsError(str(exc)) from None


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


def build_loaded_model(
    path: Path | str, device: torch.device, samples: int | None = 1, seq_len: int | None = 0
) -> tuple[nn.Module, dict[str, Any], int]:
    """A model from load_model_weights(path) in eval mode on `device`: (model, config tree, step).

    samples, seq_len: the forwards the caller runs at once (load_model_weights; eval: its micro-batch of
    the run's sequences; sample: one sequence of up to the model's max_seq_len), for the memory bound.
    """

    state, config, step = load_model_weights(path, samples, seq_len, device.type == "cuda")
    cfg = model_config(config, path)
    with torch.device("meta"):
        model = build_model(cfg)
    check_weights(model.state_dict(), state, str(path))  # shapes first, on the meta model: nothing allocated yet
    model = model.to_empty(device=device)
    if hasattr(model, "init_weights"):
        model.init_weights()  # fills the derived buffers (RoPE tables), which no state dict holds
    model.load_state_dict(state)
    return model.eval(), config, step


def load_checked(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """load_state_dict, with a mismatch named by its first key in the model's order (one line)."""
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
        if state[key].is_floating_point() != tensor.is_floating_point() or (
            not tensor.is_floating_point() and state[key].dtype != tensor.dtype
        ):
            raise WeightsError(f"{where}: weight '{key}' is {state[key].dtype}, not {tensor.dtype}; export it again")
        if state[key].is_floating_point() and state[key].dtype not in LOADED_FLOATS:
            kinds = ", ".join(str(kind).removeprefix("torch.") for kind in LOADED_FLOATS)
            raise WeightsError(
                f"{where}: weight '{key}' is {str(state[key].dtype).removeprefix('torch.')}, which torchrig does not "
                f"load (it loads {kinds}); export it as fp32 or bf16 (DTYPE=fp32|bf16)"
            )
        if state[key].is_floating_point() and not bool(torch.isfinite(state[key]).all()):
            raise WeightsError(f"{where}: weight '{key}' holds NaN or inf; use an earlier checkpoint or export")
    extra = [key for key in state if key not in expected]
    if extra:
        raise WeightsError(f"{where} has weight '{extra[0]}', which this model config lacks; use a matching config")


# ---------------------------------------------------------------------------------------------
# Exports


def _export_config(directory: Path) -> dict[str, Any]:
    """An export's config.json (through the one bounded reader), its model section checked; the weights are not read."""
    try:
        config = read_json(directory / EXPORT_CONFIG, CONFIG_LIMIT)
    except ReadRefused as exc:
        if exc.missing:
            raise WeightsError(f"{directory} has {EXPORT_WEIGHTS} but no {EXPORT_CONFIG}; export it again") from None
        raise WeightsError(f"{directory / EXPORT_CONFIG} {exc.reason}; export it again") from None
    if not isinstance(config, dict):
        raise WeightsError(f"{directory / EXPORT_CONFIG} holds no JSON object; export it again")
    model_config(config, directory / EXPORT_CONFIG)
    return config


def read_export(
    directory: Path, fits: Callable[[dict[str, Any]], None] = lambda config: None
) -> tuple[dict[str, torch.Tensor], dict[str, Any], int]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config = _export_config(directory)
    fits(config)
    try:
        state = load_file(directory / EXPORT_WEIGHTS, device="cpu")
    except (SafetensorError, OSError, ValueError, TypeError) as exc:  # TypeError: a dtype this torch lacks
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise WeightsError(
            f"{directory / EXPORT_WEIGHTS} is not a safetensors file ({reason}); export it again"
        ) from None
    step = config.get("export", {}).get("step", 0) if isinstance(config.get("export"), dict) else 0
    return state, config, int(step) if isinstance(step, int) else 0


# ---------------------------------------------------------------------------------------------
# Checkpoints (train/checkpoint/: any strategy, any world size, read in this one process)


def saved_config(path: Path | str) -> dict[str, Any]:
    """The config tree of an export (config.json) or of a run's newest usable checkpoint, without its weights."""
    path = Path(path)
    return _export_config(path) if _is_export(path) else _checkpoint_config(path)


def _checkpoint_config(run_dir: Path) -> dict[str, Any]:

    try:
        newest = Checkpointer(run_dir, {}, keep=1, rank=0, world_size=1, strategy=None).newest_header()
    except EveryCheckpointDamaged as exc:
        raise DamagedCheckpoints(exc.directory, exc.damaged) from None
    if newest is None:
        raise _no_checkpoint(run_dir)
    saved = newest[1].get("config")
    return saved if isinstance(saved, dict) else {}


def _no_checkpoint(run_dir: Path) -> WeightsError:
    return WeightsError(
        f"{run_dir} has no usable checkpoint (none was written yet); train it "
        f"(make train RUN_DIR={shlex.quote(str(run_dir))}), or give another run or an export"
    )


def _checkpoint_weights(
    run_dir: Path, fits: Callable[[dict[str, Any]], None] = lambda config: None
) -> tuple[dict[str, torch.Tensor], dict[str, Any], int]:
    def build(config: dict[str, Any]) -> nn.Module:
        fits(config)  # before a module is built
        return build_model(model_config(config, run_dir))

    try:
        found = read_model(run_dir, build)
    except EveryCheckpointDamaged as exc:
        raise DamagedCheckpoints(exc.directory, exc.damaged) from None
    except CheckpointError as exc:
        raise WeightsError(str(exc)) from None
    if found is None:
        raise _no_checkpoint(run_dir)
    model, config, step = found
    return dict(model.state_dict()), config, int(step)


# ---------------------------------------------------------------------------------------------
# Tokenizers


def find_tokenizer(path: Path | str, config: dict[str, Any]) -> Path | None:
    """The tokenizer.json of a run or export: in the directory itself, else the one beside the run's token
    file that its sidecar records (data/x.bin -> data/x.tokenizer.json, sha256 checked). None: none found."""
    path = Path(path)
    if os.path.lexists(path / TOKENIZER_FILE):
        return path / TOKENIZER_FILE  # whatever it is: its reader refuses what is not a tokenizer file
    data_path = _data_path(config)
    if data_path.endswith(".bin"):
        try:
            return token_file_tokenizer(data_path)
        except DataError:
            return None  # the training data moved or changed since: it tells nothing of these weights
    return None


def _data_path(config: dict[str, Any]) -> str:
    data = config.get("data")
    return str(data.get("path", "")) if isinstance(data, dict) else ""


def model_tokenizer(path: Path | str, config: dict[str, Any]) -> tuple[TokenizerId, Path | None]:
    """What the ids of a run's or export's weights mean, and the tokenizer.json to read them with (None: none here).

    A tokenizer.json in the directory (or beside the run's token file) says it; else the run's data
    does (the corpus and text are bytes, a token file's sidecar records its tokenizer even when the
    file is gone), else a vocabulary of at most 256 is bytes; anything else is unknown.
    """
    found = find_tokenizer(path, config)
    if found is not None:
        return tokenizer_id(found), found
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    source, data_path = data.get("source"), _data_path(config)
    if source == "corpus" or (source == "files" and data_path and not data_path.endswith(".bin")):
        return BYTES, None
    if source == "synthetic":
        return ANY, None
    if data_path.endswith(".bin"):
        try:
            recorded = path_tokenizer(data_path)
        except DataError:
            recorded = UNKNOWN
        if recorded.kind != "unknown":
            return recorded, None
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    vocab = model.get("vocab_size")
    return (BYTES if isinstance(vocab, int) and vocab <= BYTE_VOCAB else UNKNOWN), None


# ---------------------------------------------------------------------------------------------
# Fine-tuning: train.init_from


def init_from(model: nn.Module, cfg: RunConfig, run_dir: Path) -> int | None:
    """Load train.init_from's weights into a freshly built `model` (before wrapping); the step they
    came from, or None when init_from is unset or the run resumes from its own checkpoint."""
    source = cfg.train.init_from
    if not source:
        return None

    if Checkpointer(run_dir, {}, keep=1, rank=0, world_size=1, strategy=None).latest_step() is not None:
        return None  # resuming: the run's own checkpoint holds newer weights
    try:
        state, config, step = load_model_weights(source)
    except WeightsError as exc:
        raise WeightsError(f"train.init_from={source}: {exc}") from None
    theirs, mine = model_tokenizer(source, config)[0], data_tokenizer_id(cfg)
    if theirs.conflicts(mine):
        raise WeightsError(
            f"train.init_from={source} was trained on ids of {theirs.describe()}, but this run's data is "
            f"{mine.describe()}: its embeddings would read other text; prepare the data with its tokenizer "
            f"(make prepare TOKENIZER={shlex.quote(str(Path(source) / TOKENIZER_FILE))}) or start without init_from"
        )
    device = next(model.parameters()).device
    with torch.no_grad():
        load_checked(model, {k: v.to(device) for k, v in state.items()}, f"train.init_from={source}")
    return step
