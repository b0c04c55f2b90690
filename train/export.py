"""`make export`: a run's weights as a self-contained directory that leaves torchrig.

    python -m train.export --run-dir RUN_DIR --output DIR [--dtype fp32|bf16] [--force 1]

DIR gets `model.safetensors` (the model's parameters and persistent buffers, nothing of the
optimizer, RNG or schedule; from a DDP or an FSDP checkpoint alike), `config.json` ({"model":
the model config, "export": where it came from}) and the run's `tokenizer.json` when it has one.
--dtype bf16 halves the parameters; buffers (the MoE routing bias) stay float32, because routing
decisions hinge on their small steps. A non-empty DIR is refused unless --force 1, which then
replaces only these files. Load an export with train.weights.load_model_weights, sample from it
with `make sample RUN_DIR=DIR`, or fine-tune from it with ARGS="train.init_from=DIR".
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from pathlib import Path

import torch

from env.common.atomic import replace_atomically, write_fix
from env.common.cli import ArgumentParser, UserError, run_cli
from train.models import build_model
from train.weights import (
    EXPORT_CONFIG,
    EXPORT_FORMAT,
    EXPORT_WEIGHTS,
    TOKENIZER_FILE,
    find_tokenizer,
    load_model_weights,
    model_config,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class ExportError(UserError):
    """An export that cannot be written; one line with the fix."""


def parameter_names(config: dict) -> set[str]:

    with torch.device("meta"):
        return {name for name, _ in build_model(model_config(config, "the checkpoint")).named_parameters()}


def export(run_dir: Path, output: Path, dtype: str = "fp32", force: bool = False) -> dict:
    """Write the export of run_dir's newest valid checkpoint (or of another export) into output."""
    from safetensors.torch import save

    if output.exists() and not output.is_dir():
        raise ExportError(f"OUTPUT={output} is a file; give a directory")
    in_a_run = (output / "checkpoints").exists() or (output / "manifest.json").exists()
    if output.resolve() == run_dir.resolve() or in_a_run:
        # sampling and fine-tuning read an export before checkpoints: one inside a run would hide newer training
        raise ExportError(f"OUTPUT={output} is a training run's directory; export into a directory of its own")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise ExportError(f"OUTPUT={output} is not empty; choose an empty or new directory, or set FORCE=1 to replace")
    state, config, step = load_model_weights(run_dir)
    params = parameter_names(config)
    tensors = {
        key: (value.to(DTYPES[dtype]) if key in params and value.is_floating_point() else value).contiguous()
        for key, value in state.items()
    }
    tokenizer = find_tokenizer(run_dir, config)
    exported = {
        "model": config["model"],
        "export": {"format": EXPORT_FORMAT, "step": step, "dtype": dtype, "source": str(run_dir)},
    }
    try:
        output.mkdir(parents=True, exist_ok=True)
        blob = save(tensors, metadata={"format": "pt", "torchrig_step": str(step), "torchrig_dtype": dtype})
        replace_atomically(output / EXPORT_WEIGHTS, lambda handle: handle.write(blob), mode="wb")
        replace_atomically(output / EXPORT_CONFIG, lambda handle: handle.write(json.dumps(exported, indent=1) + "\n"))
        target = output / TOKENIZER_FILE
        if tokenizer is not None and tokenizer.resolve() != target.resolve():
            replace_atomically(target, lambda handle: handle.write(tokenizer.read_bytes()), mode="wb")
        elif tokenizer is None:
            target.unlink(missing_ok=True)  # a forced export over an older one keeps no stale tokenizer
    except OSError as exc:
        fix = write_fix(exc).replace("RUN_DIR", "OUTPUT")
        raise ExportError(f"cannot write {output} ({exc.strerror}); {fix}") from None
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    return {"step": step, "tensors": len(tensors), "bytes": size, "tokenizer": tokenizer is not None}


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m train.export", description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="", help="a run directory (its newest valid checkpoint)")
    parser.add_argument("--output", default="", help="the directory to write")
    parser.add_argument("--dtype", default="fp32", help="fp32 (default) or bf16")
    parser.add_argument("--force", action="store_true", help="write into a non-empty OUTPUT (FORCE=1)")
    args = parser.parse_args(argv)
    for value, name in ((args.run_dir, "RUN_DIR"), (args.output, "OUTPUT")):
        if not value:
            raise ExportError(f"{name} is not set; e.g. make export RUN_DIR=runs/tiny-x OUTPUT=exports/tiny-x")
    if args.dtype not in DTYPES:
        raise ExportError(f"DTYPE={args.dtype} is not one of {', '.join(DTYPES)}")
    output = Path(args.output)
    done = export(Path(args.run_dir), output, args.dtype, args.force)
    print(
        f"torchrig export: wrote {output}/{EXPORT_WEIGHTS} ({done['tensors']} tensors, {done['bytes'] / 2**20:.1f} MiB "
        f"{args.dtype}, step {done['step']}), {EXPORT_CONFIG}"
        + (f", {TOKENIZER_FILE}" if done["tokenizer"] else "")
        + f"; sample with make sample RUN_DIR={shlex.quote(str(output))}, fine-tune with make train "
        + shlex.quote(f"ARGS=train.init_from={shlex.quote(str(output))}")
    )
    return 0


if __name__ == "__main__":
    run_cli("export", main)
