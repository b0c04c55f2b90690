"""The container files say what the design needs, and env.rig.docker fails clearly without a Docker engine."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from pathlib import Path

import pytest
import yaml

from env.rig import docker
from env.rig.profiles import DEFAULT_CUDA, ROOT, profile

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, rest = pending.strip().partition(" ")
        instructions.append((keyword.upper(), " ".join(rest.split())))
        pending = ""
    return instructions


INSTRUCTIONS = dockerfile_instructions()


def _index(predicate) -> int:
    return next(i for i, instruction in enumerate(INSTRUCTIONS) if predicate(*instruction))


def _arg_defaults() -> dict[str, str]:
    pairs = [rest.split("=", 1) for keyword, rest in INSTRUCTIONS if keyword == "ARG" and "=" in rest]
    return {name: value for name, value in pairs}


# docker-compose.yml


def test_compose_file_has_no_obsolete_version_key() -> None:
    assert "version" not in COMPOSE


def test_gpu_service_reserves_every_nvidia_gpu() -> None:
    devices = SERVICES["gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert "profiles" not in SERVICES["gpu"]


def test_cpu_service_is_the_same_container_without_devices_behind_a_profile() -> None:
    cpu, gpu = dict(SERVICES["cpu"]), dict(SERVICES["gpu"])
    assert cpu.pop("profiles") == ["cpu"]
    assert "deploy" not in cpu
    gpu.pop("deploy")
    assert cpu == gpu


@pytest.mark.parametrize("service", ["gpu", "cpu"])
def test_services_have_nccl_friendly_limits_and_the_run_volumes(service: str) -> None:
    spec = SERVICES[service]
    assert spec["ulimits"] == {"memlock": -1, "stack": 67108864}
    assert spec["ipc"] == "host" or int(str(spec.get("shm_size", "0")).rstrip("gG")) >= 8
    assert spec["network_mode"] == "host"
    assert spec["working_dir"] == "/workspace"
    assert {f"./{name}:/workspace/{name}" for name in docker.VOLUME_DIRS} <= set(spec["volumes"])
    assert "TORCHRIG_UID" in spec["user"] and "TORCHRIG_GID" in spec["user"]


def test_services_pass_the_common_nccl_and_torch_variables_through() -> None:
    passed = set(SERVICES["gpu"]["environment"])
    wanted = {
        "NCCL_P2P_DISABLE",
        "NCCL_DEBUG",
        "NCCL_SOCKET_IFNAME",
        "NCCL_IB_DISABLE",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING",
        "TORCH_DISTRIBUTED_DEBUG",
    }
    assert wanted <= passed
    # Bare names pass the host's value through instead of fixing one in the file.
    assert all("=" not in name for name in passed)


# Dockerfile


def test_base_image_and_pins_default_to_the_default_profile() -> None:
    default = profile(DEFAULT_CUDA)
    assert INSTRUCTIONS[0] == ("ARG", f"BASE_IMAGE={default.base_image}")
    assert INSTRUCTIONS[1] == ("FROM", "${BASE_IMAGE}")
    args = _arg_defaults()
    assert args["LOCK_FILE"] == default.lock
    assert (args["TORCHRIG_CUDA"], args["TORCHRIG_NCCL"], args["TORCHRIG_TORCH"]) == (
        default.cuda,
        default.nccl,
        default.torch,
    )


def test_no_syntax_directive_that_would_pull_a_frontend_image() -> None:
    assert not re.search(r"^#\s*syntax\s*=", (ROOT / "Dockerfile").read_text(), re.MULTILINE)


def test_the_image_runs_as_the_fixed_non_root_user() -> None:
    users = [rest for keyword, rest in INSTRUCTIONS if keyword == "USER"]
    assert users[-1].split(":")[0] == str(docker.IMAGE_UID)
    assert any(keyword == "RUN" and f"useradd --uid {docker.IMAGE_UID}" in rest for keyword, rest in INSTRUCTIONS)


def test_lock_is_installed_with_hashes_before_code_and_checked_after() -> None:
    install = _index(lambda k, rest: k == "RUN" and "--require-hashes" in rest)
    code = _index(lambda k, rest: k == "COPY" and rest.startswith(". "))
    check = _index(lambda k, rest: k == "RUN" and "env.rig.profiles verify" in rest)
    pin_args = _index(lambda k, rest: k == "ARG" and rest.startswith("TORCHRIG_NCCL"))
    assert install < code < pin_args < check
    # The pins reach the check, so a wrong one fails the build.
    assert all(f'"${name}"' in INSTRUCTIONS[check][1] for name in ("TORCHRIG_CUDA", "TORCHRIG_NCCL"))


def test_pip_and_apt_use_cache_mounts_and_the_optional_ca_secret() -> None:
    runs = [rest for keyword, rest in INSTRUCTIONS if keyword == "RUN"]
    apt = next(r for r in runs if "apt-get" in r)
    pip = next(r for r in runs if "pip install" in r)
    assert "--mount=type=cache,target=/var/cache/apt" in apt
    assert "--mount=type=cache,target=/root/.cache/pip" in pip
    assert all("--mount=type=secret,id=ca_bundle" in r and "/run/secrets/ca_bundle" in r for r in (apt, pip))


def test_provenance_labels_and_variables() -> None:
    labels = " ".join(rest for keyword, rest in INSTRUCTIONS if keyword == "LABEL")
    for key in ("source", "revision", "version"):
        assert f"org.opencontainers.image.{key}=" in labels
    env = " ".join(rest for keyword, rest in INSTRUCTIONS if keyword == "ENV")
    for name in ("TORCHRIG_GIT_COMMIT=", "TORCHRIG_VERSION=", "TORCHRIG_CUDA_PROFILE=", "PYTHONUNBUFFERED=1"):
        assert name in env
    assert set(docker.build_arguments(profile(DEFAULT_CUDA))) <= {
        rest.split("=")[0] for keyword, rest in INSTRUCTIONS if keyword == "ARG"
    }


# env.rig.docker with fake Docker clients


def _fake_client(directory: Path, script: str) -> Path:
    client = directory / "docker"
    client.write_text("#!/bin/sh\n" + script)
    client.chmod(client.stat().st_mode | stat.S_IEXEC)
    return client


@pytest.fixture
def no_nvidia_on_host(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(docker, "CDI_SPEC_DIRS", ())
    monkeypatch.setattr(docker, "NVIDIA_TOOLKIT_BINARIES", ())
    monkeypatch.setenv("PATH", str(tmp_path))


def test_engine_status_names_why_no_engine_answers(monkeypatch, tmp_path, no_nvidia_on_host) -> None:
    message = "Cannot connect to the Docker daemon at unix:///var/run/docker.sock. Is the docker daemon running?"
    client = _fake_client(tmp_path, f'echo \'{{"ServerErrors":["{message}"]}}\'\n')
    monkeypatch.setenv("DOCKER", str(client))
    status = docker.engine_status()
    assert (status.answers, status.nvidia) == (False, False)
    assert message in status.reason


def test_engine_status_when_the_client_fails_or_hangs(monkeypatch, tmp_path, no_nvidia_on_host) -> None:
    monkeypatch.setenv("DOCKER", str(_fake_client(tmp_path, "echo 'permission denied' >&2\nexit 1\n")))
    assert docker.engine_status() == docker.EngineStatus(False, False, "no Docker engine answers: permission denied")
    sleep = shutil.which("sleep", path=os.defpath)
    monkeypatch.setenv("DOCKER", str(_fake_client(tmp_path, f"exec {sleep} 5\n")))
    hung = docker.engine_status(timeout_s=0.3)
    assert not hung.answers and "did not answer" in hung.reason


@pytest.mark.parametrize(("runtimes", "nvidia"), [({"runc": {}}, False), ({"runc": {}, "nvidia": {}}, True)])
def test_engine_status_sees_the_nvidia_runtime(monkeypatch, tmp_path, no_nvidia_on_host, runtimes, nvidia) -> None:
    info = json.dumps({"ServerVersion": "27.0.1", "Runtimes": runtimes})
    monkeypatch.setenv("DOCKER", str(_fake_client(tmp_path, f"echo '{info}'\n")))
    status = docker.engine_status()
    assert (status.answers, status.nvidia) == (True, nvidia)
    assert "27.0.1" in status.reason


def test_an_nvidia_cdi_spec_counts_as_the_nvidia_runtime(tmp_path: Path) -> None:
    assert not docker.nvidia_support({"Runtimes": {"runc": {}}}, toolkit_on_path=False, cdi_spec_dirs=[str(tmp_path)])
    (tmp_path / "nvidia.yaml").write_text("cdiVersion: 0.5.0\n")
    assert docker.nvidia_support({"Runtimes": {"runc": {}}}, toolkit_on_path=False, cdi_spec_dirs=[str(tmp_path)])


def test_build_without_docker_says_what_to_install(monkeypatch, tmp_path, no_nvidia_on_host, capsys) -> None:
    monkeypatch.setenv("DOCKER", "docker")
    assert docker.build_image(DEFAULT_CUDA) != 0
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "install Docker Engine" in err and "Traceback" not in err


def test_build_of_an_unknown_profile_is_bad_input() -> None:
    from env.common.cli import UserError

    with pytest.raises(UserError, match=r"choose one of 12\.1"):
        docker.build_image("11.8")


def test_run_without_compose_says_what_to_install(monkeypatch, tmp_path, no_nvidia_on_host, capsys) -> None:
    monkeypatch.delenv("COMPOSE", raising=False)
    monkeypatch.setenv("DOCKER", "docker")
    assert docker.run_in_container(["python", "-V"], gpu=False, env={}) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "docker-compose" in err


def test_compose_run_command_picks_the_service_and_passes_variables() -> None:
    command = docker.compose_run_command(
        ["docker-compose"], ["python", "-m", "train.launch"], gpu=False, env={"NCCL_DEBUG": "INFO"}, tty=False
    )
    assert command[:1] == ["docker-compose"]
    assert command[-4:] == ["cpu", "python", "-m", "train.launch"]
    assert command[1:3] == ["--profile", "cpu"] and "-T" in command
    assert command[command.index("-e") + 1] == "NCCL_DEBUG=INFO"
    assert docker.compose_run_command(["x"], ["bash"], gpu=True, env={}, tty=True)[-2:] == ["gpu", "bash"]


def test_volume_dirs_belong_to_the_caller_when_not_root(tmp_path: Path) -> None:
    assert docker.prepare_volume_dirs(tmp_path, 4242, 4343) == (4242, 4343)
    assert all((tmp_path / name).is_dir() for name in docker.VOLUME_DIRS)


@pytest.mark.skipif(os.geteuid() != 0, reason="handing directories to uid 1000 needs root")
def test_volume_dirs_are_handed_to_the_image_user_when_root(tmp_path: Path) -> None:
    (tmp_path / "runs" / "old").mkdir(parents=True)
    (tmp_path / "runs" / "old" / "metrics.jsonl").write_text("{}\n")
    assert docker.prepare_volume_dirs(tmp_path, 0, 0) == (docker.IMAGE_UID, docker.IMAGE_UID)
    owners = {
        path.stat().st_uid for name in docker.VOLUME_DIRS for path in [tmp_path / name, *(tmp_path / name).rglob("*")]
    }
    assert owners == {docker.IMAGE_UID}


def test_remote_url_credentials_stay_out_of_the_image_label() -> None:
    assert (
        docker._public_url("https://user:token@example.com/org/torchrig.git") == "https://example.com/org/torchrig.git"
    )
    assert docker._public_url("git@example.com:org/torchrig.git") == "git@example.com:org/torchrig.git"
