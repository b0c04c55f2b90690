"""Export (a Hugging Face model directory) from DDP and FSDP checkpoints, and fine-tuning with train.init_from."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.helpers.make import make, needs_make
from tests.helpers.sampling import save_checkpoint, small_config, tool_lines, trained_in_process
from tests.helpers.trainrun import launch_train, metrics
from train.data import build_dataset, build_loader
from train.export import ExportError, export
from train.weights import WeightsError, build_loaded_model, load_model_weights

# What an export of a byte-level run holds (tests/train/hf/test_to_transformers.py: what transformers makes of it).
HF_FILES = sorted(["config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
                   "tokenizer.json", "tokenizer_config.json", "torchrig.json"])  # fmt: skip


def logits_of(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(tokens)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_an_export_loads_into_a_fresh_model_with_identical_logits(tmp_path: Path, strategy: str) -> None:
    cfg = small_config()
    model = trained_in_process(cfg)
    save_checkpoint(tmp_path / "run", model, cfg, step=2, strategy=strategy)
    export(tmp_path / "run", tmp_path / "export")
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == HF_FILES

    loaded, config, step = build_loaded_model(tmp_path / "export", torch.device("cpu"))
    assert step == 2 and config["model"] == cfg.to_dict()["model"]
    tokens = torch.randint(0, 256, (2, 40))
    assert torch.equal(logits_of(loaded, tokens), logits_of(model, tokens))
    # Weights only: the routing biases travel (they choose experts), the optimizer does not.
    state, _, _ = load_model_weights(tmp_path / "export")
    assert state.keys() == model.state_dict().keys()
    assert any(key.endswith("expert_bias") and state[key].abs().sum() > 0 for key in state)


def test_a_bf16_export_halves_the_parameters_and_keeps_buffers_in_fp32(tmp_path: Path) -> None:
    cfg = small_config()
    model = trained_in_process(cfg)
    save_checkpoint(tmp_path / "run", model, cfg, step=2)
    export(tmp_path / "run", tmp_path / "export", dtype="bf16")
    state, _, _ = load_model_weights(tmp_path / "export")
    params = dict(model.named_parameters())
    assert all(state[name].dtype == torch.bfloat16 for name in params)
    assert all(state[name].dtype == torch.float32 for name in state if name.endswith("expert_bias"))
    loaded, _, _ = build_loaded_model(tmp_path / "export", torch.device("cpu"))
    tokens = torch.randint(0, 256, (2, 40))
    torch.testing.assert_close(logits_of(loaded, tokens), logits_of(model, tokens), rtol=0.05, atol=0.05)


def test_export_refuses_a_non_empty_output_unless_forced(tmp_path: Path) -> None:
    cfg = small_config()
    save_checkpoint(tmp_path / "run", trained_in_process(cfg), cfg, step=2)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match=r"OUTPUT=.* is not empty; .* set FORCE=1"):
        export(tmp_path / "run", tmp_path / "out")
    (tmp_path / "out" / "tokenizer.json").write_text("{}")  # left by an older export of a tokenized run
    export(tmp_path / "run", tmp_path / "out", force=True)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == sorted([*HF_FILES, "notes.txt"])  # the user's file stays, the stale one is replaced
    assert (tmp_path / "out" / "tokenizer.json").read_text() != "{}"


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path: Path) -> None:
    cfg = small_config()
    older = trained_in_process(cfg, steps=1)
    save_checkpoint(tmp_path, older, cfg, step=1)
    save_checkpoint(tmp_path, trained_in_process(cfg, steps=2), cfg, step=2)
    tensors = max((tmp_path / "checkpoints" / "step-000002").glob("*.distcp"), key=lambda p: p.stat().st_size)
    tensors.write_bytes(tensors.read_bytes()[:-10] + b"0123456789")  # same size: only the sha256 can tell
    state, _, step = load_model_weights(tmp_path)
    assert step == 1
    assert all(torch.equal(state[k], v) for k, v in older.state_dict().items())


@needs_make
@pytest.mark.slow
def test_make_export_into_a_non_empty_directory_is_one_line(tmp_path: Path) -> None:
    cfg = small_config()
    save_checkpoint(tmp_path / "run", trained_in_process(cfg), cfg, step=2)
    assert make("export", f"RUN_DIR={tmp_path / 'run'}", f"OUTPUT={tmp_path / 'out'}").returncode == 0
    again = make("export", f"RUN_DIR={tmp_path / 'run'}", f"OUTPUT={tmp_path / 'out'}", "DTYPE=bf16")
    assert again.returncode == 2
    assert tool_lines(again) == [f"torchrig export: OUTPUT={tmp_path / 'out'} is not empty; choose an empty or new "
                                 "directory, or set FORCE=1 to replace"]  # fmt: skip
    forced = make("export", f"RUN_DIR={tmp_path / 'run'}", f"OUTPUT={tmp_path / 'out'}", "DTYPE=bf16", "FORCE=1")
    assert forced.returncode == 0, forced.stderr
    assert json.loads((tmp_path / "out" / "torchrig.json").read_text())["dtype"] == "bf16"


def test_an_export_into_a_run_directory_is_refused(tmp_path: Path) -> None:
    cfg = small_config()
    save_checkpoint(tmp_path / "run", trained_in_process(cfg), cfg, step=2)
    with pytest.raises(ExportError, match="training run's directory"):
        export(tmp_path / "run", tmp_path / "run", force=True)
    assert not (tmp_path / "run" / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# Fine-tuning


def first_batch_loss(model: torch.nn.Module, overrides: list[str]) -> float:
    """The loss of `model` on the first global batch of a one-process run with these overrides."""
    cfg = small_config(*overrides)
    inputs, targets = next(iter(build_loader(build_dataset(cfg), cfg, rank=0, world_size=1, start_step=0)))
    with torch.no_grad():
        return float(model.train()(inputs, targets))


@pytest.mark.slow
def test_init_from_starts_a_new_run_from_the_exported_weights(tmp_path: Path) -> None:
    cfg = small_config()
    save_checkpoint(tmp_path / "source", trained_in_process(cfg, steps=3), cfg, step=3)
    export(tmp_path / "source", tmp_path / "export")
    exported, _, _ = build_loaded_model(tmp_path / "export", torch.device("cpu"))

    run_dir = tmp_path / "finetune"
    init = f"train.init_from={tmp_path / 'export'}"
    result = launch_train(run_dir, 1, 2, init, "train.ckpt_every=1")
    assert result.returncode == 0, result.stderr[-2000:]
    first = metrics(run_dir)[0]
    assert first["step"] == 1
    assert math.isclose(first["loss"], first_batch_loss(exported, []), rel_tol=1e-6)
    # A fresh schedule: step 1 is the first warmup step, not the source run's step 4.
    assert first["lr"] == pytest.approx(small_config().train.lr / small_config().train.warmup_steps)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["config"]["train"]["init_from"] == str(tmp_path / "export")

    # Resuming the fine-tuning run reads its own checkpoint: init_from is ignored, even when gone.
    for path in (tmp_path / "export").iterdir():
        path.unlink()
    resumed = launch_train(run_dir, 1, 3, init)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from step 2" in resumed.stdout


@pytest.mark.slow
def test_init_from_with_a_model_key_of_another_value_names_it_and_both_values(tmp_path: Path) -> None:
    cfg = small_config()
    save_checkpoint(tmp_path / "source", trained_in_process(cfg), cfg, step=2)
    result = launch_train(tmp_path / "run", 1, 1, f"train.init_from={tmp_path / 'source'}", "model.kv_lora_rank=16")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("torchrig")]
    assert lines == [
        f"torchrig train: model.kv_lora_rank=16 contradicts train.init_from={tmp_path / 'source'}, whose model has "
        "kv_lora_rank=32; drop model.kv_lora_rank: the model comes from init_from"
    ], result.stderr


def test_init_from_without_weights_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=r"nothing is not a directory; give a run directory"):
        small_config(f"train.init_from={tmp_path / 'nothing'}")  # the model comes from there
