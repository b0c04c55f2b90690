"""torchrig -> Hugging Face: `make export` writes a directory transformers loads as it is, computing the same
logits, tokenizing as `make sample` does and generating the same greedy text; with a perturbed mapping it
does not (the parity test can fail)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from tests.helpers.hf_models import (
    V5,
    VARIANTS,
    add_v2_yarn_correction,
    extra_layer_keys,
    greedy_generate,
    saved_run,
)
from tests.helpers.make import make, needs_make
from tests.helpers.sampling import tool_lines
from train.export import ExportError, export
from train.hf import deepseek as hf_deepseek
from train.models import get_spec
from train.sample import ByteCodec, Generator, Sampling, printable
from train.weights import build_loaded_model

PROMPT = "def main("
NEW_TOKENS = 24


def load_hf(export_dir: Path) -> tuple[torch.nn.Module, dict]:
    """AutoModelForCausalLM of the export in float32, eval mode, with DeepSeek's YaRN attention under 4.57."""
    model, info = AutoModelForCausalLM.from_pretrained(export_dir, output_loading_info=True, dtype=torch.float32)
    add_v2_yarn_correction(model, json.loads((export_dir / "config.json").read_text()))
    return model.eval(), info


@pytest.fixture(scope="module", params=list(VARIANTS))
def exported(request, tmp_path_factory) -> tuple[str, torch.nn.Module, Path]:
    """(variant, the torchrig model, its export) for each family variant."""
    tmp = tmp_path_factory.mktemp(request.param)
    _cfg, model, run = saved_run(tmp, request.param)
    export(run, tmp / "export")
    return request.param, model, tmp / "export"


def test_transformers_loads_the_export_with_every_main_model_weight_and_no_other(exported) -> None:
    variant, model, export_dir = exported
    _hf, info = load_hf(export_dir)
    n_layers = model.cfg.n_layers
    mtp, main = extra_layer_keys(sorted(info["unexpected_keys"]), n_layers)
    assert sorted(info["missing_keys"]) == [] and main == [] and not info["mismatched_keys"]
    # DeepSeek's MTP convention: the module sits at layer num_hidden_layers, where transformers leaves it alone.
    assert bool(mtp) == (getattr(model.cfg, "mtp_depth", 0) > 0)
    config = AutoConfig.from_pretrained(export_dir)
    assert config.model_type == {"v3": "deepseek_v3", "v3-q-lora": "deepseek_v3", "v2-yarn": "deepseek_v2"}.get(
        variant, "llama"
    )
    if variant.startswith("v3"):
        assert config.q_lora_rank == (model.cfg.q_lora_rank or None)
        assert config.num_nextn_predict_layers == model.cfg.mtp_depth


def test_transformers_computes_the_same_logits_within_1e_5(exported) -> None:
    _, model, export_dir = exported
    hf, _ = load_hf(export_dir)
    tokens = torch.randint(0, 256, (2, model.cfg.max_seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    assert (ours - theirs).abs().max().item() < 1e-5
    assert ours.abs().max() > 0.5  # not a comparison of near-zero logits


def test_autotokenizer_has_eos_and_tokenizes_as_make_sample(exported) -> None:
    _, _, export_dir = exported
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    assert tokenizer.eos_token_id == 0 and tokenizer.eos_token == "Ā" and len(tokenizer) == 256
    text = "naïve ☃ def main(\n"
    assert tokenizer(text).input_ids == ByteCodec(256).encode(text)  # the separator first, then the UTF-8 bytes
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text
    assert tokenizer.model_max_length == 64


def test_greedy_generate_equals_the_samplers_greedy_tokens(exported) -> None:
    _, _, export_dir = exported
    hf, _ = load_hf(export_dir)
    prompt = AutoTokenizer.from_pretrained(export_dir)(PROMPT).input_ids
    loaded, _, _ = build_loaded_model(export_dir, torch.device("cpu"))
    generator = Generator(get_spec(loaded.cfg.arch).decoder(loaded), Sampling(temperature=0.0), 0, torch.device("cpu"))
    assert greedy_generate(hf, prompt, NEW_TOKENS) == generator.run(prompt, NEW_TOKENS).tokens


@needs_make
def test_make_sample_of_the_export_prints_transformers_greedy_text(exported) -> None:
    _, _, export_dir = exported
    hf, _ = load_hf(export_dir)
    tokens = greedy_generate(hf, AutoTokenizer.from_pretrained(export_dir)(PROMPT).input_ids, NEW_TOKENS)
    result = make("sample", f"RUN_DIR={export_dir}", f"PROMPT={PROMPT}", f"TOKENS={NEW_TOKENS}", "TEMPERATURE=0")
    assert result.returncode == 0, result.stderr
    assert result.stdout == printable(PROMPT) + printable(ByteCodec(256).stream(tokens)) + "\n"


def test_swapping_two_rope_rows_in_the_mapping_breaks_parity(tmp_path: Path, monkeypatch) -> None:
    """The parity test can fail: a mapping that swaps the two rows of one rotary pair in the shared rope key
    (the last rows of kv_a_proj_with_mqa) loads without complaint and computes other logits."""
    cfg, model, run = saved_run(tmp_path, "v3-q-lora")
    rope = cfg.model.kv_lora_rank  # the first rope row
    faithful = hf_deepseek.block_to_hf

    def perturbed(block: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = faithful(block)
        weight = out["self_attn.kv_a_proj_with_mqa.weight"].clone()
        weight[[rope, rope + 1]] = weight[[rope + 1, rope]]
        return out | {"self_attn.kv_a_proj_with_mqa.weight": weight}

    monkeypatch.setattr(hf_deepseek, "block_to_hf", perturbed)
    export(run, tmp_path / "export")
    hf, info = load_hf(tmp_path / "export")
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tokens = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(tokens) - hf(tokens).logits).abs().max().item() > 1e-3


def test_sharded_export_has_an_index_and_loads_the_same(tmp_path: Path) -> None:
    _cfg, model, run = saved_run(tmp_path, "v3")
    export(run, tmp_path / "export", shard="40KB")
    index = json.loads((tmp_path / "export" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (tmp_path / "export" / "model.safetensors").exists()
    sizes = [(tmp_path / "export" / name).stat().st_size for name in shards]
    largest_tensor = max(v.numel() * v.element_size() for v in model.state_dict().values())
    assert max(sizes) < max(40_000, largest_tensor) + 4096  # a shard holds at most SHARD bytes (plus its header)
    tensors = _hf_tensors(tmp_path / "export")
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert sorted(index["weight_map"]) == sorted(tensors)
    hf, _ = load_hf(tmp_path / "export")
    tokens = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        assert (model(tokens) - hf(tokens).logits).abs().max().item() < 1e-5


def _hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors |= load_file(file)
    return tensors


def test_bf16_export_keeps_the_routing_bias_in_fp32_and_says_so_in_config(tmp_path: Path) -> None:
    _, model, run = saved_run(tmp_path, "v3")
    export(run, tmp_path / "export", dtype="bf16")
    tensors = _hf_tensors(tmp_path / "export")
    assert {t.dtype for k, t in tensors.items() if not k.endswith("e_score_correction_bias")} == {torch.bfloat16}
    assert {t.dtype for k, t in tensors.items() if k.endswith("e_score_correction_bias")} == {torch.float32}
    assert json.loads((tmp_path / "export" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    hf, _ = load_hf(tmp_path / "export")
    tokens = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model(tokens), rtol=0.05, atol=0.05)


def test_mtp_module_follows_deepseeks_layout(tmp_path: Path) -> None:
    """model.layers.{N}: enorm, hnorm, eh_proj (embedding columns first), shared_head, and copies of the
    embedding and head, as DeepSeek-V3's checkpoints hold it and vLLM's MTP drafting reads it."""
    cfg, model, run = saved_run(tmp_path, "v3")
    export(run, tmp_path / "export")
    tensors, state, dim, n = _hf_tensors(tmp_path / "export"), model.state_dict(), cfg.model.dim, cfg.model.n_layers
    assert torch.equal(tensors[f"model.layers.{n}.eh_proj.weight"][:, :dim], state["mtp.0.proj.weight"][:, dim:])
    assert torch.equal(tensors[f"model.layers.{n}.eh_proj.weight"][:, dim:], state["mtp.0.proj.weight"][:, :dim])
    assert torch.equal(tensors[f"model.layers.{n}.enorm.weight"], state["mtp.0.embed_norm.weight"])
    assert torch.equal(tensors[f"model.layers.{n}.hnorm.weight"], state["mtp.0.hidden_norm.weight"])
    assert torch.equal(tensors[f"model.layers.{n}.shared_head.norm.weight"], state["mtp.0.norm.weight"])
    assert torch.equal(tensors[f"model.layers.{n}.shared_head.head.weight"], state["head.weight"])
    assert torch.equal(tensors[f"model.layers.{n}.embed_tokens.weight"], state["embed.weight"])
    assert torch.equal(tensors[f"model.layers.{n}.self_attn.kv_b_proj.weight"], state["mtp.0.block.attn.wkv_b.weight"])


def test_provenance_names_the_source_by_relative_path_only(tmp_path: Path) -> None:
    _, _, run = saved_run(tmp_path, "llama-gqa")
    export(run, tmp_path / "out" / "export")
    record = json.loads((tmp_path / "out" / "export" / "torchrig.json").read_text())
    assert record["source"]["run"] == "../../run" and record["source"]["step"] == 3 and record["dtype"] == "fp32"
    everything = "".join(p.read_text(errors="replace") for p in (tmp_path / "out" / "export").glob("*.json"))
    assert str(tmp_path) not in everything


def test_softmax_routing_with_norm_topk_prob_exports_with_a_caveat(tmp_path: Path) -> None:
    """transformers' DeepseekV2 ignores norm_topk_prob (hf.md 0.2): the export says so rather than hide it."""
    _, _, run = saved_run(tmp_path, "v2-yarn", "model.norm_topk_prob=true")
    done = export(run, tmp_path / "export")
    assert any("ignores norm_topk_prob" in caveat for caveat in done["caveats"])
    assert any("softmax-scale correction" in caveat for caveat in done["caveats"])


def test_a_forced_export_over_an_older_one_keeps_the_users_files(tmp_path: Path) -> None:
    _, _, run = saved_run(tmp_path, "v3")
    export(run, tmp_path / "out", shard="40KB")
    (tmp_path / "out" / "notes.txt").write_text("mine")
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    with pytest.raises(ExportError, match=r"is not empty; .* set FORCE=1"):
        export(run, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before  # nothing written
    export(run, tmp_path / "out", force=True)  # unsharded now: the old shards and index go
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "notes.txt" in names and "model.safetensors" in names
    assert not [n for n in names if n.startswith("model-") or n.endswith(".index.json") or n.startswith(".")]


@pytest.mark.skipif(V5, reason="transformers 5.x applies the correction itself (hf.md 0.1)")
def test_transformers_4_v2_lacks_the_yarn_softmax_correction(tmp_path: Path) -> None:
    """What add_v2_yarn_correction repairs is real: without it, 4.57's V2 computes other logits."""
    _, model, run = saved_run(tmp_path, "v2-yarn")
    export(run, tmp_path / "export")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32).eval()
    tokens = torch.randint(0, 256, (1, 48))
    with torch.no_grad():
        assert (model(tokens) - hf(tokens).logits).abs().max().item() > 1e-3


@needs_make
def test_make_export_takes_shard_and_refuses_a_bad_one_in_one_line(tmp_path: Path) -> None:
    _, _, run = saved_run(tmp_path, "llama-gqa")
    done = make("export", f"RUN_DIR={run}", f"OUTPUT={tmp_path / 'out'}", "SHARD=30KB")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file() and "(llama: " in done.stdout
    bad = make("export", f"RUN_DIR={run}", f"OUTPUT={tmp_path / 'other'}", "SHARD=lots")
    assert bad.returncode == 2 and not (tmp_path / "other").exists()
    assert tool_lines(bad) == [
        "torchrig export: SHARD='lots' is not a size; give e.g. 5GB (the default), 500MB or 2GiB"
    ], bad.stderr


@needs_make
def test_make_eval_of_an_export_uses_the_runs_sample_length(tmp_path: Path) -> None:
    _, model, run = saved_run(tmp_path, "v3")
    export(run, tmp_path / "export")
    text = tmp_path / "text.txt"
    text.write_text("for i in range(10):\n    print(i)\n" * 12)
    result = make("eval", f"RUN_DIR={tmp_path / 'export'}", f"DATA={text}")
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "export" / "eval.json").read_text())
    data = torch.tensor(list(text.read_bytes() + b"\0"))
    windows = (len(data) - 1) // 32  # data.seq_len=32, as the run trained (torchrig.json)
    inputs = torch.stack([data[i * 32 : i * 32 + 32] for i in range(windows)])
    targets = torch.stack([data[i * 32 + 1 : i * 32 + 33] for i in range(windows)])
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(inputs).flatten(0, 1), targets.flatten()).item()
    assert record["samples"] == windows and record["step"] == 3
    assert record["val_loss"] == pytest.approx(loss, rel=1e-5)
