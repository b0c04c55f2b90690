"""The model registry: every model family is one spec (train/models/spec.py), and `model.arch` names one.

The built-in families are the SPEC of each module in BUILT_IN: one file each (deepseek.py, llama.py,
resnet.py), imported here. A model of your own is one file exporting `SPEC = ModelSpec(...)`: either put
it in this package and add it to BUILT_IN, or keep it anywhere importable and name its module in the
TORCHRIG_MODELS environment variable (comma-separated, e.g. TORCHRIG_MODELS=mymodels.toy), which every
worker inherits. Only that variable, set deliberately in the environment by whoever starts the run, ever
makes the registry import code: a config file or a `model.arch` value is a name looked up among the
registered specs, never a module to import, and the variable given on make's command line (which make
exports too) is refused.

The counts from a config alone (count_params, flops_per_sample) ask the spec of its model.arch.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import os
import re
import traceback

from torch import nn

from train.config import ModelConfig
from train.errors import ConfigError
from train.models import deepseek, llama, resnet
from train.models.spec import ModelSpec, ParamCount

# The registry: one module per model family, each exporting SPEC.
BUILT_IN = (deepseek, llama, resnet)
PLUGINS_ENV = "TORCHRIG_MODELS"
_MODULE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def built_in_specs() -> dict[str, ModelSpec]:
    return {module.SPEC.name: module.SPEC for module in BUILT_IN}


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


def count_params(cfg: ModelConfig) -> ParamCount:
    """Parameter counts of build_model(cfg), computed analytically by its registry spec."""
    return get_spec(cfg.arch).count_params(cfg)


def flops_per_sample(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per sample (a sequence of seq_len tokens, or one image), by the model's registry spec."""
    return get_spec(cfg.arch).flops_per_sample(cfg, seq_len)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token of a token model: a sample is seq_len tokens."""
    if get_spec(cfg.arch).inputs != "tokens":
        raise ValueError(f"flops_per_token is for token models, not {cfg.arch}; use flops_per_sample")
    return flops_per_sample(cfg, seq_len) / seq_len
