"""env/cloud/bootstrap.sh against a fake Ubuntu VM (tests/helpers/fake_vm.py): stub commands that act on one
JSON state file, under a temporary root, so nothing here can touch the real system.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
import uuid
from pathlib import Path

import pytest

from tests.helpers.fake_vm import DEBIAN_12, SCRIPT, FakeVM
from tests.helpers.paths import ROOT


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def index_of(changes: list[str], prefix: str) -> int:
    return next(i for i, c in enumerate(changes) if c.startswith(prefix))


def test_bare_vm_installs_in_order_asks_for_the_reboot_then_verifies_and_a_third_run_changes_nothing(tmp_path):
    vm = FakeVM(tmp_path)
    first = vm.run()
    assert first.code == 3, first
    assert "REBOOT REQUIRED" in first.output
    changes = first.changes()
    order = [
        "apt-get update",
        "ubuntu-drivers install --gpgpu nvidia:570-server",
        "apt-get install -y nvidia-utils-570-server",
        "apt-mark hold",
        "curl -fsSL https://download.docker.com/linux/ubuntu/gpg -o",
        "apt-get install -y docker-ce=5:27.5.1-1~ubuntu.24.04~noble docker-ce-cli=5:27.5.1-1~ubuntu.24.04~noble",
        "curl -fsSL https://nvidia.github.io/libnvidia-container/gpgkey -o",
        "apt-get install -y nvidia-container-toolkit=1.17.8-1",
        "nvidia-ctk runtime configure --runtime=docker",
        "systemctl restart docker",
    ]
    positions = [index_of(changes, step) for step in order]
    assert positions == sorted(positions), changes
    assert not any(c.startswith("reboot") for c in changes), "rebooted without --yes"
    assert {
        "nvidia-utils-570-server",
        "linux-modules-nvidia-570-server-generic",
        "docker-ce",
        "nvidia-container-toolkit",
    } <= set(vm.state["held"])
    apt = vm.root / "etc" / "apt"
    assert (apt / "sources.list.d/docker.list").read_text() == (
        "deb [arch=amd64 signed-by=/etc/apt/keyrings/docker.asc] "
        "https://download.docker.com/linux/ubuntu noble stable\n"
    )
    assert (
        "signed-by=/etc/apt/keyrings/nvidia-container-toolkit.asc"
        in (apt / "sources.list.d/nvidia-container-toolkit.list").read_text()
    )
    assert (vm.root / "var/lib/torchrig-bootstrap/reboot-pending").exists()

    vm.boot()
    second = vm.run()
    assert second.code == 0, second
    assert "resuming after the reboot" in second.output
    verify = [" ".join(c) for c in second.calls if c[0] in ("docker", "make") and c[1] in ("run", "-C")]
    assert verify[0].startswith("docker run --rm --gpus all nvidia/cuda:12.1.1-base-ubuntu22.04 nvidia-smi -L")
    assert [v.split()[-1] for v in verify[1:]] == ["build", "doctor", "nccl-test"]
    assert "a GPU container sees all 3 GPU(s)" in second.output
    assert not (vm.root / "var/lib/torchrig-bootstrap/reboot-pending").exists()
    log = (vm.root / "var/log/torchrig-bootstrap.log").read_text()
    assert "REBOOT REQUIRED" in log and "ready" in log

    tree_before = tree(vm.root / "etc")
    third = vm.run()
    assert third.code == 0, third
    assert third.changes() == []
    assert "nothing changed" in third.output
    for step in (
        "driver: 570.133.20 >= 530",
        "docker: the engine and docker compose answer: unchanged",
        "toolkit: 1.17.8-1: unchanged",
        "toolkit: the engine lists the nvidia runtime: unchanged",
    ):
        assert step in third.output
    assert tree(vm.root / "etc") == tree_before


def test_yes_reboots_through_the_resume_hook_and_no_reboot_wins(tmp_path):
    vm = FakeVM(tmp_path)
    held = vm.run("--yes", "--no-reboot")
    assert held.code == 3 and "reboot" not in [c[0] for c in held.calls], held

    rebooting = vm.run("--yes")
    assert rebooting.code == 3, rebooting
    unit = vm.root / "etc/systemd/system/torchrig-bootstrap-resume.service"
    assert f"ExecStart=/bin/bash {SCRIPT} --yes" in unit.read_text()
    changes = rebooting.changes()
    assert changes[-2:] == ["systemctl enable torchrig-bootstrap-resume.service", "reboot"], changes

    vm.boot()
    resumed = vm.run("--yes")  # what the unit runs
    assert resumed.code == 0, resumed
    assert "systemctl disable torchrig-bootstrap-resume.service" in resumed.changes()
    assert not unit.exists()


def test_dry_run_prints_each_step_and_changes_nothing(tmp_path):
    vm = FakeVM(tmp_path)
    before, state_before = tree(vm.root), dict(vm.state)
    run = vm.run("--dry-run")
    assert run.code == 0, run
    assert run.changes() == []
    assert tree(vm.root) == before and vm.state == state_before
    for planned in (
        "would change: install the NVIDIA 570-server driver",
        "would change: add Docker's apt repository",
        "would change: install the NVIDIA Container Toolkit 1.17.8-1",
        "would change: configure the engine's nvidia runtime",
        "would verify: make nccl-test",
    ):
        assert planned in run.output


def test_a_vendor_image_with_a_good_driver_and_docker_is_left_alone(tmp_path):
    vm = FakeVM(tmp_path)
    vm.install_ready(driver="550.127.05")
    vm.state["packages"]["nvidia-container-toolkit"] = "1.16.2-1"  # the image's own, not our pin
    vm.save()
    run = vm.run()
    assert run.code == 0, run
    assert [c for c in run.changes() if not c.startswith("apt-mark hold")] == []
    assert "driver: 550.127.05 >= 530" in run.output
    assert "toolkit: 1.16.2-1 installed (the pin is 1.17.8-1): left as it is" in run.output


def test_a_driver_older_than_the_profile_minimum_is_replaced(tmp_path):
    vm = FakeVM(tmp_path)
    vm.install_ready(driver="525.147.05")
    run = vm.run(env={"CUDA": "12.8"})
    assert run.code == 3, run
    assert "driver: 525.147.05 is older than CUDA 12.8's minimum 570" in run.output
    assert "ubuntu-drivers install --gpgpu nvidia:570-server" in run.changes()


def failure(**state: object):
    return state


def ready_then(**state: object):
    return {"ready": True, **state}


FAILURES = {
    "toolkit missing / engine not restarted": (
        ready_then(runtime_loaded=False, restart_ineffective=True),
        1,
        "FAILED (toolkit-missing)",
        "nvidia-ctk runtime configure --runtime=docker and systemctl restart docker",
    ),
    "toolkit missing, the engine naming the nvidia driver": (
        ready_then(runtime_loaded=False, restart_ineffective=True, device_driver="nvidia"),
        1,
        "FAILED (toolkit-missing)",
        "nvidia-ctk runtime configure --runtime=docker and systemctl restart docker",
    ),
    "snap docker": (failure(snap_docker=True), 1, "FAILED (snap-docker)", "snap remove --purge docker"),
    "driver not loaded after a kernel upgrade": (
        ready_then(loaded=None, modules_missing=True),
        1,
        "FAILED (driver-not-loaded)",
        "apt-get install linux-modules-nvidia-570-server-$(uname -r)",
    ),
    "driver/library version mismatch": (
        ready_then(mismatch=True),
        3,
        "FAILED (version-mismatch)",
        "reboot (sudo reboot, or rerun with --yes",
    ),
    "secure boot rejects the dkms module": (
        failure(
            secure_boot=True,
            nouveau=False,
            packages={"nvidia-driver-570": "570.133.07-0ubuntu1", "nvidia-dkms-570": "570.133.07-0ubuntu1"},
        ),
        1,
        "FAILED (secure-boot)",
        "mokutil --import /var/lib/shim-signed/mok/MOK.der",
    ),
    "secure boot, seen only through mokutil and the dkms package": (
        failure(
            secure_boot=True,
            nouveau=False,
            modprobe_error="Operation not permitted",
            packages={"nvidia-driver-570": "570.133.07-0ubuntu1", "nvidia-dkms-570": "570.133.07-0ubuntu1"},
        ),
        1,
        "FAILED (secure-boot)",
        "use the prebuilt signed modules",
    ),
    "nouveau holds the gpu": (
        ready_then(loaded=None, nouveau=True),
        1,
        "FAILED (nouveau)",
        "blacklist nouveau",
    ),
    "a broken unrelated apt source": (
        failure(broken_source="https://broken.example.com/repo"),
        1,
        "FAILED (apt-source)",
        "etc/apt/sources.list.d/vendor-tools.list: fix or disable that source",
    ),
    "nvml lost in a running container": (
        ready_then(make_fails={"doctor": "Failed to initialize NVML: Unknown Error"}),
        1,
        "FAILED (nvml-lost)",
        "nvidia-ctk system create-dev-char-symlinks --create-all",
    ),
    "a gpu missing from the container": (
        ready_then(container_gpus=2),
        1,
        "FAILED (gpu-count)",
        "dmesg for Xid errors",
    ),
}


@pytest.mark.parametrize("mode", FAILURES)
def test_each_failure_mode_gives_its_fix_and_exit_code(tmp_path, mode):
    state, code, name, fix = FAILURES[mode]
    vm = FakeVM(tmp_path)
    if state.pop("ready", False):
        vm.install_ready()
    if "packages" in state:
        state["packages"] = vm.state["packages"] | state["packages"]
        vm.provide("nvidia-smi")
    if state.get("snap_docker"):
        vm.provide("docker")
    vm.state.update(state)
    vm.save()
    (vm.root / "etc/apt/sources.list.d/vendor-tools.list").write_text(
        "deb https://broken.example.com/repo jammy main\n"
    )
    run = vm.run()
    assert run.code == code, run
    assert f"{name}: " in run.output and fix in run.output, run
    if mode == "driver/library version mismatch":
        assert any(c.startswith("apt-mark hold") for c in run.changes()), "the driver packages were not held"


def test_arm64_is_refused_in_one_line(tmp_path):
    run = FakeVM(tmp_path, arch="aarch64").run()
    assert run.code == 4
    assert run.output.strip().splitlines() == ["torchrig bootstrap: arm64 is not supported yet: use an x86-64 GPU VM"]


def test_debian_is_an_unsupported_release(tmp_path):
    vm = FakeVM(tmp_path)
    (vm.root / "etc/os-release").write_text(DEBIAN_12)
    run = vm.run()
    assert run.code == 4, run
    assert "unsupported release debian 12: use Ubuntu 22.04 or 24.04" in run.output
    assert run.changes() == []


def test_not_root_and_no_gpu_and_a_bad_option(tmp_path):
    assert "must run as root" in FakeVM(tmp_path / "a", uid=1000).run().output
    no_gpu = FakeVM(tmp_path / "b", gpus=0).run()
    assert no_gpu.code == 1 and "no NVIDIA GPU in lspci" in no_gpu.output
    bad = FakeVM(tmp_path / "c").run("--reboot")
    assert bad.code == 2 and "unknown option '--reboot'" in bad.output
    profile = FakeVM(tmp_path / "d").run(env={"CUDA": "9.9"})
    assert profile.code == 2 and "no CUDA profile '9.9'" in profile.output


def test_one_bootstrap_at_a_time(tmp_path):
    import fcntl

    vm = FakeVM(tmp_path)
    lock = vm.root / "var/lib/torchrig-bootstrap/lock"
    lock.parent.mkdir(parents=True)
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        run = vm.run()
    assert run.code == 1 and "another bootstrap is running" in run.output, run
    assert run.changes() == []


def test_dry_run_on_this_machine_prints_its_steps_and_exits_unsupported():
    release = Path("/etc/os-release").read_text() if Path("/etc/os-release").exists() else ""
    if "ID=ubuntu" in release:
        pytest.skip("this machine runs Ubuntu: its release may be a supported one")
    result = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 4, result.stdout + result.stderr
    assert "unsupported release" in result.stdout
    assert "would change:" in result.stdout and "would verify: make nccl-test" in result.stdout


def engine_without_nvidia_runtime() -> str | None:
    docker = shutil.which("docker")
    if docker is None:
        return None
    info = subprocess.run([docker, "info", "--format", "{{json .Runtimes}}"], capture_output=True, text=True)
    if info.returncode != 0 or '"nvidia"' in info.stdout:
        return None
    return docker


def test_a_real_engine_without_the_nvidia_runtime_reports_the_toolkit_missing(tmp_path):
    docker = engine_without_nvidia_runtime()
    if docker is None:
        pytest.skip("no Docker engine answers here (or it has the NVIDIA runtime)")
    image = f"torchrig-bootstrap-empty:{uuid.uuid4().hex[:8]}"
    empty = io.BytesIO()
    tarfile.open(fileobj=empty, mode="w").close()
    subprocess.run([docker, "import", "-", image], input=empty.getvalue(), check=True, capture_output=True)
    try:
        vm = FakeVM(tmp_path)
        real = tmp_path / "real"
        real.mkdir()
        (real / "docker").symlink_to(docker)
        env = {"TORCHRIG_BOOTSTRAP_VERIFY_IMAGE": image}
        if "DOCKER_HOST" in os.environ:
            env["DOCKER_HOST"] = os.environ["DOCKER_HOST"]
        planned = vm.run("--dry-run", env={**env, "TORCHRIG_BOOTSTRAP_ONLY": "toolkit"}, extra_path=f"{real}:")
        assert "toolkit: missing" in planned.output
        assert "would change: configure the engine's nvidia runtime" in planned.output
        checked = vm.run(env={**env, "TORCHRIG_BOOTSTRAP_ONLY": "verify"}, extra_path=f"{real}:")
        assert checked.code == 1, checked
        assert "FAILED (toolkit-missing)" in checked.output
        assert "nvidia-ctk runtime configure --runtime=docker" in checked.output
    finally:
        subprocess.run([docker, "rmi", "-f", image], capture_output=True)


def skypilot_run(tmp_path: Path, node_ips: list[str], rank: int, **envs: str) -> tuple[int, list[str]]:
    """The task's run section under bash, as SkyPilot runs it on one node; sudo records what it would run."""
    import yaml

    task = yaml.safe_load((ROOT / "env/cloud/skypilot.yaml").read_text())
    sudo = tmp_path / "sudo"
    sudo.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$SUDO_ARGS"\n')
    sudo.chmod(0o755)
    recorded = tmp_path / "args"
    env = {
        "PATH": f"{tmp_path}:/usr/bin:/bin",
        **task["envs"],
        **envs,
        "SKYPILOT_NODE_IPS": "\n".join(node_ips) + "\n",
        "SKYPILOT_NODE_RANK": str(rank),
        "SKYPILOT_NUM_GPUS_PER_NODE": "3",
        "SUDO_ARGS": str(recorded),
    }
    result = subprocess.run(["bash", "-c", task["run"]], env=env, capture_output=True, text=True, timeout=60)
    return result.returncode, recorded.read_text().splitlines() if recorded.exists() else []


def test_skypilot_task_maps_node_ips_and_rank_to_make_variables(tmp_path):
    assert skypilot_run(tmp_path, ["10.0.0.7"], 0) == (0, ["make", "train", "GPUS=3", "CONFIG=small", "STEPS=200"])
    code, args = skypilot_run(tmp_path, ["10.0.0.1", "10.0.0.2"], 1, TARGET="nccl-test")
    assert code == 0 and args[:3] == ["make", "nccl-test", "GPUS=3"]
    assert {"NNODES=2", "NODE_RANK=1", "MASTER_ADDR=10.0.0.1", "MASTER_PORT=29500"} <= set(args)
    assert not any(a.startswith("CONFIG=") for a in args)
    (tmp_path / "args").unlink()
    assert skypilot_run(tmp_path, ["10.0.0.1"], 0, TARGET="shell") == (2, [])


def test_user_data_waits_on_the_state_file_the_bootstrap_writes():
    user_data = (ROOT / "env/cloud/user-data.yaml").read_text()
    script = SCRIPT.read_text()
    assert "STATE_DIR=${TORCHRIG_BOOTSTRAP_STATE:-$ROOT/var/lib/torchrig-bootstrap}" in script
    assert 'write_file "$STATE_DIR/reboot-pending"' in script
    assert user_data.count("/var/lib/torchrig-bootstrap/reboot-pending") == 2  # power_state and the per-boot hook
    assert user_data.startswith("#cloud-config\n")
