"""The tokenizer files of an export: the byte tokenizer in `tokenizers`' own terms (ids 0-255 are the bytes), and
a BPE run's own tokenizer with its end-of-text token as eos, both loading in AutoTokenizer and generating what
`make sample` prints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.helpers.hf_models import greedy_generate, torchrig_model, variant_config
from tests.helpers.make import make, needs_make
from tests.helpers.sampling import save_checkpoint
from train.export import export
from train.hf.tokenizer_files import byte_alphabet, byte_tokenizer, is_byte_tokenizer
from train.sample import ByteCodec, printable
from train.tokenizer import END_OF_TEXT, train_bpe

SAMPLES = [
    "hello world",
    "naïve café – ☃ 日本語 🙂",
    "tabs\tand\nnewlines  ",
    "\x00NUL inside\x00",
    "<0x00> literal",
    "",
]


def test_the_byte_tokenizer_keeps_every_byte_its_own_id() -> None:
    tokenizer = Tokenizer.from_str(byte_tokenizer())
    assert tokenizer.get_vocab_size() == 256
    assert [tokenizer.token_to_id(byte_alphabet()[b]) for b in range(256)] == list(range(256))
    for text in SAMPLES:
        assert tokenizer.encode(text, add_special_tokens=False).ids == list(text.encode("utf-8"))
        assert tokenizer.encode(text).ids == [0, *text.encode("utf-8")]  # the separator first, as make sample
        assert tokenizer.decode(list(text.encode("utf-8")), skip_special_tokens=False) == text
    assert set(byte_alphabet().values()) == set(__import__("tokenizers").pre_tokenizers.ByteLevel.alphabet())


def test_autotokenizer_of_a_byte_export_round_trips_text(tmp_path: Path) -> None:
    cfg = variant_config("llama-gqa")
    save_checkpoint(tmp_path / "run", torchrig_model(cfg), cfg, step=1)
    export(tmp_path / "run", tmp_path / "export")
    assert is_byte_tokenizer(tmp_path / "export" / "tokenizer.json")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "export")
    assert type(tokenizer).__name__ in ("PreTrainedTokenizerFast", "TokenizersBackend") and len(tokenizer) == 256
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 0, 0)
    for text in SAMPLES[:3]:
        assert tokenizer(text).input_ids == ByteCodec(256).encode(text)
        assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text
    generation = json.loads((tmp_path / "export" / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}


def bpe_run(tmp_path: Path) -> tuple[Path, torch.nn.Module, Tokenizer]:
    """A llama run on a BPE of 300 tokens: its checkpoint and tokenizer.json in the run directory, as training
    records them."""
    texts = ["def main():\n    return compute(value)\n", "import os\nprint(os.getcwd())\n"] * 50
    tokenizer = train_bpe(texts, 300)
    cfg = variant_config("llama-gqa", "model.vocab_size=300")
    model = torchrig_model(cfg)
    save_checkpoint(tmp_path / "run", model, cfg, step=1)
    tokenizer.save(str(tmp_path / "run" / "tokenizer.json"))
    return tmp_path / "run", model, tokenizer


def test_a_bpe_export_carries_the_runs_tokenizer_with_its_end_of_text_as_eos(tmp_path: Path) -> None:
    run, _, tokenizer = bpe_run(tmp_path)
    export(run, tmp_path / "export")
    assert (tmp_path / "export" / "tokenizer.json").read_bytes() == (run / "tokenizer.json").read_bytes()
    assert not is_byte_tokenizer(tmp_path / "export" / "tokenizer.json")
    hf = AutoTokenizer.from_pretrained(tmp_path / "export")
    end = tokenizer.token_to_id(END_OF_TEXT)
    assert hf.eos_token == END_OF_TEXT and hf.eos_token_id == end and len(hf) == tokenizer.get_vocab_size()
    text = "def main():\n    print(value)\n"
    assert hf(text).input_ids == tokenizer.encode(text).ids
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (end, end, end)


@needs_make
def test_make_sample_of_a_bpe_export_prints_transformers_greedy_text(tmp_path: Path) -> None:
    run, _, _ = bpe_run(tmp_path)
    export(run, tmp_path / "export")
    prompt = "def main("
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "export")
    tokens = greedy_generate(hf, tokenizer(prompt).input_ids, 16)
    result = make("sample", f"RUN_DIR={tmp_path / 'export'}", f"PROMPT={prompt}", "TOKENS=16", "TEMPERATURE=0")
    assert result.returncode == 0, result.stderr
    assert result.stdout == printable(prompt + tokenizer.decode(tokens)) + "\n"


def test_a_transformers_directorys_tokenizer_files_are_kept_on_export(tmp_path: Path) -> None:
    run, _, _ = bpe_run(tmp_path)
    export(run, tmp_path / "first")
    config = json.loads((tmp_path / "first" / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}"
    (tmp_path / "first" / "tokenizer_config.json").write_text(json.dumps(config))
    export(tmp_path / "first", tmp_path / "second")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert json.loads((tmp_path / "second" / name).read_text()) == json.loads(
            (tmp_path / "first" / name).read_text()
        )
    shutil.rmtree(tmp_path / "first")
    assert AutoTokenizer.from_pretrained(tmp_path / "second").chat_template == config["chat_template"]
