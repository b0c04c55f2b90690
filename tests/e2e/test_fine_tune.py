"""Issue 18's fine-tune, end to end, as a user runs it: a V2-Lite-shaped DeepSeek-V2 saved by transformers,
`make prepare CHAT=1` of chat JSON lines, `make train` of LoRA adapters on its frozen base on 2 ranks with
activation checkpointing, `make export` to a PEFT adapter that peft loads onto transformers' model, `make sample`
of the run, and a resume from the mid-run checkpoint.

The pieces have their own tests (tests/train/test_chat.py, test_lora.py, test_activation_checkpointing.py,
tests/train/hf/); this one shows they hold together on one run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.chat_data import BOS, conversations, write_jsonl, write_tiny_v2
from tests.helpers.commands import run_module
from tests.helpers.hf_models import V5
from tests.helpers.paths import ROOT
from tests.helpers.trainrun import fsdp2_runs_here, metrics
from train import lora
from train.checkpoint import Checkpointer
from train.sample import printable
from train.weights import load_model_weights

SEQ_LEN = 64
STEPS, MID = 30, 15
# FSDP2 on CPU needs torch >= 2.6 (`make test-current` runs it there); the pinned torch 2.4.1 runs DDP.
STRATEGY = "fsdp" if fsdp2_runs_here() else "ddp"
# Experts are linear layers in transformers 4.x, fused parameters in 5.x, which peft adapts otherwise.
TARGETS = "wq,wkv_b,wo" if V5 else "wq,wkv_b,wo,experts,shared_experts"
FINE_TUNE = [
    f"data.seq_len={SEQ_LEN}", "model.vocab_size=auto", "data.num_workers=0", "train.precision=fp32",
    "train.micro_batch=4", "train.lr=1e-2", "train.warmup_steps=2", "train.log_every=1", "train.eval_every=0",
    # one schedule for the run stopped at MID and the whole one: a leg of MID steps is the same run stopped early
    f"train.lr_decay_steps={STEPS}", f"train.ckpt_every={MID}",
    "train.lora.rank=4", "train.lora.alpha=8", "train.lora.dropout=0.1", f"train.lora.targets={TARGETS}",
    "train.activation_checkpointing=full", f"train.strategy={STRATEGY}",
]  # fmt: skip
PROMPT = f"{BOS}User: Say tiger 3 times.\n\nAssistant:"  # DeepSeek-V2-Chat's template with its generation prompt
NEW_TOKENS = 12


def fine_tune(run_dir: Path, base: Path, data: Path, steps: int) -> subprocess.CompletedProcess:
    """`make train GPUS=2` from base's weights (no model keys: train.init_from's checkpoint decides the model)."""
    command = [
        sys.executable, "-m", "train.launch", "--gpus", "2", "--config", "tiny", "--run-dir", str(run_dir),
        "--steps", str(steps), f"data.path={data}", f"train.init_from={base}", *FINE_TUNE,
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def hf_greedy(model: torch.nn.Module, ids: list[int], count: int) -> list[int]:
    """transformers' greedy generate of `count` new tokens; the end of sentence stops nothing, as in make sample
    (generate's min_new_tokens would instead forbid it, which make sample does not)."""
    inputs = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(
            inputs, attention_mask=torch.ones_like(inputs), do_sample=False, max_new_tokens=count,
            eos_token_id=None, pad_token_id=0,
        )  # fmt: skip
    assert out.shape[1] == len(ids) + count
    return out[0, len(ids) :].tolist()


@pytest.mark.slow
@pytest.mark.timeout(900)  # six commands, three of them 2-rank launches: 75-90 s measured on a busy 2-core machine
def test_lora_fine_tune_of_a_transformers_v2_on_chat_data_on_two_ranks(tmp_path: Path) -> None:
    """The issue's first must-show, under FSDP2 where it trains here (torch >= 2.6 on CPU, `make test-current`),
    else DDP: the masked loss falls, the base stays bitwise as imported, the adapter loads in peft onto
    transformers' model and continues a prompt greedily as `make sample` of the run does, and a run stopped at
    the mid-run checkpoint and resumed logs the same losses, bitwise, as the uninterrupted one."""
    from peft import PeftModel
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    base = write_tiny_v2(tmp_path / "hf")
    # make prepare CHAT=1 SEQ_LEN=64 TOKENIZER=<the checkpoint>
    data = tmp_path / "data" / "chat.bin"
    source = write_jsonl(tmp_path / "chat.jsonl", conversations(64, seed=2))
    prepared = run_module("train.prepare", "--input", str(source), "--output", str(data), "--tokenizer", str(base),
                          "--chat", "--seq-len", str(SEQ_LEN))  # fmt: skip
    assert prepared.returncode == 0, prepared.stderr

    run = tmp_path / "run"
    done = fine_tune(run, base, data, STEPS)
    assert "LoRA rank 4 adapters, the base frozen" in done.stdout and "loss: over the tokens" in done.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["strategy"] == STRATEGY and summary["world_size"] == 2
    rows = metrics(run)
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    assert all(0 < row["counted_tokens"] < 2 * 4 * SEQ_LEN for row in rows)  # the mask left the prompts out
    first, last = (sum(row["loss"] for row in part) / 5 for part in (rows[:5], rows[-5:]))
    assert last < first - 0.5, (first, last)  # 5.19 -> 3.15 measured under DDP (torch 2.4.1), 5.28 -> 4.03 FSDP2
    assert MID in Checkpointer(run, {}, keep=1, rank=0, world_size=1, strategy=None).listed_steps()

    # The frozen base: bitwise the weights train.init_from imported from transformers' checkpoint.
    imported, _, _ = load_model_weights(base)
    trained, _, step = load_model_weights(run, adapters=True)
    assert step == STEPS
    assert {key for key in trained if not lora.is_adapter_key(key)} == imported.keys()
    for key, value in imported.items():
        assert torch.equal(trained[key], value), key
    assert any(".experts." in key for key in trained if lora.is_adapter_key(key)) != V5
    assert all(trained[key].abs().sum() > 0 for key in trained if key.endswith("lora_B"))

    # make export: peft's adapter, loaded onto transformers' model of the base, continues as make sample does.
    adapter = tmp_path / "adapter"
    exported = run_module("train.export", "--run-dir", str(run), "--output", str(adapter))
    assert exported.returncode == 0, exported.stderr
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in adapter.iterdir()}
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base).float(), adapter).eval()
    base_model = AutoModelForCausalLM.from_pretrained(base).float().eval()
    tokenizer = Tokenizer.from_file(str(base / "tokenizer.json"))
    ids = tokenizer.encode(PROMPT, add_special_tokens=False).ids
    assert ids[0] == tokenizer.token_to_id(BOS)
    with torch.no_grad():
        assert not torch.allclose(peft_model(torch.tensor([ids])).logits, base_model(torch.tensor([ids])).logits)
    continuation = hf_greedy(peft_model, ids, NEW_TOKENS)
    sampled = run_module("train.sample", "--run-dir", str(run), "--prompt", PROMPT, "--tokens", str(NEW_TOKENS),
                         "--temperature", "0")  # fmt: skip
    assert sampled.returncode == 0, sampled.stderr
    assert sampled.stdout == printable(PROMPT) + printable(tokenizer.decode(continuation)) + "\n"

    # Stopped at the mid-run checkpoint and resumed: the same run, bitwise.
    split = tmp_path / "split"
    fine_tune(split, base, data, MID)
    resumed = fine_tune(split, base, data, STEPS)
    assert f"resuming from step {MID} of {STEPS}" in resumed.stdout
    assert [(row["step"], row["loss"]) for row in metrics(split)] == [(row["step"], row["loss"]) for row in rows]
    again, _, _ = load_model_weights(split, adapters=True)
    assert all(torch.equal(again[key], value) for key, value in trained.items())
