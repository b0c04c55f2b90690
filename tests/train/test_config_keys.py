"""The config keys as a reference: every key documented, `make keys` equal to docs/config.md, a mistyped
key answered by name or by what the keys' docstrings say, and the sink list checked before a run starts."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from tests.helpers.paths import ROOT
from train.config import DataConfig, LoRAConfig, RunConfig, TrainConfig
from train.config_keys import field_docs, key_reference, leaves
from train.config_loader import config_from_dict, default_config, load_config
from train.errors import ConfigError
from train.models import built_in_specs


def test_every_field_of_every_section_and_built_in_model_has_a_docstring() -> None:
    classes = [RunConfig, DataConfig, TrainConfig, LoRAConfig, *(spec.config for spec in built_in_specs().values())]
    for klass in classes:
        documented = field_docs(klass)
        missing = [f.name for f in dataclasses.fields(klass) if f.name not in documented and f.name not in SECTIONS]
        assert not missing, f"{klass.__name__} fields without a docstring: {missing}"


SECTIONS = ("model", "data", "train")


def test_the_reference_lists_every_key_with_its_type_default_and_docstring() -> None:
    reference = key_reference()
    cfg = default_config()
    for section in SECTIONS[1:]:
        for key, leaf in leaves(getattr(cfg, section), f"{section}.").items():  # nested sections' keys too
            row = next(line for line in reference.splitlines() if line.startswith(f"| `{key}` |"))
            assert leaf.doc[:40].replace("|", "\\|") in row
    assert "| `train.precision` | auto \\| bf16 \\| fp16 \\| fp32 | `auto` |" in reference
    assert "| `train.sinks` | list[str] | `console,jsonl` |" in reference
    for name, spec in built_in_specs().items():
        assert f"## model (model.arch={name})" in reference
        for field in dataclasses.fields(spec.config):
            assert field.name == "arch" or f"| `model.{field.name}` |" in reference


def test_make_keys_prints_what_docs_config_md_holds() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TORCHRIG_MODELS"}  # the built-in models only
    printed = subprocess.run(
        [sys.executable, "-m", "train.config_keys"], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    ).stdout
    assert printed == (ROOT / "docs" / "config.md").read_text(), (
        "docs/config.md is stale: run make keys OUTPUT=docs/config.md"
    )


@pytest.mark.parametrize(
    ("typed", "meant"),
    [
        ("train.learning_rate", "train.lr"),
        ("train.batch_size", "train.micro_batch"),
        ("train.tensorboard", "train.sinks"),
        ("train.weight_decy", "train.weight_decay"),
        ("train.gradient_accumulation_steps", "train.accum"),
        ("train.save_every", "train.ckpt_every"),
        ("data.sequence_length", "data.seq_len"),
        ("model.num_layers", "model.n_layers"),
        ("model.num_experts", "model.n_routed_experts"),
    ],
)
def test_an_unknown_key_names_the_key_the_user_meant(typed: str, meant: str) -> None:
    with pytest.raises(ConfigError, match=f"did you mean '{meant}'"):
        load_config("tiny", [f"{typed}=1"])


def test_a_key_close_to_nothing_points_at_make_keys() -> None:
    with pytest.raises(ConfigError, match="make keys"):
        load_config("tiny", ["train.zzqx=1"])


def test_train_sinks_takes_a_comma_list_of_known_sinks_and_keeps_jsonl() -> None:
    assert load_config("tiny", ["train.sinks=console,jsonl,tensorboard"]).train.sinks == [
        "console",
        "jsonl",
        "tensorboard",
    ]
    with pytest.raises(ConfigError, match="no sink named 'tensorbord'; did you mean 'tensorboard'"):
        load_config("tiny", ["train.sinks=jsonl,tensorbord"])
    with pytest.raises(ConfigError, match="must keep jsonl"):
        load_config("tiny", ["train.sinks=console"])
    with pytest.raises(ConfigError, match="names a sink twice"):
        load_config("tiny", ["train.sinks=jsonl,jsonl"])


def test_a_config_saved_with_train_tensorboard_reads_as_the_tensorboard_sink() -> None:
    saved = default_config().to_dict()
    del saved["train"]["sinks"]
    saved["train"]["tensorboard"] = True
    assert config_from_dict(saved).train.sinks == ["console", "jsonl", "tensorboard"]
    saved["train"]["tensorboard"] = False
    assert config_from_dict(saved).train.sinks == ["console", "jsonl"]


@dataclasses.dataclass
class _Inner:
    """A nested section, as train.lora is."""

    rank: int = 0
    """Adapter rank."""
    targets: list[str] = dataclasses.field(default_factory=lambda: ["wq"])
    """Module name patterns."""


@dataclasses.dataclass
class _TrainWithInner(TrainConfig):
    inner: _Inner = dataclasses.field(default_factory=_Inner, metadata={"resume": "fixed"})
    """A section inside train."""


def test_a_nested_section_is_set_listed_checked_and_fixed_for_a_resume_by_its_dotted_keys() -> None:
    from train.config import resume_fixed_keys
    from train.config_keys import leaves
    from train.config_loader import _apply

    cfg = default_config()
    cfg.train = _TrainWithInner()
    _apply(cfg, {"train.inner.rank": "8", "train.inner.targets": "wq,wkv_b"})
    assert cfg.train.inner.rank == 8 and cfg.train.inner.targets == ["wq", "wkv_b"]
    found = leaves(cfg.train, "train.")
    assert found["train.inner.rank"].doc == "Adapter rank." and found["train.inner.rank"].fixed
    assert not found["train.lr"].fixed and "train.inner.targets" in resume_fixed_keys(cfg.train, "train.")
    with pytest.raises(ConfigError, match=r"'train\.inner' is a section, not a key; set its keys, e\.g\. train\.inner"):
        _apply(cfg, {"train.inner": "8"})
    with pytest.raises(ConfigError, match=r"did you mean 'train\.inner\.rank'"):
        _apply(cfg, {"train.inner.rnak": "8"})
