"""`make export`: a run's weights as a Hugging Face model directory that transformers and vLLM load as it is.

    python -m train.export --run-dir RUN_DIR --output DIR [--dtype fp32|bf16] [--shard 5GB] [--force] [--merge]

RUN_DIR is a run directory (its newest valid checkpoint, DDP or FSDP) or any directory `make sample` reads
(an export, a transformers checkpoint). For a model family with a transformers twin (train/hf/: deepseek as
deepseek_v3 when sigmoid-routed, deepseek_v2 when softmax-routed; llama as llama) DIR gets:

- config.json that AutoConfig reads (model_type, architectures, every key; DeepSeek's num_nextn_predict_layers);
- the weights under transformers' names: model.safetensors, or shards of at most --shard bytes (make's SHARD,
  default 5GB as transformers 4.x) with model.safetensors.index.json; DeepSeek's MTP modules as its own
  checkpoints hold them (model.layers.{num_hidden_layers + d}.*), which transformers skips and vLLM drafts with;
- tokenizer.json, tokenizer_config.json, special_tokens_map.json and generation_config.json, for a BPE run and
  a byte-level run alike (train/hf/tokenizer_files.py);
- torchrig.json: the source (its path relative to DIR, its name, step and manifest digest) and the model keys
  config.json has no place for.

A LoRA run (train.lora, train/lora.py) gets its adapters in peft's format instead (train/hf/adapter.py):
adapter_model.safetensors and adapter_config.json, whose base_model_name_or_path is the run's train.init_from as
given; `peft.PeftModel.from_pretrained(<transformers model of that base>, DIR)` loads it. --merge (make's
MERGE=1) writes the whole model instead, each adapted weight W + alpha / r * B A, in the layout above.

A family without one (resnet50, a plugin's) gets torchrig's own format: model.safetensors and config.json
{"model", "export"}. --dtype bf16 halves the parameters; buffers (the MoE routing bias) stay float32, because
routing decisions hinge on their small steps. DIR is written beside itself and moved into place at the end, so
a failure leaves it as it was; a non-empty DIR is refused unless --force 1, which then replaces only the files
an export writes. Read an export with AutoModelForCausalLM.from_pretrained(DIR), or here with `make sample
RUN_DIR=DIR`, `make eval RUN_DIR=DIR DATA=...` and ARGS="train.init_from=DIR".
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from env.common.atomic import write_fix
from env.common.cli import ArgumentParser, UserError, run_cli
from env.common.outputs import OutputLock, remove_leftovers
from train import lora
from train.config import LoRAConfig
from train.hf import adapter, tokenizer_files
from train.hf.directory import CONFIG, is_hf_directory, write_directory
from train.hf.files import (
    OutputError,
    WeightsError,
    check_output,
    is_regular,
    publishing,
    read_json,
    write_json,
)
from train.hf.shards import DEFAULT_SHARD, parse_size
from train.models import build_model, get_spec
from train.tokenizer import sha256_of
from train.weights import (
    EXPORT_CONFIG,
    EXPORT_FORMAT,
    EXPORT_WEIGHTS,
    find_tokenizer,
    load_model_weights,
    lora_config,
    model_config,
    saved_config,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BYTE_VOCAB = 256


class ExportError(UserError):
    """An export that cannot be written; one line with the fix."""


def parameter_names(config: dict) -> set[str]:
    with torch.device("meta"):
        return {name for name, _ in build_model(model_config(config, "the checkpoint")).named_parameters()}


def export(
    run_dir: Path,
    output: Path,
    dtype: str = "fp32",
    force: bool = False,
    shard: str = DEFAULT_SHARD,
    merge: bool = False,
) -> dict:
    """Write the export of run_dir's newest valid checkpoint (or of another export) into output: a LoRA run's
    adapter (its merged model with `merge`).

    The directory is owned for the write (env/common/outputs.py): a second export into it is refused, what a
    killed one left beside it is removed, and the new directory replaces the old one in one rename.
    """
    if output.is_symlink():  # the new directory replaces OUTPUT in one rename: a link would be replaced, not followed
        raise ExportError(f"OUTPUT={output} is a symlink; give the directory itself")
    try:
        output.absolute().parent.mkdir(parents=True, exist_ok=True)
        lock = OutputLock(output, "OUTPUT").acquire()
    except OSError as exc:
        raise ExportError(
            f"cannot write {output} ({exc.strerror}); {write_fix(exc).replace('RUN_DIR', 'OUTPUT')}"
        ) from None
    try:
        remove_leftovers(output.absolute().parent, [output.name])
        return _export(run_dir, output, dtype, force, shard, merge)
    finally:
        lock.release()


def _export(run_dir: Path, output: Path, dtype: str, force: bool, shard: str, merge: bool) -> dict:
    in_a_run = (output / "checkpoints").exists() or (output / "manifest.json").exists()
    if (output.exists() and output.resolve() == run_dir.resolve()) or in_a_run:
        # sampling and fine-tuning read an export before checkpoints: one inside a run would hide newer training
        raise ExportError(f"OUTPUT={output} is a training run's directory; export into a directory of its own")
    try:
        check_output(output, force)  # before reading any weights
        max_shard = parse_size(shard)
    except (OutputError, WeightsError) as exc:
        raise ExportError(str(exc)) from None
    settings = lora_config(saved_config(run_dir))
    if merge and not settings.rank:
        raise ExportError(
            f"MERGE=1 merges a LoRA run's adapters, and {run_dir} has none (train.lora.rank=0); export without MERGE"
        )
    # each reader checks that the weights fit first
    state, config, step = load_model_weights(run_dir, adapters=bool(settings.rank) and not merge)
    cfg = model_config(config, run_dir)
    if settings.rank and not merge:
        return _export_adapter(run_dir, output, force, state, config, step, dtype, settings)
    params = parameter_names(config)
    tensors = {
        key: (value.to(DTYPES[dtype]) if key in params and value.is_floating_point() else value).contiguous()
        for key, value in state.items()
    }
    spec = get_spec(cfg.arch)
    changes: list[str] = []  # what FORCE=1 replaced and removed
    try:
        if spec.hf is None:
            tokenizer = find_tokenizer(run_dir, config)
            _never_a_link(tokenizer)
            with publishing(output, force, changes) as folder:
                files = _write_torchrig_format(folder, config, tensors, step, dtype, tokenizer, run_dir, output)
            kind = "torchrig"
        else:
            hf_tokenizer = _tokenizer(run_dir, config, cfg)
            provenance = _provenance(run_dir, output, step, dtype, config)
            with publishing(output, force, changes) as folder:
                files = write_directory(folder, cfg, tensors, hf_tokenizer, provenance, DTYPES[dtype], max_shard)
            kind = spec.hf.to_config(cfg)["model_type"]
    except OutputError as exc:
        raise ExportError(str(exc)) from None
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    caveats = spec.hf.caveats(cfg, tensors) if spec.hf else []
    return {"step": step, "tensors": len(tensors), "bytes": size, "files": files, "kind": kind, "caveats": caveats,
            "changes": changes}  # fmt: skip


def _export_adapter(
    run_dir: Path,
    output: Path,
    force: bool,
    state: dict[str, torch.Tensor],
    config: dict[str, Any],
    step: int,
    dtype: str,
    settings: LoRAConfig,
) -> dict:
    """A LoRA run's adapters as peft's adapter directory."""
    cfg = model_config(config, run_dir)
    if get_spec(cfg.arch).hf is None:
        raise ExportError(
            f"model.arch={cfg.arch} has no Hugging Face model, so no peft adapter; export the merged model with MERGE=1"
        )
    base = (config.get("train") or {}).get("init_from") or None
    changes: list[str] = []  # what FORCE=1 replaced and removed
    try:
        with publishing(output, force, changes) as folder:
            files = adapter.write_adapter(folder, cfg, state, settings, base, DTYPES[dtype])
    except OutputError as exc:
        raise ExportError(str(exc)) from None
    tensors = [value for key, value in state.items() if lora.is_adapter_key(key)]
    size = sum(t.numel() * DTYPES[dtype].itemsize for t in tensors)
    caveats = [] if base else [
        "the run has no train.init_from: its base is its own initial weights, which no Hugging Face directory "
        "holds; MERGE=1 exports the whole model"
    ]  # fmt: skip
    return {"step": step, "tensors": len(tensors), "bytes": size, "files": files, "kind": "peft", "caveats": caveats,
            "changes": changes}  # fmt: skip


def _tokenizer(run_dir: Path, config: dict[str, Any], cfg: Any) -> tokenizer_files.TokenizerFiles:
    """The tokenizer files: a Hugging Face source's own, else from the run's tokenizer.json, else (a byte-level
    model) the byte tokenizer; none for a model of more than 256 ids without a tokenizer (synthetic data)."""
    if is_hf_directory(run_dir):
        own = tokenizer_files.from_directory(run_dir, read_json(run_dir / CONFIG, "give a valid config.json"))
        if own is not None:
            return own
    tokenizer = find_tokenizer(run_dir, config)
    _never_a_link(tokenizer)
    if tokenizer is None and cfg.vocab_size > BYTE_VOCAB:
        return tokenizer_files.TokenizerFiles()
    return tokenizer_files.for_run(tokenizer, cfg.max_seq_len)


def _never_a_link(tokenizer: Path | None) -> None:
    """A run's tokenizer.json is copied out only as the file itself: a link, wherever it points (a secret the
    exporting user can read), is refused; a Hugging Face directory's own files may be links (its hub cache)."""
    if tokenizer is not None and tokenizer.is_symlink():
        raise ExportError(
            f"{tokenizer} is a symlink, which is never copied out; copy the run's tokenizer file itself there"
        )


def _provenance(run_dir: Path, output: Path, step: int, dtype: str, config: dict[str, Any]) -> dict[str, Any]:
    """Where the weights came from, with paths relative to the export (it may move; this machine's layout stays)."""
    manifest = run_dir / "manifest.json"
    seq_len = (config.get("data") or {}).get("seq_len")
    return {
        "source": {
            "run": os.path.relpath(run_dir.absolute(), output.absolute()),
            "name": run_dir.absolute().name,
            "step": step,
            "manifest_sha256": sha256_of(manifest) if is_regular(manifest) else None,
        },
        "dtype": dtype,
        **({"data": {"seq_len": seq_len}} if isinstance(seq_len, int) else {}),
    }


def _write_torchrig_format(
    folder: Path,
    config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    step: int,
    dtype: str,
    tokenizer: Path | None,
    run_dir: Path,
    output: Path,
) -> list[str]:
    """torchrig's own export (train/weights.py reads it): for a family transformers has no class for."""
    from safetensors.torch import save_file

    save_file(tensors, folder / EXPORT_WEIGHTS, metadata={"format": "pt", "torchrig_step": str(step)})
    source = os.path.relpath(run_dir.absolute(), output.absolute())
    export_record = {"format": EXPORT_FORMAT, "step": step, "dtype": dtype, "source": source}
    write_json(folder / EXPORT_CONFIG, {"model": config["model"], "export": export_record})
    files = [EXPORT_CONFIG, EXPORT_WEIGHTS]
    if tokenizer is not None:
        text, _ = tokenizer_files.read_tokenizer(tokenizer)  # a regular file that parses, or one line
        (folder / tokenizer_files.TOKENIZER).write_text(text, encoding="utf-8")
        files.append(tokenizer_files.TOKENIZER)
    return sorted(files)


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m train.export", description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="", help="a run directory (its newest valid checkpoint) or an export")
    parser.add_argument("--output", default="", help="the directory to write")
    parser.add_argument("--dtype", default="fp32", help="fp32 (default) or bf16")
    parser.add_argument("--shard", default=DEFAULT_SHARD, help=f"largest weights file (default {DEFAULT_SHARD})")
    parser.add_argument("--force", action="store_true", help="write into a non-empty OUTPUT (FORCE=1)")
    parser.add_argument("--merge", action="store_true", help="a LoRA run's whole model, adapters merged (MERGE=1)")
    args = parser.parse_args(argv)
    for value, name in ((args.run_dir, "RUN_DIR"), (args.output, "OUTPUT")):
        if not value:
            raise ExportError(f"{name} is not set; e.g. make export RUN_DIR=runs/tiny-x OUTPUT=exports/tiny-x")
    if args.dtype not in DTYPES:
        raise ExportError(f"DTYPE={args.dtype} is not one of {', '.join(DTYPES)}")
    output = Path(args.output)
    done = export(Path(args.run_dir), output, args.dtype, args.force, args.shard, args.merge)
    for caveat in done["caveats"]:
        print(f"torchrig export: note: {caveat}", file=sys.stderr)
    if done["changes"]:  # FORCE=1 over an earlier export: never silently
        print(f"torchrig export: FORCE=1 {', '.join(done['changes'])} in {output}")
    weights = [name for name in done["files"] if name.endswith(".safetensors")]
    where = shlex.quote(str(output))
    if done["kind"] == "peft":
        print(
            f"torchrig export: wrote {output} (peft LoRA adapter: {done['tensors']} tensors, "
            f"{done['bytes'] / 2**20:.1f} MiB {args.dtype}, step {done['step']}; {', '.join(done['files'])}); load it "
            f"with PeftModel.from_pretrained(<the base model>, {json.dumps(str(output))}); MERGE=1 for the whole model"
        )
        return 0
    loads = f"AutoModelForCausalLM.from_pretrained({json.dumps(str(output))}), " if done["kind"] != "torchrig" else ""
    print(
        f"torchrig export: wrote {output} ({done['kind']}: {done['tensors']} tensors, {done['bytes'] / 2**20:.1f} MiB "
        f"{args.dtype} in {len(weights)} safetensors file(s), step {done['step']}; {', '.join(done['files'])}); "
        f"load it with {loads}make sample RUN_DIR={where} or make train " + shlex.quote(f"ARGS=train.init_from={where}")
    )
    return 0


if __name__ == "__main__":
    run_cli("export", main)
