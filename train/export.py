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
import os
import shlex
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from env.common.atomic import open_exclusive, write_fix
from env.common.cli import ArgumentParser, UserError, run_cli
from env.common.outputs import OutputLock, publish_dir, remove_leftovers, stage_dir
from train.models import build_model
from train.tokenizer import parse_tokenizer, read_tokenizer_bytes
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
EXPORT_FILES = (EXPORT_WEIGHTS, EXPORT_CONFIG, TOKENIZER_FILE)  # what an export owns in its directory


class ExportError(UserError):
    """An export that cannot be written; one line with the fix."""


def parameter_names(config: dict) -> set[str]:

    with torch.device("meta"):
        return {name for name, _ in build_model(model_config(config, "the checkpoint")).named_parameters()}


def export(run_dir: Path, output: Path, dtype: str = "fp32", force: bool = False) -> dict:
    """Write the export of run_dir's newest valid checkpoint (or of another export) into output.

    The directory is owned for the write (env/common/outputs.py): a second export into it is refused,
    what a killed one left is removed, and the new directory replaces the old one in one rename.
    """
    from safetensors.torch import save

    if output.is_symlink():  # the new directory replaces OUTPUT in one rename: a link would be replaced, not followed
        raise ExportError(f"OUTPUT={output} is a symlink; give the directory itself")
    if output.exists() and not output.is_dir():
        raise ExportError(f"OUTPUT={output} is a file; give a directory")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        lock = OutputLock(output, "OUTPUT").acquire()
    except OSError as exc:
        fix = write_fix(exc).replace("RUN_DIR", "OUTPUT")
        raise ExportError(f"cannot write {output} ({exc.strerror}); {fix}") from None
    try:
        remove_leftovers(output.parent, [output.name])
        in_a_run = (output / "checkpoints").exists() or (output / "manifest.json").exists()
        if output.resolve() == run_dir.resolve() or in_a_run:
            # sampling and fine-tuning read an export before checkpoints: one inside a run would hide newer training
            raise ExportError(f"OUTPUT={output} is a training run's directory; export into a directory of its own")
        if output.is_dir() and any(output.iterdir()) and not force:
            raise ExportError(
                f"OUTPUT={output} is not empty; choose an empty or new directory, or set FORCE=1 to replace"
            )
        state, config, step = load_model_weights(run_dir)
        params = parameter_names(config)
        tensors = {
            key: (value.to(DTYPES[dtype]) if key in params and value.is_floating_point() else value).contiguous()
            for key, value in state.items()
        }
        found = find_tokenizer(run_dir, config)
        # Found, not named: never a symlink, never anything but a regular file; parsed before it is copied.
        tokenizer = (
            read_tokenizer_bytes(found, "copy the run's tokenizer file itself there", follow=False) if found else None
        )
        if tokenizer is not None:
            parse_tokenizer(tokenizer, found)
        exported = {
            "model": config["model"],
            "export": {"format": EXPORT_FORMAT, "step": step, "dtype": dtype, "source": str(run_dir)},
        }
        try:
            staging = stage_dir(output)
            try:
                blob = save(tensors, metadata={"format": "pt", "torchrig_step": str(step), "torchrig_dtype": dtype})
                _write(staging / EXPORT_WEIGHTS, blob)
                _write(staging / EXPORT_CONFIG, (json.dumps(exported, indent=1) + "\n").encode())
                if tokenizer is not None:
                    _write(staging / TOKENIZER_FILE, tokenizer)
                # A forced export keeps the user's own files; of ours, a stale tokenizer.json goes (said below).
                published = publish_dir(staging, output, keep=lambda name: name not in EXPORT_FILES)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        except OSError as exc:
            fix = write_fix(exc).replace("RUN_DIR", "OUTPUT")
            raise ExportError(f"cannot write {output} ({exc.strerror}); {fix}") from None
    finally:
        lock.release()
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    return {"step": step, "tensors": len(tensors), "bytes": size, "tokenizer": tokenizer is not None,
            "replaced": published.replaced, "removed": published.removed}  # fmt: skip


def _write(path: Path, data: bytes) -> None:
    with open_exclusive(path) as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


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
        + (f" (FORCE=1 replaced {', '.join(done['replaced'])})" if done["replaced"] else "")
        + (
            f" (FORCE=1 removed {', '.join(done['removed'])}, which this export does not have)"
            if done["removed"]
            else ""
        )
        + f"; sample with make sample RUN_DIR={shlex.quote(str(output))}, fine-tune with make train "
        + shlex.quote(f"ARGS=train.init_from={shlex.quote(str(output))}")
    )
    return 0


if __name__ == "__main__":
    run_cli("export", main)
