"""The dense Llama family (train/models/llama.py) through every seam: counts and FLOPs, its one-line
config errors, DDP equal to one process, FSDP2, cached decoding and `make sample`, `make eval`,
export, and transformers' LlamaForCausalLM computing the same logits from the same weights."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tests.helpers.make import make, needs_make
from tests.helpers.paths import ROOT
from tests.helpers.sampling import save_checkpoint, trained_in_process
from tests.helpers.trainrun import assert_states_equal, fsdp2_runs_here, losses, metrics
from train.config import RunConfig
from train.config_keys import field_docs
from train.config_loader import load_config
from train.errors import ConfigError
from train.export import export
from train.models import build_model, count_params, flops_per_token, get_spec
from train.models.llama import LlamaConfig
from train.sample import ByteCodec, Generator, SampleError, Sampling, printable
from train.sample import main as sample_main
from train.trainer import train
from train.weights import build_loaded_model, load_model_weights

# llama-tiny made smaller still for two busy CPU cores: a fraction of a second per step.
SMALL = [
    "model.dim=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.inter_dim=128",
    "model.max_seq_len=64",
    "data.seq_len=32",
    "train.precision=fp32",
    "train.log_every=1",
    "train.warmup_steps=2",
    "data.num_workers=0",
]
STEPS = 12
# Evaluation at the last step, and a checkpoint there, for make eval, make sample and export to read.
AT_THE_END = [f"train.eval_every={STEPS}", "train.eval_batches=2", f"train.ckpt_every={STEPS}"]


def small_llama(*overrides: str) -> RunConfig:
    return load_config("llama-tiny", [*SMALL, *overrides])


def launch_llama(run_dir: Path, gpus: int, steps: int, *overrides: str) -> subprocess.CompletedProcess:
    """A llama-tiny run launched as `make train` launches it (train.launch: torchrun's launcher, gloo on CPU)."""
    command = [
        sys.executable, "-m", "train.launch", "--gpus", str(gpus), "--config", "llama-tiny", "--run-dir", str(run_dir),
        "--steps", str(steps), "--max-restarts", "0", *SMALL, *overrides,
    ]  # fmt: skip
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=280)


def logits_of(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(tokens)


# ---------------------------------------------------------------------------------------------
# Counts, FLOPs, config checks


@pytest.mark.parametrize(
    "overrides",
    [[], ["model.tie_embeddings=true"], ["model.n_kv_heads=1"], ["model.n_kv_heads=4"]],
    ids=["gqa", "tied", "mqa", "mha"],
)
def test_count_params_matches_the_built_model(overrides: list[str]) -> None:
    cfg = load_config("llama-tiny", overrides).model
    model = build_model(cfg)
    counts = count_params(cfg)
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert counts.embedding == cfg.vocab_size * cfg.dim
    # The output head counts as active, tied or not; the embedding lookup does not.
    head = cfg.vocab_size * cfg.dim
    assert counts.active == counts.total - counts.embedding + (head if cfg.tie_embeddings else 0)
    assert ("head.weight" in model.state_dict()) is not cfg.tie_embeddings
    assert not any(key.startswith("rope_") for key in model.state_dict())  # derived, never checkpointed


def test_llama_124m_is_gpt2_small_sized() -> None:
    cfg = load_config("llama-124m").model
    with torch.device("meta"):  # counted without allocating 0.5 GB
        model = build_model(cfg)
    assert count_params(cfg).total == sum(p.numel() for p in model.parameters())
    # GPT-2 small: 124M parameters with its tied 50257 x 768 embedding.
    assert count_params(cfg).total == pytest.approx(124e6, rel=0.01)
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.tie_embeddings) == (768, 12, 12, 4, True)


def counted_training_flops(model: torch.nn.Module, *inputs: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        model(*inputs).backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("changes", [{}, {"tie_embeddings": True}, {"n_kv_heads": 1}, {"n_kv_heads": 4}])
def test_flops_per_token_matches_torchs_flop_counter(changes: dict) -> None:
    cfg = dataclasses.replace(small_llama().model, **changes)
    torch.manual_seed(0)
    model = build_model(cfg)
    batch, seq_len = 2, 16
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1))
    # The math kernel runs attention as plain matmuls, which the counter sees in full.
    with sdpa_kernel(SDPBackend.MATH):
        counted = counted_training_flops(model, tokens[:, :-1], tokens[:, 1:])
    assert flops_per_token(cfg, seq_len) * batch * seq_len == pytest.approx(counted, rel=0.01)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.n_kv_heads=3", r"model.n_heads=4 is not a multiple of model.n_kv_heads=3 .*use a divisor of n_heads"),
        ("model.dim=130", r"model.dim=130 is not a multiple of model.n_heads=4"),
        ("model.dim=12", r"model.dim / model.n_heads = 3 must be even \(RoPE"),
        ("model.n_kv_heads=0", r"model.n_kv_heads=0 must be at least 1"),
        ("model.inter_dim=0", r"model.inter_dim=0 must be at least 1"),
        ("model.n_layers=5000", r"model.n_layers=5000 exceeds 4096"),
        ("model.max_seq_len=2000000", r"model.max_seq_len=2000000 exceeds 1,048,576"),
        ("model.rope_theta=0", r"model.rope_theta=0.0 must be more than 0"),
        ("model.norm_eps=-1e-5", r"model.norm_eps=-1e-05 must be more than 0"),
        ("model.init_std=-1", r"model.init_std=-1.0 must be 0 or more"),
        ("model.mtp_depth=1", r"model.arch=llama has no such key\); it is a key of model.arch=deepseek"),
    ],
)
def test_bad_shapes_are_one_line_config_errors(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config("llama-tiny", [override])
    assert re.search(message, str(caught.value)) and "\n" not in str(caught.value), str(caught.value)


def test_every_key_has_a_docstring_for_make_keys() -> None:
    docs = field_docs(LlamaConfig)
    assert all(docs.get(f.name) for f in dataclasses.fields(LlamaConfig)), set(map(str, docs))


def test_future_tokens_do_not_change_earlier_logits() -> None:
    torch.manual_seed(0)
    model = build_model(small_llama().model).eval()
    tokens = torch.randint(0, 256, (2, 20))
    changed = tokens.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % 256
    torch.testing.assert_close(logits_of(model, changed)[:, :12], logits_of(model, tokens)[:, :12])
    assert not torch.allclose(logits_of(model, changed)[:, 12:], logits_of(model, tokens)[:, 12:])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_in_process(tmp_path: Path, precision: str) -> None:
    cfg = small_llama(f"train.precision={precision}", "train.steps=3", "train.micro_batch=2")
    summary = train(cfg, tmp_path / precision)
    assert summary["precision"] == precision and summary["steps"] == 3
    assert math.isfinite(summary["final_loss"]) and summary["final_loss"] < summary["first_loss"] + 1.0


# ---------------------------------------------------------------------------------------------
# transformers' LlamaForCausalLM on the same weights (the map issue 17's export will write)

HF_NAMES = [
    (r"embed\.weight", r"model.embed_tokens.weight"),
    (r"layers\.(\d+)\.attn_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"layers\.(\d+)\.attn\.w([qkvo])\.weight", r"model.layers.\1.self_attn.\2_proj.weight"),
    (r"layers\.(\d+)\.ffn_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"layers\.(\d+)\.ffn\.w1\.weight", r"model.layers.\1.mlp.gate_proj.weight"),
    (r"layers\.(\d+)\.ffn\.w3\.weight", r"model.layers.\1.mlp.up_proj.weight"),
    (r"layers\.(\d+)\.ffn\.w2\.weight", r"model.layers.\1.mlp.down_proj.weight"),
    (r"norm\.weight", r"model.norm.weight"),
    (r"head\.weight", r"lm_head.weight"),
]


def hf_name(key: str) -> str:
    for pattern, replacement in HF_NAMES:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, replacement, key)
    raise KeyError(f"no transformers name for {key}")


def hf_config(cfg: LlamaConfig):
    from transformers import LlamaConfig as HFLlamaConfig

    return HFLlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.inter_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
    )


@pytest.mark.parametrize(
    "overrides",
    [["model.n_kv_heads=2"], ["model.n_kv_heads=1", "model.tie_embeddings=true", "model.rope_theta=500000"]],
    ids=["gqa", "mqa-tied-theta"],
)
def test_transformers_llama_gives_the_same_logits_from_the_same_weights(overrides: list[str]) -> None:
    import transformers  # a test dependency (hash-locked): never skipped

    cfg = small_llama(*overrides)
    model = trained_in_process(cfg, steps=3)  # norms and weights off their initial values
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(hf_config(cfg.model)).eval()
    mapped = {hf_name(key): value for key, value in model.state_dict().items()}
    missing, unexpected = reference.load_state_dict(mapped, strict=False)
    # Tied: transformers' lm_head is embed_tokens itself, so only its name is missing.
    assert missing == (["lm_head.weight"] if cfg.model.tie_embeddings else []) and unexpected == []
    if cfg.model.tie_embeddings:
        assert reference.lm_head.weight is reference.model.embed_tokens.weight
    tokens = torch.randint(0, cfg.model.vocab_size, (2, cfg.model.max_seq_len))
    with torch.no_grad():
        theirs = reference(tokens).logits
    ours = logits_of(model, tokens)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert ours.abs().max() > 0.1  # not a comparison of near-zero logits


# ---------------------------------------------------------------------------------------------
# Decoding with the KV cache


def test_cached_decoding_gives_the_full_forwards_logits_at_every_position() -> None:
    cfg = small_llama()
    model = trained_in_process(cfg).eval()
    tokens = torch.randint(0, 256, (2, cfg.model.max_seq_len))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(batch=2)
        steps = [model.forward_cached(tokens[:, :20], cache)[0]]
        steps.append(model.forward_cached(tokens[:, 20:23], cache)[0])  # several new positions at once
        steps += [model.forward_cached(tokens[:, i : i + 1], cache)[0] for i in range(23, tokens.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.position == cfg.model.max_seq_len


def test_the_cache_holds_grouped_keys_and_values_per_layer_and_rolls_back() -> None:
    cfg = small_llama().model
    model = build_model(cfg)
    cache = model.new_cache()
    head_dim = cfg.dim // cfg.n_heads
    assert len(cache.keys) == len(cache.values) == cfg.n_layers
    assert cache.keys[0].shape == cache.values[0].shape == (1, cfg.n_kv_heads, cfg.max_seq_len, head_dim)
    assert cache.bytes_per_token() == cfg.n_layers * cfg.n_kv_heads * 2 * head_dim * 4
    line = cache.describe()
    assert line.startswith(f"KV cache per token: {cache.bytes_per_token():,} bytes (")
    assert f"vs {cfg.n_layers * cfg.n_heads * 2 * head_dim * 4:,} bytes for full keys and values" in line
    with torch.no_grad():
        model.forward_cached(torch.zeros(1, 5, dtype=torch.long), cache)
    cache.rollback(3)
    assert cache.position == 3
    with pytest.raises(ValueError, match="cannot roll back"):
        cache.rollback(4)
    assert get_spec("llama").decoder(model) is model and not model.can_draft


# ---------------------------------------------------------------------------------------------
# Runs: one process, two DDP ranks, two FSDP2 ranks; then eval, sample and export of the run


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("llama-one") / "run"
    result = launch_llama(run_dir, 1, STEPS, "train.micro_batch=6", *AT_THE_END)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def trained_model(one_process: Path) -> torch.nn.Module:
    model, config, step = build_loaded_model(one_process, torch.device("cpu"))
    assert step == STEPS and config["model"]["arch"] == "llama"
    return model


@pytest.mark.slow
def test_two_ddp_ranks_equal_one_process_with_the_same_global_batch(one_process: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "ddp"
    result = launch_llama(run_dir, 2, STEPS, "train.micro_batch=3", *AT_THE_END)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(losses(run_dir)) == STEPS
    assert losses(run_dir) == pytest.approx(losses(one_process), rel=1e-6)
    two, _, _ = load_model_weights(run_dir)
    one, _, _ = load_model_weights(one_process)
    assert_states_equal(two, one, exact=False)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["flops_per_sample"] == get_spec("llama").flops_per_sample(small_llama().model, 32)


@pytest.mark.slow
@pytest.mark.skipif(
    not fsdp2_runs_here(),
    reason="FSDP2's forward needs CUDA streams on torch < 2.6; make test-current runs this on current torch",
)
def test_fsdp2_trains_and_its_checkpoint_exports(one_process: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "fsdp"
    result = launch_llama(run_dir, 2, STEPS, "train.micro_batch=3", "train.strategy=fsdp", *AT_THE_END)
    assert result.returncode == 0, result.stderr[-3000:]
    trained = losses(run_dir)
    assert len(trained) == STEPS and all(math.isfinite(loss) for loss in trained)
    assert trained[-1] < trained[0] - 0.5  # byte-level loss starts near ln(256) = 5.5
    assert trained == pytest.approx(losses(one_process), rel=1e-5)
    # The sharded (DCP) checkpoint reads in one process and exports like a DDP one.
    export(run_dir, tmp_path / "export")
    loaded, _, step = build_loaded_model(tmp_path / "export", torch.device("cpu"))
    assert step == STEPS and torch.isfinite(logits_of(loaded, torch.randint(0, 256, (1, 16)))).all()


def test_greedy_tokens_with_the_cache_equal_recomputing_past_a_window_slide(trained_model) -> None:
    generator = Generator(trained_model, Sampling(temperature=0.0), seed=0, device=torch.device("cpu"))
    prompt = ByteCodec(256).encode("import os\ndef main(")
    cached = generator.run(prompt, 80, cache=True)
    uncached = generator.run(prompt, 80, cache=False)
    assert len(cached.tokens) == 80 and cached.tokens == uncached.tokens
    assert cached.windows >= 1  # max_seq_len 64: the context slid and the cache was rebuilt


@needs_make
def test_make_sample_of_a_llama_run_streams_the_greedy_text(one_process: Path, trained_model) -> None:
    prompt = "def main("
    result = make("sample", f"RUN_DIR={one_process}", f"PROMPT={prompt}", "TOKENS=70", "TEMPERATURE=0")
    assert result.returncode == 0, result.stderr
    generator = Generator(trained_model, Sampling(temperature=0.0), seed=0, device=torch.device("cpu"))
    tokens = generator.run(ByteCodec(256).encode(prompt), 70).tokens
    assert result.stdout == printable(prompt) + printable(ByteCodec(256).stream(tokens)) + "\n"
    found = re.search(r"KV cache per token: ([\d,]+) bytes", result.stderr)
    assert found and int(found.group(1).replace(",", "")) == trained_model.new_cache().bytes_per_token()
    assert "model.arch=llama" in result.stderr and re.search(r"70 tokens in .* [1-9]\d* window slides", result.stderr)


def test_speculation_on_a_llama_run_is_refused_in_one_line(one_process: Path) -> None:
    with pytest.raises(SampleError, match=r"cannot draft \(model\.arch=llama.*drop SPECULATE=1"):
        sample_main(["--run-dir", str(one_process), "--speculate", "1", "--tokens", "3"])


@needs_make
def test_make_eval_of_a_llama_run_gives_the_logged_validation_loss(one_process: Path) -> None:
    result = make("eval", f"RUN_DIR={one_process}")
    assert result.returncode == 0, result.stderr
    record = json.loads((one_process / "eval.json").read_text())
    logged = metrics(one_process)[-1]
    assert record["step"] == STEPS and record["val_loss"] == pytest.approx(logged["val_loss"], rel=1e-6)
    assert record["val_bpb"] == pytest.approx(record["val_loss"] / math.log(2))  # bytes: one byte a token


def test_an_export_of_a_trained_run_gives_bit_identical_logits(one_process: Path, trained_model, tmp_path) -> None:
    export(one_process, tmp_path / "export")
    loaded, config, step = build_loaded_model(tmp_path / "export", torch.device("cpu"))
    assert step == STEPS and config["model"] == small_llama().to_dict()["model"]
    tokens = torch.randint(0, 256, (2, 64))
    assert torch.equal(logits_of(loaded, tokens), logits_of(trained_model, tokens))


def test_a_tied_model_exports_one_embedding_and_round_trips_exactly(tmp_path: Path) -> None:
    cfg = small_llama("model.tie_embeddings=true")
    model = trained_in_process(cfg)
    save_checkpoint(tmp_path / "run", model, cfg, step=2)
    export(tmp_path / "run", tmp_path / "export")
    state, _, _ = load_model_weights(tmp_path / "export")
    assert state.keys() == model.state_dict().keys() and "head.weight" not in state
    loaded, _, _ = build_loaded_model(tmp_path / "export", torch.device("cpu"))
    tokens = torch.randint(0, 256, (2, 40))
    assert torch.equal(logits_of(loaded, tokens), logits_of(model, tokens))
