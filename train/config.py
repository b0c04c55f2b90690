"""Typed run configuration: YAML files under train/configs/ read into dataclasses.

A config file has up to three sections, `model`, `data` and `train`. `data` and `train` match
the dataclasses below; `model` is the config class of the model that `model.arch` names (its
registry spec's, train/models/). `key=value` overrides address any field by its dotted name
(`train.lr=3e-4`). Unknown keys are errors that name the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from env.common.cli import UserError, plain_name

CONFIG_DIR = Path(__file__).parent / "configs"
# What a config file may hold: ours are a few hundred bytes, three levels and a few dozen values.
# Bounded before anything is built, so YAML aliases that expand to gigabytes (billion laughs),
# deep nesting or a huge file are one line instead of a hang.
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_DEPTH = 8
MAX_CONFIG_NODES = 10_000
# model.vocab_size=auto is stored as this until train.data.resolve_data takes the size from the data.
VOCAB_AUTO = 0


class ConfigError(UserError):
    """A user-caused configuration problem; its message is one line with the fix."""


# The model a config without model.arch trains.
DEFAULT_ARCH = "deepseek"


@dataclass
class ModelConfig:
    """The `model:` section: `arch` names a registered model (train/models), whose spec's config class,
    a subclass of this one, holds the rest (DeepSeekConfig in train/models/deepseek.py, ResNetConfig in
    train/models/resnet.py, or your own).
    """

    arch: str = DEFAULT_ARCH


def model_config_for(arch: str) -> ModelConfig:
    """The defaults of model.arch=arch: its spec's config class, or a ConfigError naming the closest model."""
    from train.models import get_spec  # the registry imports this module

    return get_spec(arch).new_config()


def _default_model() -> ModelConfig:
    return model_config_for(DEFAULT_ARCH)


@dataclass
class DataConfig:
    # "corpus": the built-in byte corpus; "synthetic": random tokens or images;
    # "files": the user's text or prepared token files; "images": an ImageFolder tree.
    source: str = "corpus"
    path: str = ""
    seq_len: int = 256
    num_workers: int = 0
    pin_memory: bool = True
    # Share of the samples held out for validation (train/data.py: the tail of a token source);
    # never trained on, whatever the seed or world size. 0 holds none out (and turns evaluation off).
    val_fraction: float = 0.05
    # A separate validation set (a text glob or token file, like data.path); then all of data.path trains.
    val_path: str = ""


@dataclass
class TrainConfig:
    steps: int = 200
    micro_batch: int = 8
    accum: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 20
    # Steps over which the cosine decays to min_lr; 0 means train.steps. Set it to stop a run
    # early on the schedule of a longer one (resuming later continues exactly).
    lr_decay_steps: int = 0
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # "auto" picks bf16 where supported on GPU, else fp32.
    precision: str = "auto"
    strategy: str = "ddp"
    # DDP gradient compression on the wire: "none", "bf16" or "fp16".
    grad_compression: str = "none"
    bucket_cap_mb: int = 25
    tf32: bool = True
    compile: bool = False
    # torch.compile's backend: "inductor" generates fused kernels; "aot_eager" traces and runs the same
    # forward and backward graphs without generating code (cheap: for tests and for debugging a compile).
    compile_backend: str = "inductor"
    seed: int = 1337
    log_every: int = 10
    ckpt_every: int = 100
    keep_ckpts: int = 3
    # Collective timeouts: the first collective fails fast, later ones get longer.
    first_timeout_s: float = 60.0
    timeout_s: float = 600.0
    tensorboard: bool = False
    # Validation every this many steps, and at the last step (0 turns it off): val_loss in metrics.jsonl,
    # the console, TensorBoard and summary.json. It never changes the training figures.
    eval_every: int = 100
    # Batches of world_size x micro_batch validation samples per evaluation; 0 means the whole split.
    eval_batches: int = 20
    # Fine-tuning: start from the weights of an export directory (make export) or of a run
    # directory's newest valid checkpoint, with a fresh optimizer and schedule. The model config
    # must match (the first differing weight is named). Ignored when this run resumes from its
    # own checkpoint.
    init_from: str = ""


@dataclass
class RunConfig:
    name: str = "tiny"
    model: ModelConfig = field(default_factory=_default_model)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CHOICES: dict[str, tuple[str, ...]] = {
    "data.source": ("corpus", "synthetic", "files", "images"),
    "train.precision": ("auto", "bf16", "fp16", "fp32"),
    "train.strategy": ("ddp", "fsdp"),
    "train.compile_backend": ("inductor", "aot_eager"),
    "train.grad_compression": ("none", "bf16", "fp16"),
}


def available_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _closest(key: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else f"; valid keys: {', '.join(valid)}"


BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def _coerce(dotted: str, raw: Any, target_type: type) -> Any:
    """Convert a YAML or command-line value to the field's type, or raise ConfigError."""
    invalid = ConfigError(f"{dotted}={raw!r} is not a valid {target_type.__name__}; fix the value")
    if target_type is str:
        if isinstance(raw, (dict, list)):
            raise invalid
        return str(raw)
    if isinstance(raw, str):  # from the command line, or YAML 1.1 scalars such as 3e-4
        text = raw.strip().lower()
        if not text.isascii():  # int() and float() also take Arabic-Indic, fullwidth and other Unicode digits
            raise invalid
        if target_type is bool:
            if text not in BOOL_WORDS:
                raise invalid
            return BOOL_WORDS[text]
        try:
            raw = float(text) if target_type is float or "." in text or "e" in text else int(text)
        except ValueError:
            raise invalid from None
    if target_type is bool and isinstance(raw, bool):
        return raw
    if target_type is int and not isinstance(raw, bool):
        if isinstance(raw, int):
            return raw
        if isinstance(raw, float) and raw.is_integer():
            return int(raw)
    if target_type is float and isinstance(raw, (int, float)) and not isinstance(raw, bool):
        if not math.isfinite(raw):
            raise ConfigError(f"{dotted}={raw!r} is not a finite number; give a figure such as 3e-4")
        return float(raw)
    raise invalid


@functools.cache
def _section_types(section_class: type) -> dict[str, type]:
    # Resolving the annotations is the slow part of _set; a section class's types never change.
    hints = typing.get_type_hints(section_class)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_class)}


def _field_types(section: Any) -> dict[str, type]:
    return _section_types(type(section))


def _unknown_key(cfg: RunConfig, dotted: str, sections: list[str]) -> ConfigError:
    all_keys = [f"{s}.{k}" for s in sections for k in _field_types(getattr(cfg, s))] + ["name"]
    if not dotted.startswith("model."):
        return ConfigError(f"unknown config key '{dotted}'{_closest(dotted, all_keys)}")
    from train.models import registered

    owners = [name for name, spec in registered().items() if dotted[6:] in _section_types(spec.config)]
    hint = f"; it is a key of model.arch={' or '.join(owners)}" if owners else _closest(dotted, all_keys)
    return ConfigError(f"unknown config key '{dotted}' (model.arch={cfg.model.arch} has no such key){hint}")


def _set(cfg: RunConfig, dotted: str, raw: Any) -> None:
    parts = dotted.split(".")
    sections = [f.name for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))]
    if dotted == "name":
        cfg.name = plain_name(str(raw), "name")  # it names the run's directory under runs/
        return
    if dotted == "model.arch":
        arch = _coerce(dotted, raw, str)
        if arch != cfg.model.arch:
            cfg.model = model_config_for(arch)  # that model's defaults: the keys below it are its own
        return
    if dotted == "model.vocab_size" and str(raw).strip().lower() == "auto":
        raw = VOCAB_AUTO
    if len(parts) != 2 or parts[0] not in sections:
        raise _unknown_key(cfg, dotted, sections)
    section = getattr(cfg, parts[0])
    types = _field_types(section)
    if parts[1] not in types:
        raise _unknown_key(cfg, dotted, sections)
    value = _coerce(dotted, raw, types[parts[1]])
    allowed = CHOICES.get(dotted)
    if allowed and value not in allowed:
        raise ConfigError(f"{dotted}={value!r} is not one of {', '.join(allowed)}")
    setattr(section, parts[1], value)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: a config tree as its dotted keys."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


class _ConfigLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (YAML would keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key == "<<":
                continue
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"key '{key}' is given twice (lines {seen[key]} and {line}); keep one")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _check_size(tree: Any, path: Path) -> None:
    """Count the values the tree holds, with aliases expanded, stopping at the bound (never building them)."""
    nodes, level, depth = 0, [tree], 0
    while level:
        depth += 1
        nodes += len(level)
        if depth > MAX_CONFIG_DEPTH or nodes > MAX_CONFIG_NODES:
            raise ConfigError(
                f"{path}: more than {MAX_CONFIG_DEPTH} levels or {MAX_CONFIG_NODES} values once its aliases are "
                "expanded; a config is sections of key: value"
            )
        level = [
            child
            for value in level
            if isinstance(value, (dict, list))
            for child in (value.values() if isinstance(value, dict) else value)
        ]


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: over {MAX_CONFIG_BYTES >> 20} MiB, not a config; give a small YAML file")
        text = path.read_bytes().decode("utf-8")
        tree = yaml.load(text, Loader=_ConfigLoader) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read {path} ({exc.strerror}); check the path and its permissions") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; save the config as UTF-8") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply; a config is sections of key: value") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]}); fix the file") from None
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (model, data, train)")
    _check_size(tree, path)
    return tree


def resolve_config_path(name: str) -> Path:
    """A config is a name under train/configs/ or a path to a YAML file."""
    as_path = Path(name)
    if as_path.suffix in (".yaml", ".yml") and as_path.is_file():
        return as_path
    candidate = CONFIG_DIR / f"{name}.yaml"
    if candidate.is_file():
        return candidate
    raise ConfigError(
        f"no config named '{name}'; available: {', '.join(available_configs())} (or a path to a .yaml file)"
    )


def _apply(cfg: RunConfig, flat: dict[str, Any]) -> None:
    """Set dotted keys, model.arch first: it picks the config class the other model.* keys belong to."""
    if "model.arch" in flat:
        _set(cfg, "model.arch", flat["model.arch"])
    for dotted, value in flat.items():
        if dotted != "model.arch":
            _set(cfg, dotted, value)


def load_config(name: str, overrides: list[str] | dict[str, Any] | None = None) -> RunConfig:
    """Read a named config (or a YAML path) and apply `key=value` overrides on top.

    An override that names another model.arch than the file's starts from that model's defaults: the
    file's model section describes its own model (its data and train sections still apply).
    """
    path = resolve_config_path(name)
    cfg = RunConfig(name=path.stem)
    from_file = flatten(_read_yaml(path))
    given = parse_overrides(overrides)
    if "model.arch" in given and str(given["model.arch"]) != str(from_file.get("model.arch", DEFAULT_ARCH)):
        from_file = {key: value for key, value in from_file.items() if not key.startswith("model.")}
    _apply(cfg, from_file)
    _apply(cfg, given)
    from train.data import resolve_data  # the data decides vocab_size=auto and a source inferred from a path

    resolve_data(cfg, source_given="data.source" in given)
    validate(cfg)
    return cfg


def parse_overrides(overrides: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    if overrides is None:
        return {}
    if isinstance(overrides, dict):
        return dict(overrides)
    parsed: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not key=value, e.g. train.lr=3e-4")
        parsed[key.strip()] = value.strip()
    return parsed


def config_from_dict(tree: dict[str, Any]) -> RunConfig:
    """Rebuild a RunConfig from RunConfig.to_dict() output (checkpoints, manifests, exports).

    Files saved before each model had its own config class hold every built-in model's fields in
    their model section; the fields of the other models are skipped (any other unknown key is an error).
    """
    cfg = RunConfig(name=str(tree.get("name", "tiny")))
    flat = flatten({k: v for k, v in tree.items() if k != "name"})
    _set(cfg, "model.arch", flat.pop("model.arch", DEFAULT_ARCH))
    own, others = _field_types(cfg.model), _built_in_model_keys()
    legacy = {key for key in flat if key.startswith("model.") and key[6:] not in own and key[6:] in others}
    _apply(cfg, {key: value for key, value in flat.items() if key not in legacy})
    return cfg


def _built_in_model_keys() -> set[str]:
    from train.models import built_in_specs

    return {f.name for spec in built_in_specs().values() for f in dataclasses.fields(spec.config)}


def validate_model(m: ModelConfig) -> None:
    """The model's own checks, from its registry spec (build_model runs them too, for a ModelConfig made in code)."""
    from train.models import get_spec  # the registry imports this module

    get_spec(m.arch).validate(m)


def require_positive(values: dict[str, int]) -> None:
    """A ConfigError for the first key whose value is below 1 (keys as the user writes them, e.g. "train.steps")."""
    for key, value in values.items():
        if value < 1:
            raise ConfigError(f"{key}={value} must be at least 1")


def validate(cfg: RunConfig) -> None:
    """Cross-field checks that a single field's type cannot express."""
    m, t = cfg.model, cfg.train
    positive = {
        "train.steps": t.steps,
        "train.micro_batch": t.micro_batch,
        "train.accum": t.accum,
        "data.seq_len": cfg.data.seq_len,
        "train.log_every": t.log_every,
        "train.ckpt_every": t.ckpt_every,
        "train.keep_ckpts": t.keep_ckpts,
    }
    require_positive(positive)
    # A collective timeout of 0 s fails the first collective and blames whichever rank is slowest.
    for key, value in {"train.first_timeout_s": t.first_timeout_s, "train.timeout_s": t.timeout_s}.items():
        if value <= 0:
            raise ConfigError(f"{key}={value} must be more than 0 seconds, e.g. 60")
    for key, value in {"train.eval_every": t.eval_every, "train.eval_batches": t.eval_batches}.items():
        if value < 0:
            raise ConfigError(f"{key}={value} must be 0 or more")
    if not 0 <= cfg.data.val_fraction < 1:
        raise ConfigError(f"data.val_fraction={cfg.data.val_fraction} must be at least 0 and below 1, e.g. 0.05")
    validate_model(m)
    from train.models import get_spec

    limit = get_spec(m.arch).seq_len_limit
    if limit and cfg.data.seq_len > getattr(m, limit):
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} exceeds model.{limit}={getattr(m, limit)}; lower one or raise the other"
        )
    if cfg.data.source == "files" and not cfg.data.path:
        raise ConfigError('data.source=files needs data.path, e.g. ARGS="data.path=corpus/*.txt"')
