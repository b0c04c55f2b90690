"""The typed config: YAML into dataclasses, dotted overrides, and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.corpus import write_corpus
from tests.helpers.trainrun import launch_train
from train.config_loader import available_configs, config_from_dict, load_config
from train.errors import ConfigError, DataError
from train.models.deepseek import DeepSeekConfig
from train.models.resnet import ResNetConfig


def test_every_shipped_config_loads() -> None:
    names = available_configs()
    assert {"tiny", "small", "medium", "dense", "resnet50"} <= set(names)
    for name in names:
        try:
            assert load_config(name).name == name
        except DataError as exc:  # a config on prepared data (small-bpe) names the command that makes it
            assert "make prepare" in str(exc)


def test_overrides_are_typed_by_field() -> None:
    cfg = load_config("tiny", ["train.lr=3e-4", "train.steps=7", "train.tf32=false", "data.path=x/*.txt"])
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
    assert cfg.train.tf32 is False
    assert cfg.data.path == "x/*.txt"


@pytest.mark.parametrize(
    ("override", "named"),
    [("train.lrr=1", "did you mean 'train.lr'"), ("modle.dim=64", "did you mean 'model.dim'"), ("lr=1", "train.lr")],
)
def test_unknown_key_names_the_closest_valid_one(override: str, named: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [override])
    assert named in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "override",
    [
        "train.steps=abc",
        "train.steps=1.5",
        "train.tf32=maybe",
        "train.precision=fp8",
        "train.strategy=zero3",
        "train.steps=0",
    ],
)
def test_bad_values_are_refused(override: str) -> None:
    with pytest.raises(ConfigError):
        load_config("tiny", [override])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.n_expert_groups=0", "model.n_expert_groups=0 must be at least 1"),  # was a ZeroDivisionError
        ("model.n_activated_experts=0", "model.n_activated_experts=0 must be at least 1"),
        ("model.n_heads=0", "model.n_heads=0 must be at least 1"),
        ("model.dim=0", "model.dim=0 must be at least 1"),
        ("model.qk_rope_head_dim=0", "model.qk_rope_head_dim=0 must be even and at least 2"),
        ("model.qk_rope_head_dim=5", "model.qk_rope_head_dim=5 must be even and at least 2"),
    ],
)
def test_a_degenerate_model_shape_is_one_line(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{message}"):
        load_config("tiny", [override])


def test_a_dense_model_may_leave_the_expert_sizes_at_zero() -> None:
    load_config("tiny", ["model.n_routed_experts=0", "model.n_activated_experts=0", "model.moe_inter_dim=0"])


def test_unknown_config_name_lists_the_available_ones() -> None:
    with pytest.raises(ConfigError) as err:
        load_config("tinny")
    assert "tiny" in str(err.value) and "small" in str(err.value)


def test_cross_field_checks() -> None:
    with pytest.raises(ConfigError, match="max_seq_len"):
        load_config("tiny", ["data.seq_len=100000"])
    with pytest.raises(ConfigError, match="n_activated_experts"):
        load_config("tiny", ["model.n_activated_experts=99"])
    with pytest.raises(ConfigError, match=r"data\.path"):
        load_config("tiny", ["data.source=files"])


def test_round_trip_through_a_plain_dict() -> None:
    cfg = load_config("tiny", ["train.lr=0.01"])
    assert config_from_dict(cfg.to_dict()) == cfg


def test_each_model_has_its_own_keys_and_another_arch_starts_from_its_defaults(tmp_path) -> None:
    resnet = load_config("resnet50")
    assert type(resnet.model) is ResNetConfig and not hasattr(resnet.model, "dim")
    assert type(load_config("tiny").model) is DeepSeekConfig and not hasattr(load_config("tiny").model, "num_classes")
    with pytest.raises(
        ConfigError,
        match=r"'model.num_classes' \(model.arch=deepseek has no such key\); it is a key of model.arch=resnet50$",
    ):
        load_config("tiny", ["model.num_classes=10"])
    with pytest.raises(ConfigError, match=r"'model.dim' \(model.arch=resnet50 has no such key\)"):
        load_config("resnet50", ["model.dim=64"])
    # Another arch on the command line: the file's model section (written for deepseek) gives way, whatever
    # the order of the overrides; its data and train sections still apply.
    switched = load_config("tiny", ["model.num_classes=7", "model.arch=resnet50"])
    assert switched.model == ResNetConfig(num_classes=7) and switched.train == load_config("tiny").train
    mine = tmp_path / "mine.yaml"
    mine.write_text("model:\n  arch: resnet50\n  dim: 64\n")
    with pytest.raises(ConfigError, match=r"model\.arch=resnet50 has no such key"):
        load_config(str(mine))


def test_a_config_saved_before_the_per_model_classes_still_reads() -> None:
    """Checkpoints and exports written before held every built-in model's keys in one model section."""
    other_models = {"tiny": {"num_classes": 1000, "image_size": 224}, "resnet50": {"dim": 128, "mtp_depth": 0}}
    for name, others in other_models.items():
        cfg = load_config(name)
        saved = cfg.to_dict()
        saved["model"].update(others)
        assert config_from_dict(saved) == cfg
        saved["model"]["planted"] = 1  # a key no model has is still an error
        with pytest.raises(ConfigError, match=r"'model\.planted'"):
            config_from_dict(saved)


def test_a_yaml_path_works_and_bad_yaml_is_one_line(tmp_path) -> None:
    good = tmp_path / "mine.yaml"
    good.write_text("train:\n  steps: 3\n")
    assert load_config(str(good)).train.steps == 3
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(bad))
    assert "\n" not in str(err.value)


def test_an_absurd_context_length_is_one_line_before_anything_is_built() -> None:
    with pytest.raises(ConfigError, match=r"model\.max_seq_len=1000000000000 exceeds"):
        load_config("tiny", ["model.max_seq_len=1000000000000"])


# ---------------------------------------------------------------------------------------------
# data.path and vocab auto


def test_data_path_picks_the_source_or_is_refused_when_it_contradicts(tmp_path: Path) -> None:
    write_corpus(tmp_path / "text", files=1, lines=20)
    (tmp_path / "images" / "cat").mkdir(parents=True)
    glob = str(tmp_path / "text" / "*.txt")
    assert load_config("tiny", [f"data.path={glob}"]).data.source == "files"  # tiny.yaml says corpus
    assert load_config("resnet50", [f"data.path={tmp_path / 'images'}"]).data.source == "images"
    with pytest.raises(ConfigError, match=r"data\.source=corpus does not read"):
        load_config("tiny", ["data.source=corpus", f"data.path={glob}"])
    with pytest.raises(ConfigError, match="is a directory"):
        load_config("tiny", ["data.source=files", f"data.path={tmp_path / 'images'}"])
    with pytest.raises(ConfigError, match="synthetic has none"):
        load_config("tiny", ["data.source=synthetic", "model.vocab_size=auto"])


def test_the_launcher_trains_on_a_given_path_with_the_default_source(tmp_path: Path) -> None:
    write_corpus(tmp_path / "text", files=1, lines=60)
    run_dir = tmp_path / "run"
    result = launch_train(run_dir, 1, 1, f"data.path={tmp_path / 'text' / '*.txt'}", "train.eval_every=0")
    assert result.returncode == 0, result.stderr
    assert "torchrig: data: files:" in result.stdout
