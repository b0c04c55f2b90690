"""Decoding speed: no cache, the model's cache (MLA's latent KV cache for deepseek), and MTP speculation.

    python -m train.benchmarks.sample [--config tiny] [--run-dir RUN] [--train-steps 100] [--tokens 100]
        [--prompt-tokens 16] [--repeats 3] [key=value ...]

Greedy decoding of --tokens tokens after a prompt from the built-in corpus, each method --repeats
times interleaved (so a busy machine slows all of them alike); the median tokens/s of each is
printed with its speed-up over no cache, and the speculative row with its measured acceptance
rate. The model is a run's (--run-dir) or the config's, trained --train-steps steps in this process
first so that the MTP drafts mean something (0: as initialised). On the first CUDA device if there
is one (bf16 autocast where supported), else the CPU. Figures only, no pass/fail.
"""

from __future__ import annotations

import argparse
import os
import statistics
from dataclasses import replace

import torch

from env.common.cli import ArgumentParser, count_arg, run_cli
from train.benchmarks import benchmark_main
from train.config_loader import load_config
from train.data import build_corpus, build_dataset, build_loader, read_token_file
from train.errors import ConfigError
from train.models import build_model, get_spec
from train.run import build_optimizer, lr_at
from train.sample import Generator, Sampling, cache_line, load_language_model

METHODS = {"no cache": {"cache": False}, "cached": {"cache": True}, "speculative": {"speculate": True}}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m train.benchmarks.sample", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny", help="config name or YAML path (default: tiny)")
    parser.add_argument("--run-dir", help="measure this run's (or export's) model instead of training one")
    parser.add_argument(
        "--train-steps", type=count_arg("--train-steps"), default=100, help="steps to train the config's model first"
    )
    parser.add_argument("--tokens", type=count_arg("--tokens"), default=100, help="tokens to generate per measurement")
    parser.add_argument(
        "--prompt-tokens", type=count_arg("--prompt-tokens"), default=16, help="prompt length, taken from the corpus"
    )
    parser.add_argument(
        "--repeats", type=count_arg("--repeats"), default=3, help="measurements per method (the median is shown)"
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.n_layers=2")
    return parser.parse_args(argv)


def trained_model(args: argparse.Namespace, device: torch.device, autocast: torch.dtype | None) -> torch.nn.Module:
    cfg = load_config(args.config, args.overrides)
    spec = get_spec(cfg.model.arch)
    if spec.decoder is None:
        raise ConfigError(
            f"--config {args.config} is a {cfg.model.arch} model, which has no decoder; use a language model"
        )
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model).to(device)
    optimizer = build_optimizer(model, cfg, device)
    steps = replace(cfg, train=replace(cfg.train, steps=max(1, args.train_steps), warmup_steps=0))
    batches = iter(build_loader(build_dataset(cfg), cfg, rank=0, world_size=1, start_step=0))
    for step in range(args.train_steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps)
        inputs, targets = (t.to(device) for t in next(batches))
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            loss = model(inputs, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if spec.after_step is not None:
            spec.after_step(model, None)
    if args.train_steps:
        print(f"trained {args.train_steps} steps of {cfg.name} in this process: final loss {loss.item():.3f}")
    return spec.decoder(model.eval())


def corpus_prompt(length: int) -> list[int]:
    tokens, _ = read_token_file(build_corpus())
    middle = len(tokens) // 2
    return [int(t) for t in tokens[middle : middle + length]]


def run(args: argparse.Namespace) -> None:
    for name in ("train_steps", "tokens", "prompt_tokens", "repeats"):
        if getattr(args, name) < (0 if name == "train_steps" else 1):
            raise ConfigError(f"--{name.replace('_', '-')}={getattr(args, name)} is too small")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    if args.run_dir:
        model, _, step = load_language_model(args.run_dir, device)
        print(f"model: {args.run_dir} at step {step}")
    else:
        model = trained_model(args, device, autocast)
    methods = dict(METHODS) if model.can_draft else {k: v for k, v in METHODS.items() if k != "speculative"}
    prompt = corpus_prompt(min(args.prompt_tokens, model.max_seq_len))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} CPUs)"
    print(
        f"decoding benchmark · max_seq_len {model.max_seq_len} · greedy, "
        f"{args.tokens} tokens after {len(prompt)} · {where}, {'bf16' if autocast else 'fp32'} · "
        f"torch {torch.__version__}"
    )
    cache_bytes, line = cache_line(model, autocast)
    print(line)
    generator = Generator(model, Sampling(temperature=0.0), seed=0, device=device, autocast_dtype=autocast)
    generator.run(prompt, min(4, args.tokens))  # warm-up: allocations, kernel selection
    rates: dict[str, list[float]] = {name: [] for name in methods}
    outputs: dict[str, list[int]] = {}
    acceptance: list[float] = []
    for _ in range(args.repeats):
        for name, options in methods.items():
            result = generator.run(prompt, args.tokens, **options)
            rates[name].append(result.tokens_per_sec)
            outputs[name] = result.tokens
            if result.acceptance is not None:
                acceptance.append(result.acceptance)
    base = statistics.median(rates["no cache"])
    print(f"\n{'method':<14} {'tokens/s':>10} {'× no cache':>11}  note")
    for name in methods:
        rate = statistics.median(rates[name])
        if name == "speculative":
            same = "same tokens as cached greedy" if outputs[name] == outputs["cached"] else "DIFFERENT tokens"
            accepted = f"{statistics.median(acceptance):.1%}" if acceptance else "n/a"
            note = f"acceptance {accepted}; {same}"
        elif name == "cached":
            note = f"{cache_bytes:,} B/token in the cache (the line above compares it with full K/V)"
        else:
            note = "recomputes the whole context every token"
        print(f"{name:<14} {rate:>10,.1f} {rate / base:>10.2f}x  {note}")
    if "speculative" in rates:
        speedup = statistics.median(rates["speculative"]) / statistics.median(rates["cached"])
        print(f"speculation speed-up over cached decoding: {speedup:.2f}x")


def main(argv: list[str] | None = None) -> int:
    return benchmark_main(parse_args, run, argv)


if __name__ == "__main__":
    run_cli("sample-bench", main)
