"""Reading a run's configuration: YAML files, `key=value` overrides, types and bounds, what the data
decides, and the checks across fields; plus the key reference that `make keys` prints.

`load_config(name, overrides)` is the one way in: a named config under train/configs/ (or a YAML path),
then the overrides, each key checked against the schema (train/config.py, and model.arch's config class
from the registry). An unknown key is an error naming the closest valid key, by its name or by what
its docstring says (`train.learning_rate` -> `train.lr`). `config_from_dict` rebuilds a saved config
(checkpoints, manifests, exports), including ones written before a key was renamed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from env.common.cli import plain_name
from env.common.readfile import ReadRefused, read_bounded
from train.config import (
    DEFAULT_ARCH,
    VOCAB_AUTO,
    ModelConfig,
    RunConfig,
    flatten,
)
from train.config_keys import Leaf, closest_key, field_docs, field_types, leaves
from train.data.sources import resolve_data
from train.errors import ConfigError, require_positive
from train.lora import check as check_lora
from train.models import built_in_specs, get_spec, registered
from train.sinks import SINKS

CONFIG_DIR = Path(__file__).parent / "configs"
# What a config file may hold: ours are a few hundred bytes, three levels and a few dozen values.
# Bounded before anything is built, so YAML aliases that expand to gigabytes (billion laughs),
# deep nesting or a huge file are one line instead of a hang.
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_DEPTH = 8
MAX_CONFIG_NODES = 10_000
MAX_SEED = 2**63 - 1
# Keys of configs saved by earlier releases, and what became of them: (new key, how the old value maps).
RENAMED_KEYS: dict[str, tuple[str, Any]] = {
    # train.tensorboard: true became a "tensorboard" entry in train.sinks.
    "train.tensorboard": ("train.sinks", lambda on, sinks: [*sinks, "tensorboard"] if on else sinks),
}
SECTIONS = ("model", "data", "train")


def model_config_for(arch: str) -> ModelConfig:
    """The defaults of model.arch=arch: its spec's config class, or a ConfigError naming the closest model."""
    return get_spec(arch).new_config()


def default_config(name: str = "tiny") -> RunConfig:
    """A RunConfig at every default, the default model's section included."""
    return RunConfig(name=name, model=model_config_for(DEFAULT_ARCH))


def available_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _sections(cfg: RunConfig) -> dict[str, Any]:
    return {name: getattr(cfg, name) for name in SECTIONS}


# ---------------------------------------------------------------------------------------------
# Unknown keys: the closest one, by name or by docstring (train/config_keys.py)


def _keys(cfg: RunConfig) -> dict[str, Leaf]:
    """Every settable key of cfg (model.arch's own model keys), nested sections included."""
    return {key: leaf for name, section in _sections(cfg).items() for key, leaf in leaves(section, f"{name}.").items()}


def _unknown_key(cfg: RunConfig, dotted: str) -> ConfigError:
    candidates = {"name": field_docs(RunConfig).get("name", "")} | {key: leaf.doc for key, leaf in _keys(cfg).items()}
    if dotted in {key.rpartition(".")[0] for key in candidates}:
        example = next(key for key in candidates if key.startswith(f"{dotted}."))
        return ConfigError(f"'{dotted}' is a section, not a key; set its keys, e.g. {example}=...")
    if dotted.startswith("model."):
        owners = [name for name, spec in registered().items() if dotted[6:] in field_types(spec.config)]
        if owners:
            return ConfigError(
                f"unknown config key '{dotted}' (model.arch={cfg.model.arch} has no such key); "
                f"it is a key of model.arch={' or '.join(owners)}"
            )
    match = closest_key(dotted, candidates)
    hint = f"; did you mean '{match}'?" if match else "; `make keys` lists every key"
    where = f" (model.arch={cfg.model.arch} has no such key)" if dotted.startswith("model.") else ""
    return ConfigError(f"unknown config key '{dotted}'{where}{hint}")


# ---------------------------------------------------------------------------------------------
# Values


BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def _coerce(dotted: str, raw: Any, target_type: Any) -> Any:
    """Convert a YAML or command-line value to the field's type, or raise ConfigError."""
    if typing.get_origin(target_type) is typing.Literal:
        allowed = typing.get_args(target_type)
        value = _coerce(dotted, raw, str)
        if value not in allowed:
            raise ConfigError(f"{dotted}={value!r} is not one of {', '.join(allowed)}")
        return value
    if typing.get_origin(target_type) is list:
        items = raw.split(",") if isinstance(raw, str) else raw
        if not isinstance(items, list):
            raise ConfigError(f"{dotted}={raw!r} is not a list; give a comma list, e.g. {dotted}=a,b")
        return [_coerce(dotted, item.strip() if isinstance(item, str) else item, typing.get_args(target_type)[0])
                for item in items if not (isinstance(item, str) and not item.strip())]  # fmt: skip
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


def _set(cfg: RunConfig, dotted: str, raw: Any) -> None:
    if dotted == "name":
        cfg.name = plain_name(str(raw), "name")  # it names the run's directory under runs/
        return
    if dotted == "model.arch":
        arch = _coerce(dotted, raw, str)
        if arch != cfg.model.arch or type(cfg.model) is ModelConfig:
            cfg.model = model_config_for(arch)  # that model's defaults: the keys below it are its own
        return
    if dotted == "model.vocab_size" and str(raw).strip().lower() == "auto":
        raw = VOCAB_AUTO
    leaf = _keys(cfg).get(dotted)
    if leaf is None:
        raise _unknown_key(cfg, dotted)
    setattr(leaf.owner, leaf.name, _coerce(dotted, raw, leaf.kind))


# ---------------------------------------------------------------------------------------------
# Files


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
        text = read_bounded(path, MAX_CONFIG_BYTES).decode("utf-8")
        tree = yaml.load(text, Loader=_ConfigLoader) or {}
    except ReadRefused as exc:
        raise ConfigError(f"the config {path} {exc.reason}; give a small YAML file") from None
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
    if as_path.suffix in (".yaml", ".yml") and os.path.lexists(as_path):
        return as_path  # whatever is there: the bounded reader says in one line why it is not a config
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


def load_config(
    name: str,
    overrides: list[str] | dict[str, Any] | None = None,
    source_config: Callable[[str], dict[str, Any]] | None = None,
) -> RunConfig:
    """Read a named config (or a YAML path) and apply `key=value` overrides on top.

    An override that names another model.arch than the file's starts from that model's defaults: the
    file's model section describes its own model (its data and train sections still apply). With
    train.init_from the model is the source's (model_from_source), read by `source_config(init_from)` ->
    a config tree: the launcher passes train.weights' reader (which knows checkpoints, exports and Hugging
    Face directories, and whether the run resumes from its own checkpoint); without one, the model section
    stays as given.
    """
    path = resolve_config_path(name)
    cfg = default_config(path.stem)
    from_file = flatten(_read_yaml(path))
    given = parse_overrides(overrides)
    if "model.arch" in given and str(given["model.arch"]) != str(from_file.get("model.arch", DEFAULT_ARCH)):
        from_file = {key: value for key, value in from_file.items() if not key.startswith("model.")}
    _apply(cfg, from_file)
    _apply(cfg, given)
    if cfg.train.init_from and source_config is not None:
        model_from_source(cfg, given, source_config(cfg.train.init_from))
    resolve_data(cfg, source_given="data.source" in given)  # vocab_size=auto, and a source inferred from a path
    validate(cfg)
    return cfg


def model_from_source(cfg: RunConfig, given: dict[str, Any], source_tree: dict[str, Any]) -> None:
    """train.init_from builds the model its weights come from: cfg.model becomes the source's (a run's newest
    checkpoint, an export, a Hugging Face directory's config.json; the run's own checkpoint when it resumes), the
    config file's model section aside. A model.* key given on the command line must agree with the source, one
    line naming the key and both values otherwise; the family's training-only keys (HFMapping.training_keys:
    a loss weight, a balancing speed) are the run's to set."""
    source = cfg.train.init_from
    model = config_from_dict({"model": source_tree.get("model") or {}}).model
    hf = get_spec(model.arch).hf
    free = set(hf.training_keys) if hf else set()
    trial = RunConfig(name=cfg.name, model=model)
    for dotted, raw in given.items():
        key = dotted.removeprefix("model.")
        if key == dotted or (key == "vocab_size" and str(raw).strip().lower() == "auto"):
            continue
        if key == "arch":
            value: Any = _coerce(dotted, raw, str)
        elif key in field_types(type(model)):
            value = _coerce(dotted, raw, field_types(type(model))[key])
        else:
            raise _unknown_key(trial, dotted)
        if key in free:
            setattr(model, key, value)
        elif value != getattr(model, key):
            raise ConfigError(
                f"{dotted}={raw} contradicts train.init_from={source}, whose model has {key}={getattr(model, key)}; "
                f"drop {dotted}: the model comes from init_from"
            )
    cfg.model = model


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

    Files saved by earlier releases still read: before each model had its own config class, a model
    section held every built-in model's fields (those of other models are skipped), and keys renamed
    since (RENAMED_KEYS) are mapped. Any other unknown key is an error.
    """
    cfg = RunConfig(name=str(tree.get("name", "tiny")))
    flat = flatten({k: v for k, v in tree.items() if k != "name"})
    _set(cfg, "model.arch", flat.pop("model.arch", DEFAULT_ARCH))
    own, others = field_types(type(cfg.model)), _built_in_model_keys()
    legacy = {key for key in flat if key.startswith("model.") and key[6:] not in own and key[6:] in others}
    renamed = {key: flat.pop(key) for key in list(flat) if key in RENAMED_KEYS}
    _apply(cfg, {key: value for key, value in flat.items() if key not in legacy})
    for old, value in renamed.items():
        new, mapping = RENAMED_KEYS[old]
        section, _, key = new.partition(".")
        setattr(getattr(cfg, section), key, mapping(value, getattr(getattr(cfg, section), key)))
    return cfg


def _built_in_model_keys() -> set[str]:
    return {f.name for spec in built_in_specs().values() for f in dataclasses.fields(spec.config)}


# ---------------------------------------------------------------------------------------------
# Checks across fields


def validate_model(m: ModelConfig) -> None:
    """The model's own checks, from its registry spec (build_model runs them too, for a ModelConfig made in code)."""
    get_spec(m.arch).validate(m)


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
    if not 0 <= t.seed <= MAX_SEED:
        bound = "at least 0" if t.seed < 0 else f"at most {MAX_SEED} (2**63 - 1, what torch's generators take)"
        raise ConfigError(f"train.seed={t.seed} must be {bound}, e.g. SEED=1337")
    if not 0 <= cfg.data.val_fraction < 1:
        raise ConfigError(f"data.val_fraction={cfg.data.val_fraction} must be at least 0 and below 1, e.g. 0.05")
    _validate_sinks(t.sinks)
    validate_model(m)
    limit = get_spec(m.arch).seq_len_limit
    if limit and cfg.data.seq_len > getattr(m, limit):
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} exceeds model.{limit}={getattr(m, limit)}; lower one or raise the other"
        )
    if cfg.data.source == "files" and not cfg.data.path:
        raise ConfigError('data.source=files needs data.path, e.g. ARGS="data.path=corpus/*.txt"')
    check_lora(cfg)


def _validate_sinks(sinks: list[str]) -> None:
    for name in sinks:
        if name not in SINKS:
            close = difflib.get_close_matches(name, list(SINKS), n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(f"train.sinks: no sink named {name!r}; {hint}the sinks are {', '.join(SINKS)}")
    if "jsonl" not in sinks:
        raise ConfigError(
            "train.sinks must keep jsonl: metrics.jsonl is the run's record (summary.json, loss.png, make compare "
            f"and resume read it); e.g. train.sinks={','.join(['jsonl', *sinks])}"
        )
    if len(set(sinks)) != len(sinks):
        raise ConfigError(f"train.sinks={','.join(sinks)} names a sink twice; name each once")
