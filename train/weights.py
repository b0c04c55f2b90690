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

import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from env.common.readfile import ReadRefused, read_json
from train import lora
from train.checkpoint import Checkpointer, CheckpointError, EveryCheckpointDamaged, read_model
from train.checkpoint.parts import in_model_layout
from train.config import LoRAConfig, ModelConfig, RunConfig, TrainConfig
from train.config_loader import config_from_dict, validate_model
from train.data.sources import data_tokenizer_id, path_tokenizer, token_file_tokenizer
from train.data.tokens import BYTE_VOCAB
from train.errors import ConfigError, DataError
from train.hf.directory import is_hf_directory, open_directory, read_directory
from train.hf.files import WeightsError, check_fits
from train.hf.tokenizer_files import check_special_tokens, is_byte_tokenizer
from train.memory_bound import check_need, reading_need
from train.models import build_model, count_params, get_spec
from train.tokenizer import ANY, BYTES, UNKNOWN, TokenizerId, tokenizer_id

EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.json"
TOKENIZER_FILE = "tokenizer.json"
EXPORT_FORMAT = 1  # the previous release's export (train/hf/directory.py's torchrig.json is format 2)
# The floating dtypes a weight may have when read: those an export writes, and float16. Others (float8,
# float64) would be cast silently, or fail inside torch (torch.isfinite has no float8 kernel).
LOADED_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
# An export's config.json is a few kilobytes (a Hugging Face one a few more); far above that is not one.
CONFIG_LIMIT = 4 * 2**20


class DamagedCheckpoints(WeightsError):
    """Every committed checkpoint of a run failed its checks (not one pruned while read: train/checkpoint/).

    A reader's words: a training run's refusal (train over the records?) says nothing to one who reads."""

    def __init__(self, directory: str, damaged: list[str]) -> None:
        self.directory, self.damaged = directory, damaged
        super().__init__(
            f"every checkpoint in {directory} is damaged ({', '.join(damaged)}; the warnings above say how); "
            "nothing to read: restore them from a copy"
        )


def load_model_weights(
    path: Path | str, samples: int | None = 0, seq_len: int | None = 0, on_gpu: bool = False, adapters: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, Any], int]:
    """(model state dict on the CPU, config tree, training step) from any of SOURCES.

    A LoRA run's checkpoint holds the frozen base and the adapters (train/lora.py): by default they come merged,
    each adapted weight W + alpha / r * B A, the plain model's weights computing what base and adapter compute;
    `adapters=True` gives them as held (`...wq.weight` beside `...wq.lora_A` and `...wq.lora_B`).

    Before anything is built or read, the model its config describes is checked against the memory
    available (train/memory_bound.py), with the forwards the caller will run at once: `samples`
    sequences (None: the saved train.micro_batch) of seq_len tokens (None: the saved data.seq_len;
    0: the model's longest), or images.
    """
    path = Path(path)

    def fits(config: dict[str, Any]) -> None:
        check_reading(config, path, samples, seq_len, on_gpu)

    state, config, step = weights_source(path).weights(path, fits)
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


def _checkpoint_config(run_dir: Path) -> dict[str, Any]:

    try:
        newest = Checkpointer(run_dir, {}, keep=1, rank=0, world_size=1, strategy=None).newest_header()
    except EveryCheckpointDamaged as exc:
        raise DamagedCheckpoints(exc.directory, exc.damaged) from None
    if newest is None:
        raise _no_checkpoint(run_dir)
    saved = newest[1].get("config")
    return {k: v for k, v in saved.items() if k != "world_size"} if isinstance(saved, dict) else {}


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
        cfg = model_config(config, run_dir)
        model = build_model(cfg)
        lora.apply(model, RunConfig(model=cfg, train=replace(TrainConfig(), lora=lora_config(config))))  # LoRA's run
        return model

    try:
        found = read_model(run_dir, build)
    except EveryCheckpointDamaged as exc:
        raise DamagedCheckpoints(exc.directory, exc.damaged) from None
    except CheckpointError as exc:
        raise WeightsError(str(exc)) from None
    if found is None:
        raise _no_checkpoint(run_dir)
    model, config, step = found
    return dict(model.state_dict()), config, int(step)  # config["world_size"]: make eval's training figure


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
    # (path, fits) -> (state dict, config tree, step); fits(config tree) is called before any weight is read
    weights: Callable[[Path, Callable[[dict[str, Any]], None]], tuple[dict[str, torch.Tensor], dict[str, Any], int]]
    config: Callable[[Path], dict[str, Any]]


def _hf_config(path: Path) -> dict[str, Any]:
    return open_directory(path).tree()


def _hf_weights(
    path: Path, fits: Callable[[dict[str, Any]], None]
) -> tuple[dict[str, torch.Tensor], dict[str, Any], int]:
    fits(_hf_config(path))
    return read_directory(path)


SOURCES = (
    WeightsSource("Hugging Face directory", is_hf_directory, _hf_weights, _hf_config),
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
    tokens checked), else the one beside the run's token file that its sidecar records (data/x.bin ->
    data/x.tokenizer.json, sha256 checked). None: none found."""
    path = Path(path)
    if os.path.lexists(path / TOKENIZER_FILE):
        check_special_tokens(path)
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
    if found is not None and is_byte_tokenizer(found):
        return BYTES, None  # an export of a run on bytes writes byte_tokenizer's vocabulary for transformers
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
