"""The model registry: every model family is one spec, and `model.arch` names one.

A spec says everything the rest of the rig needs to know about a model, so that nothing else
switches on the arch string: its config dataclass (the keys of the `model:` section), how to build
it, how to check its config, its parameter and FLOP counts, the batch it takes (and so which data
sources fit), and its FSDP2 shard units.

The built-in families are the SPEC of each module named in BUILT_IN. A model of your own is one
file exporting `SPEC = ModelSpec(...)`: either put it in this package and add its name to BUILT_IN, or
keep it anywhere importable and name its module in the TORCHRIG_MODELS environment variable
(comma-separated, e.g. TORCHRIG_MODELS=mymodels.toy), which every worker inherits. Only that
variable, set deliberately in the environment by whoever starts the run, ever makes the registry
import code: a config file or a `model.arch` value is a name looked up among the registered specs,
never a module to import, and the variable given on make's command line (which make exports too) is
refused.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import os
import re
import traceback
from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass

from torch import nn

from train.config import ConfigError, ModelConfig
from train.flops import ParamCount

# The registry: one module per model family, each exporting SPEC.
BUILT_IN = ("train.models.deepseek", "train.models.resnet")
PLUGINS_ENV = "TORCHRIG_MODELS"
# What a model's batch holds: (inputs, targets) of token ids [batch, seq] and next tokens, or of
# images [batch, 3, H, W] and class labels. train/data.py says which sources give which.
INPUT_KINDS = ("tokens", "images")
# The model.* keys the data needs of each kind: a token model's vocabulary (model.vocab_size=auto takes
# it from the data), an image model's classes and input size.
INPUT_KEYS = {"tokens": ("vocab_size",), "images": ("num_classes", "image_size")}
_MODULE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def _no_checks(cfg: ModelConfig) -> None:
    """For a model whose sizes cannot be wrong in a way the builder would not say clearly."""


@dataclass(frozen=True)
class ModelSpec:
    """One model family. The model built must take `forward(inputs, targets) -> scalar loss`."""

    name: str  # the model.arch value that selects it
    # The `model:` section: a dataclass subclassing train.config.ModelConfig, defaults for every key.
    config: type[ModelConfig]
    # The model, its weights drawn from the global torch RNG (the trainer seeds it first), on the CPU.
    build: Callable[[ModelConfig], nn.Module]
    # Parameter counts from the config alone, without building (train/flops.py ParamCount).
    count_params: Callable[[ModelConfig], ParamCount]
    # Training FLOPs (forward + backward) of one sample, given data.seq_len: for MFU.
    flops_per_sample: Callable[[ModelConfig, int], float]
    inputs: str  # one of INPUT_KINDS
    # The submodules FSDP2 shards one by one before the root (train/distributed.py wrap_model).
    shard_units: Callable[[nn.Module], list[nn.Module]]
    # Checks of the model section, each a ConfigError with the fix (run before every build).
    validate: Callable[[ModelConfig], None] = _no_checks
    # The ModelConfig field that bounds data.seq_len (a token model's position table), if any.
    seq_len_limit: str | None = None
    # cuDNN autotuning pays for convolutions at fixed shapes; it only costs time elsewhere.
    cudnn_benchmark: bool = False

    def __post_init__(self) -> None:
        where = f"model spec {self.name!r}"
        if not (isinstance(self.config, type) and issubclass(self.config, ModelConfig) and is_dataclass(self.config)):
            raise ConfigError(
                f"{where}: config={self.config!r} is not a dataclass subclassing train.config.ModelConfig"
            )
        if self.inputs not in INPUT_KINDS:
            kinds = " or ".join(INPUT_KINDS)
            raise ConfigError(f"{where}: inputs={self.inputs!r} is not {kinds}")
        keys = {f.name for f in fields(self.config)}
        needed = [key for key in (*INPUT_KEYS[self.inputs], self.seq_len_limit) if key and key not in keys]
        if needed:
            raise ConfigError(f"{where}: its config {self.config.__name__} has no field {needed[0]!r}")

    def new_config(self) -> ModelConfig:
        """This model's `model:` section at its defaults."""
        return self.config(arch=self.name)


def built_in_specs() -> dict[str, ModelSpec]:
    # Imported on first use: the families import train.config and train.flops, which call back into this registry.
    specs = [importlib.import_module(name).SPEC for name in BUILT_IN]
    return {spec.name: spec for spec in specs}


@functools.cache
def _plugin_spec(module_name: str) -> ModelSpec:
    """The SPEC of a module named in TORCHRIG_MODELS; any failure is one line naming the module."""
    where = f"{PLUGINS_ENV}={os.environ.get(PLUGINS_ENV, '')}"
    if not _MODULE_NAME.fullmatch(module_name):
        raise ConfigError(f"{where}: {module_name!r} is not a module name; write e.g. mymodels.toy")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            raise ConfigError(
                f"{where}: no module {module_name!r}; put it under the repository (or on PYTHONPATH, locally)"
            ) from None
        raise _import_failure(where, module_name, exc) from None
    except Exception as exc:  # the user's own code failed: say where, in one line
        raise _import_failure(where, module_name, exc) from None
    spec = getattr(module, "SPEC", None)
    if not isinstance(spec, ModelSpec):
        raise ConfigError(f"{where}: module {module_name!r} has no SPEC = train.models.ModelSpec(...)")
    return spec


def _import_failure(where: str, module_name: str, exc: Exception) -> ConfigError:
    if isinstance(exc, SyntaxError):
        place = f"{exc.filename}:{exc.lineno}"
    else:
        frames = traceback.extract_tb(exc.__traceback__)
        place = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else module_name
    message = str(exc).splitlines()[0] if str(exc) else ""
    return ConfigError(f"{where}: importing {module_name} failed at {place}: {type(exc).__name__}: {message}")


def registered() -> dict[str, ModelSpec]:
    """Every spec: the built-in families, then those of the modules in TORCHRIG_MODELS."""
    specs = built_in_specs()
    if os.environ.get(PLUGINS_ENV) and re.search(rf"(^|\s){PLUGINS_ENV}=", os.environ.get("MAKEFLAGS", "")):
        raise ConfigError(
            f"{PLUGINS_ENV} was given as a make variable, and make variables never import code; "
            f"set it in the environment instead: {PLUGINS_ENV}=mymodels.toy make train ..."
        )
    for module_name in filter(None, (part.strip() for part in os.environ.get(PLUGINS_ENV, "").split(","))):
        spec = _plugin_spec(module_name)
        if spec.name in specs and specs[spec.name] is not spec:
            raise ConfigError(
                f"{PLUGINS_ENV}: module {module_name!r} registers model.arch={spec.name!r}, "
                "which another spec already has; rename it"
            )
        specs[spec.name] = spec
    return specs


def get_spec(arch: str) -> ModelSpec:
    """The spec of model.arch=arch, or a ConfigError naming the closest registered one."""
    specs = registered()
    if arch in specs:
        return specs[arch]
    closest = difflib.get_close_matches(arch, list(specs), n=1, cutoff=0.0)[0]
    raise ConfigError(
        f"model.arch={arch!r} is not a registered model; did you mean '{closest}'? (registered: {', '.join(specs)}; "
        f"a model of your own: its module in {PLUGINS_ENV}, see README 'Bring your own model')"
    )


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model for cfg.arch, checked and initialised from the global torch RNG (seed it first)."""
    spec = get_spec(cfg.arch)
    spec.validate(cfg)
    return spec.build(cfg)
