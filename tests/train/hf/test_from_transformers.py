"""Hugging Face -> torchrig: checkpoints that transformers' own save_pretrained writes (sharded) build the same
model here: the same logits, HF -> torchrig -> HF bit-exact, `make sample` and `make eval` read them as they
are, and `train.init_from` starts a run from one with transformers' loss on its first batch."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import CONFIG_MAPPING, AutoModelForCausalLM

from tests.helpers.hf_models import V5, add_v2_yarn_correction, greedy_generate
from tests.helpers.make import make, needs_make
from tests.helpers.paths import ROOT
from tests.helpers.trainrun import metrics
from train.config_loader import load_config
from train.data import build_dataset, build_loader
from train.data.sources import TokenWindows
from train.errors import ConfigError
from train.export import export
from train.sample import ByteCodec, printable
from train.weights import build_loaded_model, init_source_config, load_model_weights, saved_config

COMMON = dict(vocab_size=256, hidden_size=64, num_attention_heads=4, max_position_embeddings=64,
              initializer_range=0.08, tie_word_embeddings=False)  # fmt: skip
DEEPSEEK = dict(**COMMON, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3, num_key_value_heads=4,
                n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=1,
                kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)  # fmt: skip
YARN = {"factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707,
        "mscale_all_dim": 0.707}  # fmt: skip
# transformers config keys of each checkpoint the tests save (5.x takes rope settings as rope_parameters)
CHECKPOINTS = {
    "deepseek_v3": dict(**DEEPSEEK, q_lora_rank=24, n_group=4, topk_group=2, routed_scaling_factor=2.5),
    "deepseek_v3-full-rank-q": dict(**DEEPSEEK, q_lora_rank=None, n_group=1, topk_group=1, rms_norm_eps=1e-5),
    "deepseek_v2": dict(**DEEPSEEK, q_lora_rank=None, n_group=4, topk_group=2, topk_method="group_limited_greedy",
                        routed_scaling_factor=1.5, **({"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0,
                        **YARN}} if V5 else {"rope_scaling": {"type": "yarn", **YARN}})),
    "llama": dict(**COMMON, intermediate_size=128, num_hidden_layers=2, num_key_value_heads=2),
    "llama-tied": dict(**{**COMMON, "tie_word_embeddings": True}, intermediate_size=128, num_hidden_layers=2,
                       num_key_value_heads=1, rope_theta=500000.0),
}  # fmt: skip
SHARD = "60KB"


def model_type(name: str) -> str:
    return name.split("-")[0]


def save_transformers_checkpoint(directory: Path, name: str) -> torch.nn.Module:
    """A transformers model of CHECKPOINTS[name], every weight off its initial value (norms near 1, a non-zero
    correction bias), saved sharded by save_pretrained; returned in eval mode, computing DeepSeek's attention."""
    torch.manual_seed(0)
    config = CONFIG_MAPPING[model_type(name)](**CHECKPOINTS[name])
    model = AutoModelForCausalLM.from_config(config).float()
    with torch.no_grad():
        for key, param in model.named_parameters():
            if "norm" in key:
                param.add_(0.1 * torch.randn_like(param))
        for key, buffer in model.named_buffers():
            if key.endswith("e_score_correction_bias"):
                buffer.copy_(0.1 * torch.rand_like(buffer))
    model.save_pretrained(directory, max_shard_size=SHARD)
    add_v2_yarn_correction(model, json.loads((directory / "config.json").read_text()))
    return model.eval()


@pytest.fixture(scope="module", params=list(CHECKPOINTS))
def checkpoint(request, tmp_path_factory) -> tuple[str, torch.nn.Module, Path]:
    directory = tmp_path_factory.mktemp(request.param) / "hf"
    return request.param, save_transformers_checkpoint(directory, request.param), directory


def safetensors_of(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors |= load_file(file)
    return tensors


def test_the_checkpoint_is_sharded_as_transformers_saves_it(checkpoint) -> None:
    _, _, directory = checkpoint
    assert (directory / "model.safetensors.index.json").is_file() and len(list(directory.glob("model-*"))) > 1


def test_a_transformers_checkpoint_builds_the_same_model_within_1e_5(checkpoint) -> None:
    name, hf, directory = checkpoint
    model, config, step = build_loaded_model(directory, torch.device("cpu"))
    assert step == 0 and config["model"]["arch"] == ("llama" if name.startswith("llama") else "deepseek")
    assert getattr(model.cfg, "mtp_depth", 0) == 0  # 5.x writes num_nextn_predict_layers=1 but saves no MTP
    tokens = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    assert (ours - theirs).abs().max().item() < 1e-5 and ours.abs().max() > 0.5


def test_hf_to_torchrig_to_hf_is_bit_exact(checkpoint, tmp_path: Path) -> None:
    _, _, directory = checkpoint
    export(directory, tmp_path / "again", shard=SHARD)
    original, again = safetensors_of(directory), safetensors_of(tmp_path / "again")
    assert sorted(again) == sorted(original)
    assert all(torch.equal(again[key], original[key]) and again[key].dtype == original[key].dtype for key in original)
    assert (tmp_path / "again" / "model.safetensors.index.json").is_file()


def test_the_config_of_a_transformers_checkpoint_is_read_without_its_weights(checkpoint) -> None:
    name, _hf, directory = checkpoint
    model = saved_config(directory)["model"]
    assert model["vocab_size"] == 256 and model["dim"] == 64
    if name == "deepseek_v2":
        assert model["score_func"] == "softmax" and model["rope_factor"] == 4.0 and model["original_seq_len"] == 16
        assert model["n_expert_groups"] == 4 and model["n_limited_groups"] == 2 and model["mscale_all_dim"] == 0.707
    if name.startswith("deepseek_v3"):
        assert model["score_func"] == "sigmoid" and model["q_lora_rank"] == (24 if name == "deepseek_v3" else 0)
    if name == "llama-tied":
        assert model["tie_embeddings"] is True and model["n_kv_heads"] == 1


@needs_make
def test_make_sample_reads_a_transformers_checkpoint_as_it_is(checkpoint) -> None:
    _, hf, directory = checkpoint
    prompt = "import torch as t"
    tokens = greedy_generate(hf, ByteCodec(256).encode(prompt), 20)
    result = make("sample", f"RUN_DIR={directory}", f"PROMPT={prompt}", "TOKENS=20", "TEMPERATURE=0")
    assert result.returncode == 0, result.stderr
    assert result.stdout == printable(prompt) + printable(ByteCodec(256).stream(tokens)) + "\n"


@needs_make
def test_make_eval_of_a_transformers_checkpoint_gives_transformers_loss(tmp_path: Path) -> None:
    hf = save_transformers_checkpoint(tmp_path / "hf", "deepseek_v2")
    text = tmp_path / "text.txt"
    text.write_text("def main():\n    return 42\n" * 20)
    result = make("eval", f"RUN_DIR={tmp_path / 'hf'}", f"DATA={text}")
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "hf" / "eval.json").read_text())
    # The whole of DATA as bytes and a NUL, in windows of max_position_embeddings (64) tokens.
    windows = TokenWindows(np.frombuffer(text.read_bytes() + b"\0", dtype=np.uint8), 64, "files", str(text))
    inputs = torch.stack([windows[i][0] for i in range(len(windows))])
    targets = torch.stack([windows[i][1] for i in range(len(windows))])
    with torch.no_grad():
        loss = F.cross_entropy(hf(inputs).logits.flatten(0, 1), targets.flatten()).item()
    assert record["samples"] == len(windows) and record["val_loss"] == pytest.approx(loss, rel=1e-5)


def test_make_eval_of_weights_without_data_is_one_line(tmp_path: Path) -> None:
    save_transformers_checkpoint(tmp_path / "hf", "llama")
    result = subprocess.run(
        [sys.executable, "-m", "train.eval", "--run-dir", str(tmp_path / "hf")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"torchrig eval: {tmp_path / 'hf'} holds weights without a validation split; give DATA=… (a token file or "
        "text files)"
    ]


# ---------------------------------------------------------------------------------------------
# train.init_from


def test_init_from_takes_the_model_from_the_checkpoint(tmp_path: Path) -> None:
    save_transformers_checkpoint(tmp_path / "hf", "deepseek_v2")
    cfg = load_config(
        "tiny", [f"train.init_from={tmp_path / 'hf'}", "data.seq_len=32", "model.mtp_weight=0.5"], init_source_config
    )
    assert (cfg.model.dim, cfg.model.n_layers, cfg.model.score_func, cfg.model.rope_factor) == (64, 3, "softmax", 4.0)
    assert cfg.model.mtp_weight == 0.5  # a training-only key is the run's own
    state, _, _ = load_model_weights(tmp_path / "hf")
    from train.models import build_model

    assert build_model(cfg.model).state_dict().keys() == state.keys()


def test_init_from_with_a_contradicting_model_key_names_it_and_both_values(tmp_path: Path) -> None:
    save_transformers_checkpoint(tmp_path / "hf", "llama")
    with pytest.raises(ConfigError) as caught:
        overrides = [f"train.init_from={tmp_path / 'hf'}", "model.n_kv_heads=4", "data.seq_len=32"]
        load_config("llama-tiny", overrides, init_source_config)
    assert str(caught.value) == (
        f"model.n_kv_heads=4 contradicts train.init_from={tmp_path / 'hf'}, whose model has n_kv_heads=2; drop "
        "model.n_kv_heads: the model comes from init_from"
    )
    agreeing = load_config(
        "llama-tiny", [f"train.init_from={tmp_path / 'hf'}", "model.n_kv_heads=2", "data.seq_len=32"]
    )
    assert agreeing.model.n_kv_heads == 2


@pytest.mark.slow
def test_init_from_a_transformers_checkpoint_starts_at_transformers_loss(tmp_path: Path) -> None:
    hf = save_transformers_checkpoint(tmp_path / "hf", "deepseek_v3")
    overrides = [f"train.init_from={tmp_path / 'hf'}", "data.seq_len=32", "train.precision=fp32", "train.log_every=1",
                 "data.num_workers=0", "train.micro_batch=4", "train.eval_every=0"]  # fmt: skip
    command = [sys.executable, "-m", "train.launch", "--gpus", "1", "--config", "tiny", "--run-dir",
               str(tmp_path / "run"), "--steps", "1", "--max-restarts", "0", *overrides]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stderr[-3000:]
    cfg = load_config("tiny", overrides)
    inputs, targets = next(iter(build_loader(build_dataset(cfg), cfg, rank=0, world_size=1, start_step=0)))
    with torch.no_grad():
        loss = F.cross_entropy(hf(inputs).logits.flatten(0, 1), targets.flatten()).item()
    first = metrics(tmp_path / "run")[0]
    assert first["step"] == 1 and math.isclose(first["loss"], loss, rel_tol=1e-5)
