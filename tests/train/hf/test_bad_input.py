"""Hugging Face directories that cannot be read, and exports that cannot be written: one line naming the problem
and the fix, exit 2, nothing written, nothing allocated beyond the check, no code of the checkpoint run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.hf_models import saved_run
from tests.helpers.paths import ROOT
from train.config_loader import load_config
from train.errors import ConfigError
from train.export import ExportError, export
from train.hf import files as hf_files
from train.weights import WeightsError, build_loaded_model, init_source_config, load_model_weights


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A torchrig export of a small llama, sharded, with its tokenizer files."""
    tmp = tmp_path_factory.mktemp("pristine")
    _, _, run = saved_run(tmp, "llama-gqa")
    export(run, tmp / "export", shard="30KB")
    return tmp / "export"


@pytest.fixture
def checkpoint(pristine: Path, tmp_path: Path) -> Path:
    """A copy of the pristine export, for a test to damage."""
    return Path(shutil.copytree(pristine, tmp_path / "hf"))


def edit_json(path: Path, **changes) -> None:
    tree = json.loads(path.read_text())
    path.write_text(json.dumps({**tree, **changes}))


def sample_cli(directory: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "train.sample", "--run-dir", str(directory), "--tokens", "2"]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)


def one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text
    return text


def test_an_unsupported_model_type_is_one_line_naming_the_supported_ones(checkpoint: Path) -> None:
    edit_json(checkpoint / "config.json", model_type="qwen2")
    result = sample_cli(checkpoint)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"torchrig sample: {checkpoint / 'config.json'}: model_type 'qwen2' is not supported; supported: "
        "deepseek_v2, deepseek_v3, llama"
    ]


def test_a_checkpoint_that_needs_its_own_code_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    planted = tmp_path / "planted"
    code = f"open({str(planted)!r}, 'w').write('ran')\n"
    (checkpoint / "modeling_custom.py").write_text(code)
    (checkpoint / "configuration_custom.py").write_text(code)
    auto_map = {"AutoConfig": "configuration_custom.CustomConfig", "AutoModelForCausalLM": "modeling_custom.Custom"}
    edit_json(checkpoint / "config.json", model_type="custom", auto_map=auto_map)
    with pytest.raises(WeightsError) as caught:
        load_model_weights(checkpoint)
    assert "model_type 'custom' needs the checkpoint's own code (auto_map), which torchrig never runs" in one_line(
        caught.value
    )
    with pytest.raises(ConfigError, match=r"^train\.init_from=.*which torchrig never runs"):
        load_config("tiny", [f"train.init_from={checkpoint}"], init_source_config)
    assert not planted.exists()


def test_an_index_naming_a_missing_shard_is_named(checkpoint: Path) -> None:
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    gone = sorted(set(index["weight_map"].values()))[1]
    (checkpoint / gone).unlink()
    with pytest.raises(WeightsError) as caught:
        load_model_weights(checkpoint)
    assert f"names the shard {gone}, which is not in {checkpoint}; copy every shard" in one_line(caught.value)


def test_an_index_naming_a_file_outside_the_directory_is_refused(checkpoint: Path) -> None:
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../elsewhere.safetensors"
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsError, match=r"not a \.safetensors file name in the directory"):
        load_model_weights(checkpoint)


def test_a_weight_whose_shape_contradicts_config_json_is_named(checkpoint: Path) -> None:
    edit_json(checkpoint / "config.json", intermediate_size=96)
    with pytest.raises(WeightsError) as caught:
        load_model_weights(checkpoint)
    assert one_line(caught.value) == (
        f"{checkpoint}: weight 'model.layers.0.mlp.gate_proj.weight' has shape [128, 64] but its config.json implies "
        "[96, 64]; the weights and config.json are of different models"
    )


def test_a_weight_whose_dtype_contradicts_config_json_is_named(checkpoint: Path) -> None:
    from safetensors.torch import load_file, save_file

    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    name = "model.layers.1.self_attn.k_proj.weight"
    shard = checkpoint / index["weight_map"][name]
    tensors = load_file(shard)
    tensors[name] = tensors[name].to(torch.float16)
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(WeightsError) as caught:
        load_model_weights(checkpoint)
    assert one_line(caught.value) == (
        f"{checkpoint}: weight '{name}' is F16, but config.json says float32; give the checkpoint's own weights"
    )


def test_a_weight_the_model_does_not_have_is_named(checkpoint: Path) -> None:
    from safetensors.torch import save_file

    save_file({"model.layers.9.mlp.gate_proj.weight": torch.zeros(2, 2)}, checkpoint / "model-extra.safetensors")
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.9.mlp.gate_proj.weight"] = "model-extra.safetensors"
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsError, match=r"has weight 'model\.layers\.9\.mlp\.gate_proj\.weight', which the model"):
        load_model_weights(checkpoint)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported (llama computes SwiGLU with silu"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling type='llama3' is not supported"),
        ({"quantization_config": {"quant_method": "fp8"}}, "a quantized checkpoint (quantization_config fp8)"),
        ({"num_hidden_layers": None}, "it has no num_hidden_layers, which the model's size needs"),
        ({"hidden_size": "wide"}, "hidden_size='wide' is not a whole number"),
    ],
    ids=["activation", "rope-type", "quantized", "no-layers", "not-a-number"],
)
def test_a_config_json_this_family_cannot_compute_is_one_line(checkpoint: Path, changes: dict, message: str) -> None:
    edit_json(checkpoint / "config.json", **changes)
    with pytest.raises(WeightsError) as caught:
        load_model_weights(checkpoint)
    assert message in one_line(caught.value)


def test_yarn_that_deepseeks_code_would_not_apply_is_refused(tmp_path: Path) -> None:
    _, _, run = saved_run(tmp_path, "v2-yarn")
    export(run, tmp_path / "hf")
    edit_json(tmp_path / "hf" / "config.json", max_position_embeddings=16)
    with pytest.raises(WeightsError) as caught:
        load_model_weights(tmp_path / "hf")
    assert "YaRN applies only when model.max_seq_len (16) exceeds model.original_seq_len (16)" in one_line(caught.value)


def test_a_special_token_outside_the_vocabulary_is_refused(checkpoint: Path) -> None:
    edit_json(checkpoint / "tokenizer_config.json", eos_token="<|im_end|>")
    result = sample_cli(checkpoint)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"torchrig sample: {checkpoint / 'tokenizer_config.json'}: eos_token '<|im_end|>' is not in the vocabulary "
        "of tokenizer.json (transformers would add it as a new id the model has no embedding for); name a token of it"
    ]


def test_a_fifo_in_place_of_config_json_is_refused_without_waiting(checkpoint: Path) -> None:
    (checkpoint / "config.json").unlink()
    os.mkfifo(checkpoint / "config.json")
    with pytest.raises(WeightsError, match=r"config\.json is a FIFO"):
        load_model_weights(checkpoint)


def test_a_model_that_does_not_fit_is_refused_before_it_is_built(pristine: Path, monkeypatch) -> None:
    monkeypatch.setattr(hf_files, "available_bytes", lambda device: (1000, "available on this host"))
    monkeypatch.setattr("train.hf.directory.read_tensors", lambda *args: pytest.fail("read the weights"))
    with pytest.raises(WeightsError) as caught:
        build_loaded_model(pristine, torch.device("cpu"))
    assert "bytes" in one_line(caught.value) and "and 1,000 bytes (0.0 GiB) are available on this host" in str(
        caught.value
    )


def test_a_bad_shard_size_and_a_non_empty_output_write_nothing(pristine: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"SHARD='5 bananas' is not a size; give e\.g\. 5GB"):
        export(pristine, tmp_path / "out", shard="5 bananas")
    assert not (tmp_path / "out").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("mine")
    with pytest.raises(ExportError, match=r"is not empty; choose an empty or new directory, or set FORCE=1"):
        export(pristine, tmp_path / "full")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["mine.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging directory left behind


def test_an_export_from_a_damaged_directory_writes_nothing(checkpoint: Path, tmp_path: Path) -> None:
    edit_json(checkpoint / "config.json", intermediate_size=96)
    with pytest.raises(ConfigError):
        export(checkpoint, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_fifo_in_place_of_the_weights_is_named_as_such_not_as_missing(checkpoint: Path) -> None:
    weights = sorted(checkpoint.glob("model*.safetensors"))[0]  # the one file, or the first shard
    weights.unlink()
    os.mkfifo(weights)
    with pytest.raises(WeightsError, match=rf"{weights.name} is not a regular file; give the weights file itself"):
        load_model_weights(checkpoint)
