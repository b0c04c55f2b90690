"""Chat data for the tests: a tiny DeepSeek-V2 checkpoint as transformers saves it, with DeepSeek-V2-Chat's chat
template and a tokenizer of its special tokens, and small chat JSON lines whose assistant turns can be learned.

The checkpoint is V2-Lite-shaped (no query compression, softmax routing over all experts, two shared experts,
the first layer dense), shrunk: tests/train/test_chat.py prepares and trains on it, and LoRA fine-tunes it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
# DeepSeek-V2-Chat's and V2-Lite-Chat's tokenizer_config.json "chat_template", as published.
V2_CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ 'User: ' + message['content'] + '\\n\\n' }}{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}"
    "{{ message['content'] + '\\n\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ 'Assistant:' }}{% endif %}"
)
# ChatML (Qwen2.5's shape, without its default system prompt): the end-of-turn token closes each turn.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' "
    "+ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
# A V2-Lite-shaped DeepSeek-V2, shrunk (transformers' DeepseekV2Config keys).
TINY_V2 = dict(
    hidden_size=64, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
    intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3, first_k_dense_replace=1,
    n_shared_experts=2, n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1, topk_method="greedy",
    routed_scaling_factor=1.0, norm_topk_prob=False, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16,
    qk_rope_head_dim=8, v_head_dim=16, initializer_range=0.08, tie_word_embeddings=False,
)  # fmt: skip
WORDS = ("apple", "river", "stone", "cloud", "green", "seven", "paper", "light", "music", "tiger")


def conversations(count: int, seed: int = 0) -> list[dict[str, Any]]:
    """Chat records of every kind prepare reads: messages (some with a system turn, some of two rounds) and
    prompt/completion; each assistant turn repeats a word as asked, so a model can learn it."""
    rng = random.Random(seed)
    records: list[dict[str, Any]] = []
    for index in range(count):
        word, times = rng.choice(WORDS), rng.randint(1, 4)
        ask, answer = f"Say {word} {times} times.", " ".join([word] * times)
        kind = index % 4
        if kind == 0:
            records.append({"messages": [{"role": "user", "content": ask}, {"role": "assistant", "content": answer}]})
        elif kind == 1:
            system = {"role": "system", "content": "You repeat words."}
            records.append({"messages": [system, {"role": "user", "content": ask},
                                         {"role": "assistant", "content": answer}]})  # fmt: skip
        elif kind == 2:
            other, again = rng.choice(WORDS), rng.randint(1, 4)
            records.append({"messages": [
                {"role": "user", "content": ask}, {"role": "assistant", "content": answer},
                {"role": "user", "content": f"Say {other} {again} times."},
                {"role": "assistant", "content": " ".join([other] * again)},
            ]})  # fmt: skip
        else:
            records.append({"prompt": ask, "completion": answer})
    return records


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def write_chat_tokenizer(
    directory: Path, template: str = V2_CHAT_TEMPLATE, specials: tuple[str, ...] = (BOS, EOS), vocab: int = 320
) -> Path:
    """A byte-level BPE with `specials` as special tokens, trained on conversations' text, in a model directory:
    tokenizer.json and tokenizer_config.json with the template and, for DeepSeek's, bos and eos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=list(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    texts = [m["content"] for r in conversations(200, seed=1) for m in r.get("messages", [])]
    tokenizer.train_from_iterator([*texts, "User: Assistant: system user assistant"], trainer=trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                              "model_max_length": 256, "chat_template": template}  # fmt: skip
    if specials == (BOS, EOS):
        config |= {"bos_token": {"__type": "AddedToken", "content": BOS, "special": True}, "eos_token": EOS,
                   "pad_token": EOS}  # fmt: skip
    else:
        config |= {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1, ensure_ascii=False), encoding="utf-8")
    return directory


def write_tiny_v2(directory: Path, seed: int = 0) -> Path:
    """A tiny DeepSeek-V2 checkpoint as transformers' save_pretrained writes it, with write_chat_tokenizer's files."""
    import torch
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    write_chat_tokenizer(directory)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    torch.manual_seed(seed)
    config = CONFIG_MAPPING["deepseek_v2"](
        **TINY_V2, vocab_size=tokenizer.get_vocab_size(), bos_token_id=tokenizer.token_to_id(BOS),
        eos_token_id=tokenizer.token_to_id(EOS),
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config).float()
    model.save_pretrained(directory)
    return directory
