"""Issue 16 class 7: one bound on modules, activations and parameters, against the memory actually available.

10 million tiny experts passed the parameter check and hung while modules were built (in train, in
make sample of an export, in export); data.seq_len=1048576 was not refused (OOM in 13 s); the check
read the host's RAM, not the container's or the job's limit; export and sample built the real model
before any check (dim=65536 vocab_size=1e9: an allocator error). Each is refused in one line, from the
config alone, before a module is built.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from env.common.cli import UserError
from tests.helpers.sampling import small_config, trained_in_process, write_export
from train import launch
from train.config_loader import load_config
from train.models import build_model, get_spec
from train.weights import load_model_weights

# A MoE of 10 million one-wide experts: few parameters, 40 million modules per MoE layer.
TINY_EXPERTS = [
    "model.n_routed_experts=10000000", "model.moe_inter_dim=1", "model.dim=2", "model.n_heads=1",
    "model.kv_lora_rank=1", "model.qk_nope_head_dim=1", "model.qk_rope_head_dim=2", "model.v_head_dim=1",
]  # fmt: skip


def refused_fast(action, expected: str) -> str:
    """The one-line refusal of `action`; a model being built instead would take hours (no timing asserted)."""
    with pytest.raises(UserError) as caught:
        action()
    message = str(caught.value)
    assert "\n" not in message and expected in message, message
    return message


def test_ten_million_tiny_experts_are_refused_before_any_module_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    built = []
    monkeypatch.setattr(torch.nn.Module, "__init__", lambda *a, **k: built.append(1))  # any build is seen
    refused_fast(lambda: load_config("tiny", TINY_EXPERTS), "model.n_routed_experts=10,000,000 exceeds")
    assert built == []


def test_a_million_token_sequence_is_refused_by_its_activations() -> None:
    cfg = load_config("tiny", ["data.seq_len=1048576", "model.max_seq_len=1048576"])
    refused_fast(lambda: launch.check_fits(cfg, 1, 1, False), "activations at least")


@pytest.mark.parametrize(
    ("model", "expected"),
    [({"dim": 65536, "vocab_size": 1_000_000_000}, "parameters"), (None, "n_routed_experts")],
    ids=["dim=65536 vocab=1e9", "10 million experts"],
)
def test_an_exports_config_is_checked_before_anything_is_built_or_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: dict | None, expected: str
) -> None:
    cfg = small_config()
    write_export(tmp_path / "export", trained_in_process(cfg, steps=0), cfg.to_dict()["model"])
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    config["model"] |= model or {k.split("=")[0][6:]: int(k.split("=")[1]) for k in TINY_EXPERTS}
    (tmp_path / "export" / "config.json").write_text(json.dumps(config))
    built = []
    monkeypatch.setattr(torch.nn.Module, "__init__", lambda *a, **k: built.append(1))
    refused_fast(lambda: load_model_weights(tmp_path / "export"), expected)
    assert built == []


def test_the_module_count_is_the_built_models() -> None:
    spec = get_spec("deepseek")
    for overrides in ([], ["model.q_lora_rank=16"], ["model.n_routed_experts=0"], ["model.n_shared_experts=0"]):
        cfg = load_config("tiny", overrides).model
        assert spec.count_modules(cfg) == sum(1 for _ in build_model(cfg).modules()), overrides


def saved_bytes(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> int:
    """Bytes the forward keeps for its backward, each storage once, the parameters left out."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(inputs, targets)
    return sum(seen.values())


@pytest.mark.parametrize("overrides", [[], ["model.n_routed_experts=0"], ["model.n_activated_experts=4"]])
def test_the_activation_estimate_is_a_lower_bound_of_what_the_forward_keeps(overrides: list[str]) -> None:
    cfg = load_config("tiny", ["data.seq_len=64", "model.max_seq_len=64", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 65))
    measured = saved_bytes(model, tokens[:, :-1], tokens[:, 1:])
    estimate = get_spec("deepseek").activations(cfg.model, 64, True) * 2 * 4
    assert measured / 4 < estimate <= measured, (estimate, measured)


def fake_root(tmp_path: Path, version: int, limit: str, usage: int, inactive: int) -> Path:
    """A /proc and /sys/fs/cgroup as a container sees them, with a memory limit."""
    root = tmp_path / "root"
    (root / "proc" / "self").mkdir(parents=True)
    (root / "proc" / "meminfo").write_text("MemTotal: 67108864 kB\nMemAvailable: 33554432 kB\n")  # 32 GiB
    if version == 2:
        (root / "proc/self/cgroup").write_text("0::/job/step\n")
        mount = "30 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
        leaf, names = root / "sys/fs/cgroup/job/step", ("memory.max", "memory.current", "inactive_file")
    else:
        (root / "proc/self/cgroup").write_text("4:memory:/docker/abc\n1:cpu:/docker/abc\n")
        mount = "35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
        names = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        leaf = root / "sys/fs/cgroup/memory/docker/abc"
    (root / "proc/self/mountinfo").write_text(mount)
    leaf.mkdir(parents=True)
    (leaf / names[0]).write_text(f"{limit}\n")
    (leaf / names[1]).write_text(f"{usage}\n")
    (leaf / "memory.stat").write_text(f"anon 1\n{names[2]} {inactive}\n")
    return root


@pytest.mark.parametrize("version", [1, 2])
def test_a_cgroup_limit_is_what_is_available(tmp_path: Path, version: int) -> None:
    """Docker --memory, Kubernetes limits and Slurm's cgroup plugin set these; page cache is not use."""
    from train.memory_bound import available_host_bytes

    root = fake_root(tmp_path, version, str(4 * 2**30), 3 * 2**30, 2**30)
    available, where = available_host_bytes(root)
    assert available == 2 * 2**30 and "cgroup limit" in where  # 4 GiB limit - (3 GiB used - 1 GiB cache)


def test_an_unlimited_cgroup_leaves_the_machines_available_memory(tmp_path: Path) -> None:
    from train.memory_bound import available_host_bytes

    root = fake_root(tmp_path, 2, "max", 2**30, 0)
    assert available_host_bytes(root) == (32 * 2**30, "this machine's available memory (MemAvailable)")
    root = fake_root(tmp_path / "v1", 1, "9223372036854771712", 2**30, 0)
    assert available_host_bytes(root)[0] == 32 * 2**30


def test_a_slurm_job_memory_is_what_is_available(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from train.memory_bound import available_host_bytes

    monkeypatch.setenv("SLURM_MEM_PER_NODE", "1024")
    assert available_host_bytes(fake_root(tmp_path, 2, "max", 0, 0)) == (2**30, "the Slurm job's memory (--mem=1024M)")


def test_a_small_limit_refuses_a_model_the_machine_would_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    from train import memory_bound

    cfg = load_config("tiny")
    launch.check_fits(cfg, 1, 1, False)  # fits this machine
    monkeypatch.setattr(memory_bound, "available_host_bytes", lambda: (2**20, "the cgroup limit (memory.max 1.0 MiB)"))
    refused_fast(lambda: launch.check_fits(cfg, 1, 1, False), "the cgroup limit (memory.max 1.0 MiB) leaves")
