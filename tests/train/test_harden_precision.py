"""Issue 16 class 10: numbers checked in one precision and used in another.

TEMPERATURE=1e-45 and TOP_P=1e-300 passed the range check in float64 and became inf and 0 in float32
(tracebacks); F8_E4M3 weights in an export were a traceback; SEED=99999999999999999999999 was told it
must be "at least 0".
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from env.common.cli import UserError
from tests.helpers.sampling import small_config, trained_in_process, write_export
from train.config_loader import load_config
from train.errors import ConfigError
from train.sample import Sampling, parse_args
from train.weights import WeightsError, build_loaded_model

LOGITS = torch.tensor([1.0, 30.0, 29.5, -4.0, 12.0])


@pytest.mark.parametrize(
    ("temperature", "top_p"),
    [(1e-45, 1.0), (1e-300, 1.0), (5e-324, 1.0), (0.8, 1e-300), (0.8, 5e-324), (1e-45, 1e-300)],
)
def test_tiny_temperatures_and_top_p_draw_the_likeliest_token(temperature: float, top_p: float) -> None:
    parse_args(["--run-dir", "r", "--temperature", repr(temperature), "--top-p", repr(top_p)])  # accepted
    generator = torch.Generator().manual_seed(0)
    picks = {Sampling(temperature, 0, top_p).pick(LOGITS, generator) for _ in range(20)}
    assert picks == {1}


def test_a_temperature_float64_cannot_hold_is_refused_in_one_line() -> None:
    with pytest.raises(UserError, match=r"TEMPERATURE=1e400 is not a finite number"):
        parse_args(["--run-dir", "r", "--temperature", "1e400"])


@pytest.mark.parametrize(
    ("seed", "expected"),
    [
        ("99999999999999999999999", r"SEED must be at most 9,223,372,036,854,775,807"),
        ("-1", r"SEED='-1' is not a number|from 0"),
    ],
)
def test_a_sampling_seed_out_of_range_names_the_bound_it_passes(seed: str, expected: str) -> None:
    with pytest.raises(UserError, match=expected) as caught:
        parse_args(["--run-dir", "r", "--seed", seed])
    if seed.startswith("9"):
        assert "at least 0" not in str(caught.value).split("must be")[0]


def test_a_training_seed_out_of_range_is_one_line_not_a_torch_overflow() -> None:
    with pytest.raises(ConfigError, match=r"train\.seed=99999999999999999999999 must be at most 9223372036854775807"):
        load_config("tiny", ["train.seed=99999999999999999999999"])
    with pytest.raises(ConfigError, match=r"train\.seed=-5 must be at least 0"):
        load_config("tiny", ["train.seed=-5"])


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.float64])
def test_weights_of_a_dtype_torchrig_does_not_load_are_one_line(tmp_path: Path, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    cfg = small_config()
    model = trained_in_process(cfg, steps=0)
    write_export(tmp_path, model, cfg.to_dict()["model"])
    state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightsError) as caught:
        build_loaded_model(tmp_path, torch.device("cpu"))
    message = str(caught.value)
    assert "which torchrig does not load (it loads float32, bfloat16, float16)" in message and "\n" not in message
