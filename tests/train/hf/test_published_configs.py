"""The shipped DeepSeek configs are the published checkpoints' shapes: deepseek-v2-lite is DeepSeek-V2-Lite's
config.json and deepseek-v3-16b-a3b Moonlight-16B-A3B's (the V3 architecture at 16B), as train.init_from reads
them, with the parameter counts transformers builds from those files. A known model type's auto_map is read
past, never run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import CONFIG_MAPPING, AutoModelForCausalLM

from tests.helpers.hf_models import saved_run
from train.config_loader import config_from_dict, load_config
from train.export import export
from train.hf import deepseek as hf_deepseek
from train.models import count_params
from train.weights import load_model_weights

AUTO_MAP = {
    "AutoConfig": "configuration_deepseek.DeepseekV2Config",
    "AutoModel": "modeling_deepseek.DeepseekV2Model",
    "AutoModelForCausalLM": "modeling_deepseek.DeepseekV2ForCausalLM",
}
# DeepSeek-V2-Lite's config.json (deepseek-ai/DeepSeek-V2-Lite).
V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"], "auto_map": AUTO_MAP, "attention_bias": False,
    "attention_dropout": 0.0, "aux_loss_alpha": 0.001, "bos_token_id": 100000, "eos_token_id": 100001,
    "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 10944, "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v2",
    "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2,
    "norm_topk_prob": False, "num_attention_heads": 16, "num_experts_per_tok": 6, "num_hidden_layers": 27,
    "num_key_value_heads": 16, "pretraining_tp": 1, "q_lora_rank": None, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
    "use_cache": True, "v_head_dim": 128, "vocab_size": 102400,
}  # fmt: skip
# Moonlight-16B-A3B-Instruct's config.json (moonshotai, revision 4e735b07).
MOONLIGHT = {
    "architectures": ["DeepseekV3ForCausalLM"], "auto_map": AUTO_MAP, "attention_bias": False,
    "attention_dropout": 0.0, "aux_loss_alpha": 0.001, "bos_token_id": 163584, "eos_token_id": 163586, "ep_size": 1,
    "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 11264, "kv_lora_rank": 512, "max_position_embeddings": 8192, "model_type": "deepseek_v3",
    "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2,
    "norm_topk_prob": True, "num_attention_heads": 16, "num_experts_per_tok": 6, "num_hidden_layers": 27,
    "num_key_value_heads": 16, "num_nextn_predict_layers": 0, "pretraining_tp": 1, "q_lora_rank": None,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-05, "rope_theta": 50000.0,
    "routed_scaling_factor": 2.446, "scoring_func": "sigmoid", "seq_aux": True, "tie_word_embeddings": False,
    "topk_group": 1, "topk_method": "noaux_tc", "torch_dtype": "bfloat16", "transformers_version": "4.46.3",
    "use_cache": True, "v_head_dim": 128, "vocab_size": 163840,
}  # fmt: skip
SHIPPED = {"deepseek-v2-lite": V2_LITE, "deepseek-v3-16b-a3b": MOONLIGHT}


def transformers_counts(published: dict) -> tuple[int, int]:
    """(parameters, the parameters one token computes with: all but the embedding and the routed experts it is
    not sent to) of transformers' model of a config.json, built on the meta device."""
    config = CONFIG_MAPPING[published["model_type"]](**{k: v for k, v in published.items() if k != "auto_map"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    moe = [layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "experts")]
    per_expert = sum(p.numel() for p in moe[0].experts.parameters()) // published["n_routed_experts"]
    unused = published["n_routed_experts"] - published["num_experts_per_tok"]
    return total, total - model.model.embed_tokens.weight.numel() - len(moe) * unused * per_expert


@pytest.mark.parametrize("name", list(SHIPPED))
def test_the_shipped_config_is_the_published_config_json(name: str) -> None:
    keys = hf_deepseek.from_config(SHIPPED[name], set())
    assert load_config(name).model == config_from_dict({"model": {"arch": "deepseek", **keys}}).model


@pytest.mark.parametrize("name", list(SHIPPED))
def test_the_shipped_config_has_the_published_parameter_counts(name: str) -> None:
    counts = count_params(load_config(name).model)
    assert (counts.total, counts.active) == transformers_counts(SHIPPED[name])


def test_the_counts_are_the_published_figures() -> None:
    """DeepSeek-V2-Lite's checkpoint holds 15,706,484,224 parameters ("15.7B total, 2.4B active"); Moonlight's
    15,960,108,544 parameters plus its 26 x 64 correction biases, which are buffers ("16B total, 3B active")."""
    v2_lite, moonlight = (
        count_params(load_config("deepseek-v2-lite").model),
        count_params(load_config("deepseek-v3-16b-a3b").model),
    )
    assert (v2_lite.total, v2_lite.active) == (15_706_484_224, 2_451_435_008)
    assert (moonlight.total, moonlight.active) == (15_960_108_544, 2_579_230_208)


def test_a_known_model_types_auto_map_is_read_past_and_never_run(tmp_path: Path) -> None:
    """DeepSeek's checkpoints name their own code in auto_map; the native model type is what is read."""
    _, model, run = saved_run(tmp_path, "v2-yarn")
    export(run, tmp_path / "hf")
    planted = tmp_path / "planted"
    for module in ("configuration_deepseek.py", "modeling_deepseek.py"):
        (tmp_path / "hf" / module).write_text(f"open({str(planted)!r}, 'w').write('ran')\n")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "auto_map": AUTO_MAP}))
    state, _, _ = load_model_weights(tmp_path / "hf")
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items()) and not planted.exists()
