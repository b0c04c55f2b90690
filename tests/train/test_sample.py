"""Sampling: MLA's absorbed latent-cache attention, greedy equality of the three decoding methods,
MTP speculation, the figures `make sample` prints, and its one-line refusals."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers.make import make, needs_make
from tests.helpers.paths import ROOT
from tests.helpers.sampling import (
    save_checkpoint,
    small_config,
    tool_lines,
    trained_in_process,
    write_export,
)
from tests.helpers.trainrun import launch_train
from train.config_loader import load_config
from train.models import build_model
from train.models.deepseek import MultiHeadLatentAttention, rope_cache
from train.sample import ByteCodec, Generator, SampleError, Sampling, make_codec, printable, window_start
from train.weights import build_loaded_model


@pytest.mark.parametrize("q_lora_rank", [0, 24])
def test_absorbed_attention_equals_plain_attention_at_one_position(q_lora_rank: int) -> None:
    cfg = load_config("tiny", [f"model.q_lora_rank={q_lora_rank}"]).model
    torch.manual_seed(0)
    attention = MultiHeadLatentAttention(cfg)
    for weight in attention.parameters():  # off the unit norms, so W_UK and W_UV matter everywhere
        torch.nn.init.normal_(weight, std=0.3)
    cos, sin = rope_cache(cfg.qk_rope_head_dim, cfg.max_seq_len, cfg.rope_theta)
    x = torch.randn(2, 11, cfg.dim)
    with torch.no_grad():
        plain = attention(x, cos, sin)[:, -1]
        latent = torch.zeros(2, cfg.max_seq_len, cfg.kv_lora_rank)
        rope_key = torch.zeros(2, cfg.max_seq_len, cfg.qk_rope_head_dim)
        attention.forward_absorbed(x[:, :10], cos, sin, latent, rope_key, 0)
        absorbed = attention.forward_absorbed(x[:, 10:], cos, sin, latent, rope_key, 10)[:, 0]
    torch.testing.assert_close(absorbed, plain, rtol=1e-5, atol=1e-5)
    assert plain.abs().max() > 1e-2  # not a comparison of two zeros


def test_cached_decoding_gives_the_full_forwards_logits_at_every_position() -> None:
    cfg = small_config()
    model = trained_in_process(cfg).eval()
    tokens = torch.randint(0, 256, (1, cfg.model.max_seq_len))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache()
        steps = [model.forward_cached(tokens[:, :20], cache)[0]]
        steps += [model.forward_cached(tokens[:, i : i + 1], cache)[0] for i in range(20, tokens.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.position == cfg.model.max_seq_len


def test_the_cache_holds_the_latent_and_rope_key_per_layer_and_rolls_back() -> None:
    cfg = small_config().model
    model = build_model(cfg)
    cache = model.new_cache()
    assert len(cache.latent) == len(cache.rope_key) == cfg.n_layers
    assert cache.latent[0].shape == (1, cfg.max_seq_len, cfg.kv_lora_rank)
    assert cache.rope_key[0].shape == (1, cfg.max_seq_len, cfg.qk_rope_head_dim)
    assert cache.bytes_per_token() == cfg.n_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    with torch.no_grad():
        model.forward_cached(torch.zeros(1, 5, dtype=torch.long), cache)
    cache.rollback(3)
    assert cache.position == 3
    with pytest.raises(ValueError, match="cannot roll back"):
        cache.rollback(4)


def test_the_window_slides_by_half_the_context_only_when_full() -> None:
    assert window_start(64, 0, 64) == 0
    assert window_start(65, 0, 64) == 33  # the newest 32 remain
    assert window_start(90, 33, 64) == 33
    assert window_start(200, 0, 64) == 168


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A `tiny` run (the test suite's small shape) trained 30 steps on the built-in corpus."""
    run_dir = tmp_path_factory.mktemp("sample") / "run"
    result = launch_train(run_dir, 1, 30, "train.ckpt_every=30")
    assert result.returncode == 0, result.stderr[-2000:]
    return run_dir


@pytest.fixture(scope="module")
def trained_model(trained_run):
    model, _, step = build_loaded_model(trained_run, torch.device("cpu"))
    assert step == 30
    return model


def corpus_prompt() -> list[int]:
    return ByteCodec(256).encode("import os\ndef main(")


def test_greedy_tokens_with_the_latent_cache_equal_recomputing_for_64_tokens(trained_model) -> None:
    generator = Generator(trained_model, Sampling(temperature=0.0), seed=0, device=torch.device("cpu"))
    cached = generator.run(corpus_prompt(), 64, cache=True)
    uncached = generator.run(corpus_prompt(), 64, cache=False)
    assert len(cached.tokens) == 64
    assert cached.tokens == uncached.tokens
    assert cached.windows >= 1  # max_seq_len 64: the sliding window was exercised too


def test_speculative_greedy_output_equals_plain_greedy_with_a_measured_acceptance(trained_model) -> None:
    generator = Generator(trained_model, Sampling(temperature=0.0), seed=0, device=torch.device("cpu"))
    plain = generator.run(corpus_prompt(), 64, cache=True)
    speculative = generator.run(corpus_prompt(), 64, speculate=True)
    assert speculative.tokens == plain.tokens
    assert speculative.drafts > 0
    assert 0.0 <= speculative.acceptance <= 1.0
    assert speculative.acceptance == speculative.accepted / speculative.drafts
    # Every accepted draft saves one main-model forward.
    assert speculative.main_forwards < plain.main_forwards or speculative.accepted == 0


def test_speculative_sampling_draws_the_same_tokens_as_plain_sampling(trained_model) -> None:
    """Every token is drawn from the main model's distribution, in order, from the same RNG."""
    sampling = Sampling(temperature=0.9, top_k=50, top_p=0.95)
    generator = Generator(trained_model, sampling, seed=7, device=torch.device("cpu"))
    assert generator.run(corpus_prompt(), 40, speculate=True).tokens == generator.run(corpus_prompt(), 40).tokens


def test_top_k_and_top_p_keep_only_the_likely_tokens() -> None:
    logits = torch.tensor([4.0, 3.0, 0.0, -1.0, -2.0])
    rng = torch.Generator().manual_seed(0)
    assert {Sampling(1.0, top_k=2).pick(logits, rng) for _ in range(200)} == {0, 1}
    # p(0) = 0.71, p(0)+p(1) = 0.97: top_p 0.9 keeps exactly the first two.
    assert {Sampling(1.0, top_p=0.9).pick(logits, rng) for _ in range(200)} == {0, 1}
    assert {Sampling(1.0, top_p=0.5).pick(logits, rng) for _ in range(50)} == {0}


def test_a_byte_level_bpe_tokenizer_encodes_the_prompt_and_streams_whole_characters(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["def main():\n    return 1\n", "café au lait, naïve"] * 20, trainer)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    codec = make_codec(tmp_path, {}, vocab_size=512)
    ids = codec.encode("def café():")
    assert codec.decode(ids) == "def café():"
    # Streamed one token at a time, the text never shows half of a two-byte character.
    pieces = [codec.stream([token]) for token in codec.tokenizer.encode("naïve café").ids]
    assert "".join(pieces) == "naïve café" and not any("\ufffd" in piece for piece in pieces)
    size = codec.tokenizer.get_vocab_size()
    with pytest.raises(SampleError, match=f"has {size} tokens but the model's vocabulary is 256"):
        make_codec(tmp_path, {}, vocab_size=256)


def test_model_output_cannot_drive_the_terminal() -> None:
    assert printable("ok\x1b[2J\rgone\x00\ttab\n") == "ok\ufffd[2J\ufffdgone\ufffd\ttab\n"


def sample_cli(run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "train.sample", "--run-dir", str(run_dir), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_printed_cache_figures_are_the_caches_bytes_per_token(trained_run, trained_model) -> None:
    result = sample_cli(trained_run, "--tokens", "3", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    found = re.search(r"KV cache per token: ([\d,]+) bytes latent .* vs ([\d,]+) bytes for full keys", result.stderr)
    assert found, result.stderr
    latent, naive = (int(group.replace(",", "")) for group in found.groups())
    cfg = trained_model.cfg
    assert latent == trained_model.new_cache().bytes_per_token()
    assert latent == cfg.n_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    assert naive == cfg.n_layers * cfg.n_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) * 4
    assert re.search(r"3 tokens in [\d.]+ s: [\d,.]+ tokens/s", result.stderr)


@needs_make
def test_make_sample_streams_the_text_and_prints_speculations_figures(trained_run) -> None:
    result = make(
        "sample", f"RUN_DIR={trained_run}", "PROMPT=-- def main(", "TOKENS=30", "TEMPERATURE=0", "SPECULATE=1"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("-- def main(")  # a prompt may begin with dashes
    found = re.search(r"speculation: (\d+) of (\d+) drafts accepted \(([\d.]+)%\)", result.stderr)
    assert found, result.stderr
    accepted, drafts, rate = int(found.group(1)), int(found.group(2)), float(found.group(3))
    assert 0 <= accepted <= drafts and math.isclose(rate, 100 * accepted / drafts, abs_tol=0.05)
    assert "tokens per main-model forward" in result.stderr and "train.benchmarks.sample" in result.stderr


@needs_make
def test_tokens_beyond_max_seq_len_slide_the_window_and_say_so(trained_run) -> None:
    result = make("sample", f"RUN_DIR={trained_run}", "TOKENS=100", "TEMPERATURE=0")
    assert result.returncode == 0, result.stderr
    assert "exceed max_seq_len=64: a sliding window" in result.stderr
    assert re.search(r"100 tokens in .* [1-9]\d* window slides", result.stderr)


def test_a_path_too_long_for_the_system_is_one_line() -> None:
    long = "/tmp/" + "a" * 5000
    result = subprocess.run(
        [sys.executable, "-m", "train.sample", "--run-dir", long], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("torchrig sample: ") and "too long" in lines[0]


# ---------------------------------------------------------------------------------------------
# Bad input: one line each, through the make target


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> dict[str, Path]:
    """Run and export directories that sampling must refuse, made without training."""
    root = tmp_path_factory.mktemp("bad")
    cfg = small_config()
    dirs = {name: root / name for name in ("empty", "bytes128", "no_mtp", "not_tokenizer", "word_level", "resnet")}
    dirs["empty"].mkdir()
    narrow = small_config("model.vocab_size=128")
    write_export(dirs["bytes128"], build_model(narrow.model), narrow.to_dict()["model"])
    dense = small_config("model.mtp_depth=0")
    write_export(dirs["no_mtp"], build_model(dense.model), dense.to_dict()["model"])
    write_export(dirs["not_tokenizer"], build_model(cfg.model), cfg.to_dict()["model"])
    (dirs["not_tokenizer"] / "tokenizer.json").write_text(json.dumps({"vocab": ["not", "a", "tokenizer"]}))
    write_export(dirs["word_level"], build_model(cfg.model), cfg.to_dict()["model"])
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = Tokenizer(models.WordLevel({"[UNK]": 0, "def": 1, "main": 2}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.save(str(dirs["word_level"] / "tokenizer.json"))
    resnet = load_config("resnet50")
    save_checkpoint(dirs["resnet"], torch.nn.Linear(2, 2), resnet, step=1)
    return dirs


BAD_SAMPLES = {
    "no checkpoint": ("empty", [], r"has no usable checkpoint"),
    "prompt byte outside a 128-byte vocabulary": (
        "bytes128",
        ["PROMPT=café"],
        r"PROMPT byte 0xc3 at offset 3 is outside",
    ),
    "prompt outside the tokenizer": (
        "word_level",
        ["PROMPT=def zebra"],
        r"PROMPT text 'zebra' is outside the tokenizer",
    ),
    "a tokenizer file that is not one": ("not_tokenizer", [], r"tokenizer\.json is not a tokenizer\.json \("),
    "a ResNet run": (
        "resnet",
        [],
        r"holds a resnet50 run, an image classifier; sampling needs a model family with a decoder",
    ),
    "TOP_P of 0": ("bytes128", ["TOP_P=0"], r"TOP_P=0 is out of range; TOP_P must be in \(0, 1\]"),
    "TOP_P above 1": ("bytes128", ["TOP_P=1.5"], r"TOP_P=1.5 is out of range"),
    # make's own check of a count or a real catches these before the sampler starts.
    "TOP_K negative": ("bytes128", ["TOP_K=-3"], r"TOP_K '-3' is not a whole number"),
    "TOP_K not a number": ("bytes128", ["TOP_K=many"], r"TOP_K 'many' is not a whole number"),
    "TEMPERATURE negative": ("bytes128", ["TEMPERATURE=-1"], r"TEMPERATURE=-1 is out of range"),
    "TEMPERATURE not finite": ("bytes128", ["TEMPERATURE=inf"], r"TEMPERATURE 'inf' is not a finite"),
    "TOKENS zero": ("bytes128", ["TOKENS=0"], r"TOKENS=0 is out of range"),
    "TOKENS past any sample": ("bytes128", ["TOKENS=10000000000"], r"TOKENS=10000000000 is out of range.*1,000,000"),
    "SPECULATE without the cache": (
        "bytes128",
        ["SPECULATE=1", "CACHE=0"],
        r"SPECULATE=1 verifies drafts with the cache",
    ),
    "SPECULATE without an MTP module": (
        "no_mtp",
        ["SPECULATE=1"],
        r"cannot draft \(model\.arch=deepseek; a deepseek model needs model\.mtp_depth >= 1\)",
    ),
}


@needs_make
@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_SAMPLES))
def test_bad_sampling_input_is_one_line(bad_inputs, case: str) -> None:
    name, variables, expected = BAD_SAMPLES[case]
    tokens = [] if any(v.startswith("TOKENS=") for v in variables) else ["TOKENS=5"]
    result = make("sample", f"RUN_DIR={bad_inputs[name]}", *variables, *tokens)
    lines = tool_lines(result)
    assert result.returncode != 0
    assert len(lines) == 1 and lines[0].startswith(("torchrig sample: ", "torchrig make: ")), result.stderr
    assert re.search(expected, lines[0]), lines[0]
    assert result.stdout == ""


# ---------------------------------------------------------------------------------------------
# A trained model writes text, not noise


def held_out_bytes() -> bytes:
    """Python source the built-in corpus (the standard library) does not hold: this repository's own."""
    files = sorted((ROOT / "train").glob("*.py")) + sorted((ROOT / "env").rglob("*.py"))
    return b"\x00".join(path.read_bytes() for path in files)


def unigram_bits_per_byte(corpus: np.ndarray, text: bytes) -> float:
    """Cross-entropy of `text` under the corpus's byte frequencies (add-one smoothed), in bits per byte."""
    counts = np.bincount(corpus, minlength=256).astype(np.float64) + 1
    log_p = np.log2(counts / counts.sum())
    return float(-log_p[np.frombuffer(text, dtype=np.uint8)].mean())


def model_bits_per_byte(model: torch.nn.Module, text: bytes, windows: int) -> float:
    length = model.cfg.max_seq_len + 1
    data = torch.frombuffer(bytearray(text[: windows * length]), dtype=torch.uint8).long().view(windows, length)
    with torch.no_grad():
        logits = model(data[:, :-1])
    nats = torch.nn.functional.cross_entropy(logits.flatten(0, 1), data[:, 1:].flatten())
    return float(nats) / math.log(2)


@pytest.mark.slow
@pytest.mark.timeout(900)  # a couple of minutes on two free cores; a busy machine may take longer
def test_tiny_trained_300_steps_beats_the_byte_frequency_baseline_on_held_out_text(tmp_path: Path) -> None:
    from train.data import build_corpus, read_token_file

    run_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "train.launch", "--gpus", "1", "--config", "tiny", "--run-dir", str(run_dir),
        "--steps", "300", "train.precision=fp32", "train.micro_batch=4", "data.seq_len=64", "train.log_every=50",
        "train.ckpt_every=300", "data.num_workers=0",
    ]  # fmt: skip
    # Its own session, so that a timeout ends the launcher's workers too, not only the launcher.
    # One intra-op thread: the matrices are small, and on a shared machine idle threads spin for the busy one.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        _, stderr = job.communicate(timeout=840)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        job.communicate()
        raise
    assert job.returncode == 0, stderr.decode(errors="replace")[-2000:]
    model, _, _ = build_loaded_model(run_dir, torch.device("cpu"))

    text = held_out_bytes()
    corpus, _ = read_token_file(build_corpus())
    baseline = unigram_bits_per_byte(np.asarray(corpus), text)
    learned = model_bits_per_byte(model, text, windows=min(64, len(text) // (model.cfg.max_seq_len + 1)))
    assert learned < baseline, f"model {learned:.2f} bits/byte vs unigram {baseline:.2f}"

    # And what it writes reads like text: mostly printable ASCII, where random bytes are 38% so.
    generator = Generator(model, Sampling(temperature=0.8), seed=1, device=torch.device("cpu"))
    written = bytes(generator.run(ByteCodec(256).encode("import "), 200).tokens)
    printable_share = sum(32 <= b < 127 or b in (9, 10) for b in written) / len(written)
    assert printable_share > 0.75, written
