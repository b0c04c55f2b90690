"""Chat and instruction data (train/data/chat.py): conversations rendered as transformers renders them, a mask over
exactly the assistant's tokens, whole conversations packed into windows, bad records one line; and training on it:
the loss over the learned tokens only, the same on 2 ranks as in one process, falling, and evaluated by the same rule.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.helpers.chat_data import (
    BOS,
    CHATML_TEMPLATE,
    CHATML_TOKENS,
    EOS,
    conversations,
    write_chat_tokenizer,
    write_jsonl,
    write_tiny_v2,
)
from tests.helpers.commands import one_line_error, run_module
from tests.helpers.paths import ROOT
from tests.helpers.trainrun import SMALL, launch_train, metrics
from train.config_loader import load_config
from train.data import build_dataset, read_token_file
from train.data.chat import ChatRenderer, Conversation, conversation, find_template
from train.data.tokens import read_mask
from train.errors import DataError
from train.models import build_model
from train.models.loss import IGNORE_INDEX, counted_targets
from train.prepare import prepare

SEQ_LEN = 64


@pytest.fixture(scope="module")
def v2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny DeepSeek-V2 checkpoint with DeepSeek-V2-Chat's template (tests/helpers/chat_data.py)."""
    return write_tiny_v2(tmp_path_factory.mktemp("v2") / "hf")


@pytest.fixture(scope="module")
def chatml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_chat_tokenizer(tmp_path_factory.mktemp("chatml") / "tok", CHATML_TEMPLATE, CHATML_TOKENS)


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return conversations(48)


def messages_of(record: dict) -> list[dict]:
    if "messages" in record:
        return record["messages"]
    return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]


def prepared(folder: Path, tokenizer: Path, records: list[dict], *, seq_len: int = SEQ_LEN, **options) -> Path:
    output = folder / "data" / "chat.bin"
    prepare([str(write_jsonl(folder / "chat.jsonl", records))], str(output), str(tokenizer), seq_len=seq_len, **options)
    return output


def template_ids(hf: Any, messages: list[dict]) -> list[int]:
    """AutoTokenizer's apply_chat_template ids: a list in transformers 4, the input_ids of a BatchEncoding in 5."""
    out = hf.apply_chat_template(messages, tokenize=True)
    return list(out["input_ids"]) if not isinstance(out, list) else out


def stream_of(output: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    tokens, meta = read_token_file(output)
    return np.asarray(tokens).astype(np.int64), np.array(read_mask(output, meta)), meta  # copies: writable


# ------------------------------------------------------------------------------------------ rendering


@pytest.mark.parametrize("kind", ["v2", "chatml"])
def test_the_ids_are_transformers_apply_chat_template_s(kind: str, request, records, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    directory = request.getfixturevalue(kind)
    hf = AutoTokenizer.from_pretrained(directory)
    expected = [template_ids(hf, messages_of(r)) for r in records]
    tokenizer_json = (directory / "tokenizer.json").read_text()
    renderer = ChatRenderer(find_template(str(directory), None), tokenizer_json)
    for record, ids in zip(records, expected, strict=True):
        found = conversation(json.dumps(record).encode(), "x", 1)
        assert renderer.encode(found)[0].tolist() == ids
    # And in the prepared set: every conversation in input order, separated only by the end-of-document id.
    tokens, _, meta = stream_of(prepared(tmp_path, directory, records, procs=2))
    end = meta["tokenizer"]["end_of_document"]
    assert end == hf.convert_tokens_to_ids(hf.eos_token)
    position = 0
    for ids in expected:
        while tokens[position] == end:
            position += 1
        assert tokens[position : position + len(ids)].tolist() == ids
        position += len(ids)
    assert set(tokens[position:].tolist()) <= {end}


@pytest.mark.parametrize("decoder", [False, True])
def test_the_special_tokens_are_those_transformers_loads(v2: Path, tmp_path: Path, decoder: bool) -> None:
    """special_tokens_map.json overrides tokenizer_config.json only on transformers' legacy path (no
    added_tokens_decoder): the template must see the eos_token AutoTokenizer has."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    (tmp_path / "tokenizer.json").write_bytes((v2 / "tokenizer.json").read_bytes())
    config = json.loads((v2 / "tokenizer_config.json").read_text()) | {"eos_token": BOS}
    if decoder:
        vocabulary = Tokenizer.from_file(str(v2 / "tokenizer.json"))
        flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
        config["added_tokens_decoder"] = {str(vocabulary.token_to_id(t)): {"content": t, **flags} for t in (BOS, EOS)}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": EOS}))
    expected = AutoTokenizer.from_pretrained(tmp_path).eos_token
    assert expected == (BOS if decoder else EOS)
    assert dict(find_template(str(tmp_path), None).specials)["eos_token"] == expected


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of ones."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


@pytest.mark.parametrize(("kind", "closing"), [("v2", EOS), ("chatml", "<|im_end|>\n")])
def test_the_mask_covers_exactly_the_assistant_turns(kind: str, closing: str, request, records, tmp_path) -> None:
    from transformers import AutoTokenizer

    directory = request.getfixturevalue(kind)
    hf = AutoTokenizer.from_pretrained(directory)
    tokens, mask, meta = stream_of(prepared(tmp_path, directory, records))
    learned = [hf.decode(tokens[a:b].tolist()) for a, b in runs(mask)]
    # V2's generation prompt is "Assistant:", its turn "Assistant: " + content + eos: the space is the answer's.
    space = " " if kind == "v2" else ""
    turns = [space + m["content"] + closing for r in records for m in messages_of(r) if m["role"] == "assistant"]
    assert learned == turns
    assert meta["mask"]["learned"] == int(mask.sum()) == meta["tally"]["learned_tokens"]


def test_prompt_and_completion_as_message_lists_learn_the_completion_only(v2: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    record = {
        "prompt": [{"role": "user", "content": "Say stone 2 times."}, {"role": "assistant", "content": "stone stone"},
                   {"role": "user", "content": "Again."}],
        "completion": [{"role": "assistant", "content": "stone stone"}],
    }  # fmt: skip
    tokens, mask, _ = stream_of(prepared(tmp_path, v2, [record]))
    hf = AutoTokenizer.from_pretrained(v2)
    ids = template_ids(hf, record["prompt"] + record["completion"])
    assert tokens[: len(ids)].tolist() == ids
    assert [hf.decode(tokens[a:b].tolist()) for a, b in runs(mask)] == [" stone stone" + EOS]  # not the prompt's


# ------------------------------------------------------------------------------------------ packing


def test_conversations_are_packed_whole_into_windows_and_long_ones_truncated_or_dropped(v2: Path, tmp_path) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(v2)
    long_answer = {"messages": [{"role": "user", "content": "Say river 80 times."},
                                {"role": "assistant", "content": " ".join(["river"] * 80)}]}  # fmt: skip
    long_question = {"messages": [{"role": "user", "content": "Say " + "cloud " * 150},
                                  {"role": "assistant", "content": "no"}]}  # fmt: skip
    silent = {"messages": [{"role": "user", "content": "Nothing to answer."}]}
    records = [*conversations(20), long_answer, long_question, silent, *conversations(10, seed=3)]
    seq_len = SEQ_LEN  # every conversation of conversations() fits a window of 65 tokens
    output = prepared(tmp_path, v2, records, seq_len=seq_len)
    tokens, mask, meta = stream_of(output)
    assert (len(tokens) - 1) % seq_len == 0  # whole windows: none cut off at the end
    tally = meta["tally"]
    assert tally["conversations"] == len(records) and tally["no_assistant"] == 1
    assert tally["truncated"] == 1 and tally["too_long"] == 1 and tally["kept"] == len(records) - 2
    bos = hf.convert_tokens_to_ids(BOS)
    starts = np.flatnonzero(tokens == bos).tolist()
    assert len(starts) == tally["kept"]
    for start, end in zip(starts, [*starts[1:], len(tokens)], strict=True):
        window = start // seq_len
        body = end - 1
        while tokens[body] == hf.eos_token_id and body > start and not mask[body]:  # the padding after it
            body -= 1
        assert body <= window * seq_len + seq_len, (start, body)  # within the window the conversation starts in
        assert mask[start] == 0  # a conversation's first token is never learned
    truncated = starts[20]
    assert (
        tokens[truncated : truncated + seq_len + 1].tolist() == template_ids(hf, long_answer["messages"])[: seq_len + 1]
    )
    # The loader's windows: every learned target lies in a window that holds its conversation's beginning.
    cfg = load_config("tiny", [f"data.path={output}", "model.vocab_size=auto", f"data.seq_len={seq_len}"])
    dataset = build_dataset(cfg)
    assert dataset.masked
    learned = sum(int((dataset[i][1] != IGNORE_INDEX).sum()) for i in range(len(dataset)))
    assert learned == int(mask[1:].sum())
    again = ["--output", str(tmp_path / "again" / "c.bin"), "--tokenizer", str(v2), "--seq-len", str(seq_len)]
    report = run_module("train.prepare", "--input", str(tmp_path / "chat.jsonl"), *again)
    assert report.returncode == 0, report.stderr
    assert "1 truncated to a window, 1 dropped: nothing learned within a window, 1 dropped: no assistant turn" in (
        report.stdout
    )
    assert f"data.seq_len={seq_len}" in report.stdout


def test_alone_starts_every_conversation_at_a_window_so_attention_sees_no_other(v2: Path, tmp_path) -> None:
    from transformers import AutoTokenizer

    bos = AutoTokenizer.from_pretrained(v2).convert_tokens_to_ids(BOS)
    records = conversations(12)
    packed, _, _ = stream_of(prepared(tmp_path / "packed", v2, records))
    alone, mask, meta = stream_of(prepared(tmp_path / "alone", v2, records, alone=True))
    starts = np.flatnonzero(alone == bos)
    assert len(starts) == meta["tally"]["kept"] == len(records)
    assert all(start % SEQ_LEN == 0 for start in starts)  # each at the start of a window: nothing before it
    learned = np.flatnonzero(mask)
    owner = starts[np.searchsorted(starts, learned, side="right") - 1]  # the conversation each learned token is of
    assert (learned - owner <= SEQ_LEN).all()  # within its own window: the rest of that window learns nothing
    assert len(np.flatnonzero(packed == bos)) == len(records) and len(packed) < len(alone)  # packing shares windows
    assert meta["chat"]["alone"] is True


def test_a_resumed_chat_prepare_equals_an_uninterrupted_one(v2: Path, tmp_path: Path, monkeypatch) -> None:
    from train.data import formats
    from train.data.shards import ShardWriter

    monkeypatch.setattr(formats, "UNIT_BYTES", 2000)  # many units, so that the kill lands mid-set
    records = conversations(400, seed=5)
    reference = prepared(tmp_path / "reference", v2, records, shard_tokens=1500)
    output = tmp_path / "killed" / "data" / "chat.bin"
    write_jsonl(tmp_path / "killed" / "chat.jsonl", records)
    real_add, calls = ShardWriter.add, []

    def add_then_die(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 9:
            raise KeyboardInterrupt
        return real_add(self, *args, **kwargs)

    monkeypatch.setattr(ShardWriter, "add", add_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(tmp_path / "killed" / "chat.jsonl")], str(output), str(v2), seq_len=SEQ_LEN, shard_tokens=1500)
    interrupted = json.loads(output.with_suffix(".json").read_text())
    assert interrupted["complete"] is False and len(interrupted["shards"]) >= 2
    monkeypatch.setattr(ShardWriter, "add", real_add)
    prepare([str(tmp_path / "killed" / "chat.jsonl")], str(output), str(v2), seq_len=SEQ_LEN, shard_tokens=1500,
            procs=2)  # fmt: skip
    done = [json.loads(p.with_suffix(".json").read_text()) for p in (output, reference)]
    assert done[0]["shards"] == done[1]["shards"] and done[0]["tally"] == done[1]["tally"]
    for entry in done[1]["shards"]:
        for name in (entry["file"], entry["mask"]["file"]):
            assert (output.parent / name).read_bytes() == (reference.parent / name).read_bytes()


# ------------------------------------------------------------------------------------------ bad input


def chat_prepare(tmp_path: Path, tokenizer: Path, lines: list[str], *extra: str):
    source = tmp_path / "bad.jsonl"
    tmp_path.mkdir(parents=True, exist_ok=True)
    source.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return run_module("train.prepare", "--input", str(source), "--output", str(tmp_path / "out" / "c.bin"),
                      "--tokenizer", str(tokenizer), "--seq-len", "64", *extra)  # fmt: skip


def set_files(folder: Path) -> dict[str, bytes]:
    """A token set's files and their bytes; not its lock, which holds the pid of the last prepare."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if not p.name.endswith(".lock")}


GOOD = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("{not json", r"bad\.jsonl line 2 is not JSON"),
        (json.dumps({"messages": [{"role": "bot", "content": "x"}]}),
         r"line 2: message 1 of 'messages' has 'bot', not one of system, user, assistant"),
        (json.dumps({"messages": []}), r"line 2: 'messages' is empty"),
        (json.dumps({"messages": [{"role": "user", "content": ["a"]}]}),
         r"line 2: message 1 of 'messages': content is an array, not a string"),
        (json.dumps({"messages": [{"role": "assistant", "content": "x"}]}),
         r"line 2: the first message is the assistant's"),
        (json.dumps({"prompt": "a", "completion": 3}), r"line 2: prompt is a string and completion a number"),
        (json.dumps({"messages": "hello"}), r"line 2: 'messages' is a string, not a list of messages"),
    ],
)  # fmt: skip
def test_a_bad_record_is_one_line_naming_it_and_loses_nothing(v2: Path, tmp_path: Path, line: str, expected) -> None:
    earlier = chat_prepare(tmp_path, v2, [GOOD, GOOD])
    assert earlier.returncode == 0, earlier.stderr
    before = set_files(tmp_path / "out")
    error = one_line_error(chat_prepare(tmp_path, v2, [GOOD, line, GOOD], "--chat"))
    assert re.search(expected, error), error
    assert set_files(tmp_path / "out") == before  # the earlier set untouched


def test_records_without_an_assistant_turn_are_dropped_and_counted_or_refused_when_all_are(v2, tmp_path) -> None:
    silent = json.dumps({"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}]})
    kept = chat_prepare(tmp_path, v2, [silent, GOOD, silent])
    assert kept.returncode == 0 and "2 dropped: no assistant turn" in kept.stdout, kept.stderr
    line = one_line_error(chat_prepare(tmp_path / "all", v2, [silent, silent]))
    assert "holds no conversation to learn from" in line and "2 dropped: no assistant turn" in line


def test_a_tokenizer_without_a_chat_template_is_one_line_with_the_fix(v2: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "tokenizer.json").write_bytes((v2 / "tokenizer.json").read_bytes())
    config = json.loads((v2 / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    line = one_line_error(chat_prepare(tmp_path, bare, [GOOD]))
    assert "has no chat template" in line and "CHAT_TEMPLATE=" in line
    line = one_line_error(chat_prepare(tmp_path, bare / "tokenizer.json", [GOOD]))
    assert "a tokenizer.json alone holds no chat template" in line
    # The fix works: CHAT_TEMPLATE gives the template, the directory its special tokens.
    template = tmp_path / "v2.jinja"
    template.write_text(json.loads((v2 / "tokenizer_config.json").read_text())["chat_template"])
    fixed = chat_prepare(tmp_path, bare, [GOOD], "--chat-template", str(template))
    assert fixed.returncode == 0, fixed.stderr
    # A tokenizer.json alone cannot name the eos_token the template writes.
    line = one_line_error(chat_prepare(tmp_path, bare / "tokenizer.json", [GOOD], "--chat-template", str(template)))
    assert "uses bos_token, which TOKENIZER does not define" in line


@pytest.mark.parametrize(
    ("extra", "tokenizer", "expected"),
    [
        ((), "bpe", "give TOKENIZER=<the model's directory>"),
        (("--seq-len", "0"), None, "SEQ_LEN=0"),
        (("--shard-format", "llmc"), None, "use SHARD_FORMAT=tokens"),
    ],
)
def test_chat_settings_that_cannot_work_are_one_line(v2, tmp_path, extra, tokenizer, expected) -> None:
    source = write_jsonl(tmp_path / "c.jsonl", conversations(4))
    args = ["--input", str(source), "--output", str(tmp_path / "c.bin"), "--tokenizer", tokenizer or str(v2)]
    if "--seq-len" not in extra:
        args += ["--seq-len", "64"]
    assert expected in one_line_error(run_module("train.prepare", *args, *extra))
    missing = one_line_error(run_module("train.prepare", "--input", str(source), "--output", str(tmp_path / "c.bin"),
                                        "--tokenizer", str(v2)))  # fmt: skip
    assert "give SEQ_LEN=" in missing
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "plain"}])
    line = one_line_error(run_module("train.prepare", "--input", str(text), "--output", str(tmp_path / "t.bin"),
                                     "--seq-len", "64"))  # fmt: skip
    assert "SEQ_LEN is for chat data" in line


# ------------------------------------------------------------------------------------------ the loss


def masked_batch(seed: int = 0, batch: int = 4, seq: int = 16, vocab: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=generator)
    targets = tokens[:, 1:].clone()
    targets[torch.rand(targets.shape, generator=generator) < 0.6] = IGNORE_INDEX  # rows count different numbers
    return tokens[:, :-1], targets


@pytest.mark.parametrize(
    ("config", "overrides", "terms"),
    [("tiny", [*SMALL, "model.mtp_depth=1"], 2), ("llama-tiny", ["model.n_layers=2", "train.precision=fp32"], 1)],
)
def test_split_batches_with_divisors_give_the_whole_batch_s_loss_and_gradients(
    config: str, overrides: list[str], terms: int
) -> None:
    cfg = load_config(config, [*overrides, "model.vocab_size=64"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    inputs, targets = masked_batch()
    counts = counted_targets(targets, terms).float()
    whole = model(inputs, targets)
    whole.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    halves = sum(model(inputs[i : i + 2], targets[i : i + 2], counts) for i in (0, 2))
    halves.backward()
    torch.testing.assert_close(halves, whole, rtol=0, atol=1e-6)
    for got, want in zip((p.grad for p in model.parameters()), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # The mean of the halves' own means is another figure: the divisors are what makes them equal.
    means = sum(model(inputs[i : i + 2], targets[i : i + 2]) for i in (0, 2)) / 2
    assert abs(means.item() - whole.item()) > 1e-4
    # The masked targets count for nothing: changing them changes no loss.
    other = torch.where(targets == IGNORE_INDEX, IGNORE_INDEX, targets)
    assert model(inputs, other).item() == whole.item()
    if terms == 1:
        manual = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        torch.testing.assert_close(whole, manual)


# ------------------------------------------------------------------------------------------ training


def chat_set(tmp_path: Path, v2: Path) -> Path:
    return prepared(tmp_path, v2, conversations(160, seed=2))


TRAIN = [f"data.seq_len={SEQ_LEN}", "model.vocab_size=auto", "train.eval_every=0", "train.lr=3e-3"]


@pytest.mark.slow
def test_two_ranks_and_accumulation_equal_one_process_on_masked_data_and_resume_is_exact(v2, tmp_path) -> None:
    output = chat_set(tmp_path, v2)
    # Every run decays the learning rate over 4 steps, so a first leg of 2 is the same run stopped early.
    common = [f"data.path={output}", *TRAIN, "train.ckpt_every=2", "train.lr_decay_steps=4"]
    runs_ = {
        "2 ranks": (2, ["train.micro_batch=2", "train.accum=1"]),
        "1 process, accum 2": (1, ["train.micro_batch=2", "train.accum=2"]),
        "1 process": (1, ["train.micro_batch=4", "train.accum=1"]),
    }
    losses = {}
    for name, (gpus, layout) in runs_.items():
        result = launch_train(tmp_path / name.replace(" ", "_"), gpus, 4, *common, *layout)
        assert result.returncode == 0, result.stderr[-3000:]
        rows = metrics(tmp_path / name.replace(" ", "_"))
        losses[name] = [row["loss"] for row in rows]
        assert all(row["counted_tokens"] < 4 * SEQ_LEN for row in rows)  # the mask left most targets out
    for name in ("2 ranks", "1 process, accum 2"):
        assert losses[name] == pytest.approx(losses["1 process"], rel=0, abs=1e-6), name
    # Stopped after step 2 and resumed on 2 ranks: the same losses, bitwise, as the uninterrupted run.
    resumed = tmp_path / "resumed"
    assert launch_train(resumed, 2, 2, *common, *runs_["2 ranks"][1]).returncode == 0
    result = launch_train(resumed, 2, 4, *common, *runs_["2 ranks"][1])
    assert result.returncode == 0 and "resuming from step 2" in result.stdout, result.stderr[-3000:]
    by_step = {row["step"]: (row["loss"], row["counted_tokens"]) for row in metrics(resumed)}
    assert by_step == {row["step"]: (row["loss"], row["counted_tokens"]) for row in metrics(tmp_path / "2_ranks")}


@pytest.mark.slow
def test_a_model_from_the_v2_checkpoint_learns_the_answers_and_eval_counts_the_same_tokens(v2, tmp_path) -> None:
    output = chat_set(tmp_path, v2)
    run_dir = tmp_path / "run"
    # Not launch_train: its SMALL model keys would contradict the checkpoint's, which init_from decides.
    command = [
        sys.executable, "-m", "train.launch", "--gpus", "1", "--config", "tiny", "--run-dir", str(run_dir),
        "--steps", "30", f"data.path={output}", f"train.init_from={v2}", *TRAIN[:2], "train.micro_batch=4",
        "train.eval_every=30", "data.val_fraction=0.1", "train.lr=3e-3", "train.precision=fp32",
        "train.log_every=1", "train.warmup_steps=2", "data.num_workers=0",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loss: over the tokens" in result.stdout
    rows = metrics(run_dir)
    first, last = rows[0]["loss"], np.mean([row["loss"] for row in rows[-5:]])
    assert last < 0.5 * first, (first, last)
    val_loss = rows[-1]["val_loss"]
    evaluated = run_module("train.eval", "--run-dir", str(run_dir))
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads((run_dir / "eval.json").read_text())["val_loss"] == pytest.approx(val_loss, rel=1e-6)
    # By hand, from the files: the validation windows' targets the mask learns, and no other.
    from train.weights import build_loaded_model

    model, _, _ = build_loaded_model(run_dir, torch.device("cpu"))
    tokens, mask, _ = stream_of(output)
    windows = (len(tokens) - 1) // SEQ_LEN
    held_out = range(windows - math.ceil(windows * 0.1 - 1e-9), windows)
    assert val_loss == pytest.approx(masked_loss(model, tokens, mask, held_out), rel=1e-5)
    # make eval DATA=<the chat set>: every window of it, by the same rule.
    whole = run_module("train.eval", "--run-dir", str(run_dir), "--data", str(output))
    assert whole.returncode == 0, whole.stderr
    figure = json.loads((run_dir / "eval.json").read_text())["val_loss"]
    assert figure == pytest.approx(masked_loss(model, tokens, mask, range(windows)), rel=1e-5)


def masked_loss(model: torch.nn.Module, tokens: np.ndarray, mask: np.ndarray, windows: range) -> float:
    """The mean next-token loss over the targets the mask learns in these windows of SEQ_LEN."""
    total, count = 0.0, 0
    with torch.no_grad():
        for index in windows:
            window = torch.from_numpy(tokens[index * SEQ_LEN : index * SEQ_LEN + SEQ_LEN + 1])
            learned = torch.from_numpy(mask[index * SEQ_LEN + 1 : index * SEQ_LEN + SEQ_LEN + 1]).bool()
            losses = F.cross_entropy(model(window[None, :-1])[0], window[1:], reduction="none")
            total += losses[learned].double().sum().item()
            count += int(learned.sum())
    return total / count


def test_hf_weights_are_evaluated_in_the_windows_their_chat_data_was_packed_into(v2: Path, tmp_path: Path) -> None:
    # Weights alone have no data.seq_len to set: make eval reads the windows DATA was packed into.
    weights = tmp_path / "hf"
    shutil.copytree(v2, weights)
    output = prepared(tmp_path, v2, conversations(12, seed=3))
    evaluated = run_module("train.eval", "--run-dir", str(weights), "--data", str(output))
    assert evaluated.returncode == 0, evaluated.stderr
    from train.weights import build_loaded_model

    model, _, _ = build_loaded_model(weights, torch.device("cpu"))
    tokens, mask, _ = stream_of(output)
    expected = masked_loss(model, tokens, mask, range((len(tokens) - 1) // SEQ_LEN))
    assert json.loads((weights / "eval.json").read_text())["val_loss"] == pytest.approx(expected, rel=1e-5)
    # Windows longer than the weights' positions (max_position_embeddings=256) cannot be read: one line, the fix.
    longer = prepared(tmp_path / "longer", v2, conversations(4), seq_len=512)
    refused = run_module("train.eval", "--run-dir", str(weights), "--data", str(longer))
    assert refused.returncode != 0
    assert one_line_error(refused) and "more than the 256 positions" in refused.stderr
    assert "SEQ_LEN=256 or less" in refused.stderr


DAMAGED_CHAT = {"a list": [64], "a string": "64", "a bool": True, "negative": -64, "a float": 64.0, "null": None}


@pytest.mark.parametrize(
    "value", [*DAMAGED_CHAT.values(), "missing", "chat a list"], ids=[*DAMAGED_CHAT, "missing", "x"]
)
def test_a_damaged_chat_seq_len_in_the_sidecar_is_named_as_damage(v2: Path, tmp_path: Path, value: object) -> None:
    output = prepared(tmp_path, v2, conversations(8))
    sidecar = output.with_suffix(".json")
    meta = json.loads(sidecar.read_text())
    if value == "missing":
        del meta["chat"]
    elif value == "chat a list":
        meta["chat"] = [64]
    else:
        meta["chat"]["seq_len"] = value
    sidecar.write_text(json.dumps(meta))
    cfg = load_config("tiny", [f"data.path={output}", "model.vocab_size=auto", f"data.seq_len={SEQ_LEN}"])
    with pytest.raises(DataError, match=r"chat\.json is damaged: it has a mask but chat.* re-run make prepare$"):
        build_dataset(cfg)
    if value == "chat a list":  # make eval of weights alone reads the same field first: the same one line
        refused = run_module("train.eval", "--run-dir", str(v2), "--data", str(output))
        assert "is damaged: it has a mask but chat=[64]" in one_line_error(refused)


def test_data_seq_len_other_than_the_packing_is_refused(v2: Path, tmp_path: Path) -> None:
    output = prepared(tmp_path, v2, conversations(8))
    cfg = load_config("tiny", [f"data.path={output}", "model.vocab_size=auto", "data.seq_len=32"])
    with pytest.raises(DataError, match=r"windows of 64 tokens, but data\.seq_len=32; set data\.seq_len=64"):
        build_dataset(cfg)


def test_the_conversation_parser_reads_each_record_kind() -> None:
    for record in conversations(4):
        found = conversation(json.dumps(record).encode(), "x", 1)
        assert isinstance(found, Conversation)
        assert [found.messages[i]["role"] for i in found.learned] == ["assistant"] * len(found.learned) != []


# ------------------------------------------------------------------------------------------ hostile templates


def tokenizer_copy(v2: Path, folder: Path) -> Path:
    """v2's tokenizer files in a directory of their own, to plant things in."""
    folder.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((v2 / name).read_bytes())
    return folder


def test_a_hugging_face_cache_snapshot_of_links_into_its_blobs_is_read(v2: Path, records, tmp_path: Path) -> None:
    import hashlib

    repository = tmp_path / "hub" / "models--org--tiny-v2"
    snapshot, blobs = repository / "snapshots" / "0123abc", repository / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for file in v2.iterdir():
        blob = blobs / hashlib.sha256(file.read_bytes()).hexdigest()
        blob.write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(Path("../../blobs") / blob.name)  # as huggingface_hub lays it out
    from_cache, _, _ = stream_of(prepared(tmp_path / "cache", snapshot, records))
    plain, _, _ = stream_of(prepared(tmp_path / "plain", v2, records))
    assert np.array_equal(from_cache, plain)


@pytest.mark.parametrize("name", ["chat_template.jinja", "tokenizer_config.json", "special_tokens_map.json"])
def test_a_symlink_found_in_the_tokenizer_directory_is_refused_and_its_target_written_nowhere(v2, tmp_path, name):
    secret = tmp_path / "secret"
    marker = "SECRET-4f1c9e"
    config = json.loads((v2 / "tokenizer_config.json").read_text())
    template = "{{ '" + marker + "' }}" + config["chat_template"]
    contents = {
        "chat_template.jinja": template,
        "tokenizer_config.json": json.dumps(config | {"chat_template": template}),
        "special_tokens_map.json": json.dumps({"eos_token": EOS, "additional_special_tokens": [marker]}),
    }
    secret.write_text(contents[name])
    secret.chmod(0o600)
    directory = tokenizer_copy(v2, tmp_path / "tok")
    (directory / name).unlink(missing_ok=True)
    (directory / name).symlink_to(secret)
    line = one_line_error(chat_prepare(tmp_path, directory, [GOOD]))
    assert f"{directory / name} is a symlink, which prepare never follows; copy the file itself there" in line
    written = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink() and p != secret]
    assert written and not any(marker.encode() in p.read_bytes() for p in written)
    # CHAT_TEMPLATE names its file: a link there is the user's choice, and followed.
    (directory / name).unlink()
    named = tmp_path / "named.jinja"
    named.symlink_to(secret)
    if name == "chat_template.jinja":
        assert find_template(str(directory), str(named)).text == contents[name]


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_a_tokenizer_config_that_is_no_regular_file_is_named_as_what_it_is(v2, tmp_path, kind) -> None:
    import os

    directory = tokenizer_copy(v2, tmp_path / "tok")
    (directory / "tokenizer_config.json").unlink()
    if kind == "fifo":
        os.mkfifo(directory / "tokenizer_config.json")
    else:
        (directory / "tokenizer_config.json").mkdir()
    with pytest.raises(DataError) as error:
        find_template(str(directory), None)
    expected = "is a FIFO (a named pipe)" if kind == "fifo" else "is a directory"
    assert f"tokenizer_config.json {expected}; give a valid tokenizer_config.json or remove it" in str(error.value)
    assert "has no chat template" not in str(error.value)


def template_prepare(tmp_path: Path, v2: Path, template: str, records: list[dict]) -> None:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "t.jinja").write_text(template)
    prepared(tmp_path, v2, records, chat_template=str(tmp_path / "t.jinja"))


def when(content: str, then: str) -> str:
    """The V2 template, doing `then` first when a message's content is `content`."""
    from tests.helpers.chat_data import V2_CHAT_TEMPLATE

    return f"{{% for m in messages %}}{{% if m.content == '{content}' %}}{then}{{% endif %}}{{% endfor %}}" + (
        V2_CHAT_TEMPLATE
    )


def talk(*answers: str) -> list[dict]:
    return [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": a}]} for a in answers]


SPIN = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


def test_a_template_that_renders_forever_is_stopped_naming_the_line_or_the_template(v2, tmp_path, monkeypatch):
    from train.data import chat

    monkeypatch.setattr(chat, "RENDER_SECONDS", 0.5)  # the limit itself is 10 s: the same code, sooner
    with pytest.raises(DataError, match=r"took more than 0\.5 s to render line 2 of .*chat\.jsonl; fix the template"):
        template_prepare(tmp_path / "line", v2, when("spin", SPIN), talk("fine", "spin", "fine"))
    with pytest.raises(DataError, match=r"took more than 0\.5 s to render a user's '\?' answered '!'; fix the templ"):
        template_prepare(tmp_path / "probe", v2, SPIN + "{{ messages }}", talk("fine"))


class CallersDeadline(Exception):
    pass


def callers_deadline(signum, frame) -> None:
    raise CallersDeadline


@pytest.fixture
def callers_timer():
    """A caller's own real-time timer and SIGALRM handler (a test runner's per-test timeout is one)."""
    previous = signal.signal(signal.SIGALRM, callers_deadline)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


def test_the_render_bound_keeps_a_callers_timer_due_later(callers_timer) -> None:
    from train.data.chat import RenderTimeout, time_limit

    signal.setitimer(signal.ITIMER_REAL, 30)
    with time_limit(5):
        time.sleep(0.2)
    left, _ = signal.getitimer(signal.ITIMER_REAL)
    assert 20 < left < 30  # still armed, with its own remaining time: it used to be cancelled
    with pytest.raises(RenderTimeout), time_limit(0.2):  # the bound itself still holds inside it
        time.sleep(10)
    assert signal.getsignal(signal.SIGALRM) is callers_deadline and signal.getitimer(signal.ITIMER_REAL)[0] > 15


def test_a_callers_timer_due_first_fires_its_own_handler_during_a_render(callers_timer) -> None:
    from train.data.chat import time_limit

    signal.setitimer(signal.ITIMER_REAL, 0.2)
    with pytest.raises(CallersDeadline), time_limit(30):
        time.sleep(10)
    assert signal.getsignal(signal.SIGALRM) is callers_deadline


@pytest.mark.parametrize("size", ["4611686018427387904", "9223372036854775808"])  # MemoryError, OverflowError
def test_a_template_asking_for_more_memory_than_there_is_is_one_line_naming_it(v2, tmp_path, size) -> None:
    with pytest.raises(
        DataError, match=r"the chat template \(.*t\.jinja\) asks for more memory than there is on line 1"
    ):
        template_prepare(tmp_path, v2, "{{ 'x' * " + size + " }}", talk("fine"))


@pytest.mark.parametrize(
    ("then", "expected"),
    [
        ("{{ messages.append(1) }}", r"the chat template \(.*\) failed on line 2 of .*: .*unsafe.*; fix the template$"),
        ("{{ raise_exception('no bad answers') }}",
         r"the chat template \(.*\) refuses line 2 of .*: no bad answers; fix the line, or give CHAT_TEMPLATE="),
    ],
)  # fmt: skip
def test_a_template_s_fault_is_named_the_template_s(v2: Path, tmp_path: Path, then: str, expected: str) -> None:
    with pytest.raises(DataError) as error:
        template_prepare(tmp_path, v2, when("bad", then), talk("fine", "bad"))
    assert re.search(expected, str(error.value)), str(error.value)
    assert "\n" not in str(error.value)


def test_a_template_that_renders_no_assistant_turn_says_so(v2: Path, tmp_path: Path) -> None:
    users_only = "{% for m in messages %}{% if m.role == 'user' %}{{ 'User: ' + m.content }}{% endif %}{% endfor %}"
    with pytest.raises(DataError, match=r"renders no assistant turn") as error:
        template_prepare(tmp_path, v2, users_only, talk("fine", "also fine"))
    assert "SEQ_LEN" not in str(error.value)
