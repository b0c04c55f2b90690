"""The model registry: a model of one's own trains from its own file; arch names never import code."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from env.rig.runtime import STAMP, _lock_digest
from tests.helpers.gloo import finish_gloo_worker, free_port
from tests.helpers.paths import ROOT
from tests.helpers.toy_model import SPEC as TOY
from tests.helpers.trainrun import metrics
from train.config import ModelConfig
from train.config_loader import load_config
from train.distributed import DistInfo, wrap_model
from train.errors import ConfigError
from train.models import BUILT_IN, build_model, get_spec, registered
from train.models.resnet import ResNetConfig

TOY_ARGS = [
    "model.arch=toy",
    "model.dim=32",
    "model.n_layers=2",
    "data.seq_len=16",
    "train.precision=fp32",
    "train.log_every=1",
    "train.warmup_steps=1",
    "data.num_workers=0",
]


def make_is_ready() -> bool:
    """`make train RUNTIME=local` runs in .venv; only where that is made already (make test makes it)."""
    ready = STAMP.exists() and STAMP.read_text().strip() == _lock_digest()
    return shutil.which("make") is not None and ready


def test_a_toy_model_from_a_test_file_trains_through_make_train(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    monkeypatch.setenv("TORCHRIG_MODELS", "tests.helpers.toy_model")  # the only thing the user sets
    if make_is_ready():
        args = " ".join(TOY_ARGS)
        command = ["make", "train", "RUNTIME=local", "GPUS=2", "STEPS=3", "CONFIG=tiny", f"RUN_DIR={run_dir}"]
        command.append(f"ARGS={args}")
    else:  # what make's recipe runs, where make or .venv is missing (the image leaves make out)
        command = [sys.executable, "-m", "train.launch", "--gpus", "2", "--steps", "3", "--config", "tiny"]
        command += ["--run-dir", str(run_dir), *TOY_ARGS]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]

    records = metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["tokens_per_sec"] for r in records)
    # The trainer took the toy's own FLOP counter, and saved the toy at the end.
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["flops_per_sample"] == TOY.flops_per_sample(load_config("tiny", TOY_ARGS).model, 16)
    assert any((run_dir / "checkpoints").iterdir())


def test_unknown_arch_is_one_line_naming_the_closest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCHRIG_MODELS", raising=False)
    with pytest.raises(ConfigError, match=r"model.arch='resnet5' is not a registered model; did you mean 'resnet50'"):
        load_config("tiny", ["model.arch=resnet5"])
    result = subprocess.run(
        [sys.executable, "-m", "train.launch", "--config", "tiny", "model.arch=deepsek"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={k: v for k, v in os.environ.items() if k != "TORCHRIG_MODELS"},
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("torchrig train: model.arch='deepsek'")
    assert "did you mean 'deepseek'" in result.stderr


def test_a_config_names_a_model_and_never_imports_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A module named by model.arch (a command-line override or a YAML file) is not imported."""
    marker = tmp_path / "imported"
    (tmp_path / "planted.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("TORCHRIG_MODELS", raising=False)
    config = tmp_path / "planted.yaml"
    config.write_text("model:\n  arch: planted\n")
    for attempt in (lambda: load_config("tiny", ["model.arch=planted"]), lambda: load_config(str(config))):
        with pytest.raises(ConfigError, match="not a registered model"):
            attempt()
    with pytest.raises(ConfigError, match="not a registered model"):
        build_model(ModelConfig(arch="planted"))
    assert not marker.exists() and "planted" not in sys.modules

    # make exports its command-line variables, so `make train TORCHRIG_MODELS=planted` is refused too.
    monkeypatch.setenv("TORCHRIG_MODELS", "planted")
    monkeypatch.setenv("MAKEFLAGS", " -- GPUS=2 TORCHRIG_MODELS=planted")
    with pytest.raises(ConfigError, match="TORCHRIG_MODELS was given as a make variable"):
        load_config("tiny", ["model.arch=planted"])
    assert not marker.exists() and "planted" not in sys.modules


@pytest.mark.parametrize(
    ("source", "value", "expected"),
    [
        (None, "no_such_module_here", "no module 'no_such_module_here'"),
        (None, "os; rm", "is not a module name"),
        ("x = 1\n", "{name}", "has no SPEC = train.models.ModelSpec"),
        ("import os\n\nraise RuntimeError('boom')\n", "{name}", "failed at {path}:3: RuntimeError: boom"),
        ("def broken(:\n", "{name}", "failed at {path}:1: SyntaxError"),
        ("import dataclasses\nfrom tests.helpers.toy_model import SPEC\n"
         "SPEC = dataclasses.replace(SPEC, name='deepseek')\n",
         "{name}", "registers model.arch='deepseek', which another spec already has"),
    ],
    ids=["missing", "not-a-name", "no-spec", "raises", "syntax", "clash"],
)  # fmt: skip
def test_plugin_problems_are_one_line(
    source: str | None, value: str, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request
) -> None:
    name = f"plugin_{request.node.callspec.id.replace('-', '_')}_{os.getpid()}"
    path = tmp_path / f"{name}.py"
    if source is not None:
        path.write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("TORCHRIG_MODELS", value.format(name=name))
    with pytest.raises(ConfigError) as caught:
        get_spec("deepseek")
    message = str(caught.value)
    assert expected.format(path=path) in message and "\n" not in message
    assert message.startswith("TORCHRIG_MODELS")


def test_every_built_in_family_builds_counts_and_shards(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCHRIG_MODELS", raising=False)
    small = {
        "deepseek": load_config("tiny", ["model.mtp_depth=1"]).model,
        "llama": load_config("llama-tiny", ["model.tie_embeddings=true"]).model,
        "resnet50": ResNetConfig(num_classes=10),
    }
    assert set(registered()) == set(small) and len(BUILT_IN) == len(small)
    for arch, cfg in small.items():
        spec = get_spec(arch)
        model = build_model(cfg)
        units = spec.shard_units(model)
        inside = {id(module) for module in model.modules()}
        assert units and all(isinstance(u, nn.Module) and id(u) in inside for u in units), arch
        nested = [a for a in units for b in units if a is not b and any(m is a for m in b.modules())]
        assert not nested, arch
        assert spec.count_params(cfg).total == sum(p.numel() for p in model.parameters()), arch
    assert len(get_spec("deepseek").shard_units(build_model(small["deepseek"]))) == small["deepseek"].n_layers + 1


def fsdp_wrap_worker(rank: int, port: int, plugins: str) -> None:
    sys.path.insert(0, plugins)
    plugins_env = "tests.helpers.toy_model,toy_ends"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHRIG_MODELS=plugins_env)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    info = DistInfo(rank, rank, 2, torch.device("cpu"), "gloo")
    for overrides in (["model.mtp_depth=1"], TOY_ARGS, [*TOY_ARGS, "model.arch=toy_ends"]):
        cfg = load_config("tiny", [*overrides, "train.strategy=fsdp"])
        model = build_model(cfg.model)
        units = get_spec(cfg.model.arch).shard_units(model)
        wrap_model(model, cfg, info, param_dtype=None)
        # fully_shard turns a module into an FSDP module: exactly the spec's units and the root are.
        sharded = [module for module in model.modules() if hasattr(module, "reshard")]
        assert [id(m) for m in sharded] == [id(model), *map(id, units)], cfg.model.arch
    finish_gloo_worker()


def test_fsdp_shards_the_units_each_spec_names(tmp_path: Path) -> None:
    # Units unlike the built-ins' (blocks in .layers): the embedding and the head of the toy.
    (tmp_path / "toy_ends.py").write_text(
        "import dataclasses\nfrom tests.helpers.toy_model import SPEC as TOY\n\n"
        "SPEC = dataclasses.replace(TOY, name='toy_ends', shard_units=lambda model: [model.embed, model.head])\n"
    )
    mp.spawn(fsdp_wrap_worker, args=(free_port(), str(tmp_path)), nprocs=2)
