"""env/cloud/bootstrap.sh against a fake Ubuntu VM: stub commands that act on one JSON state file.

Every system path of the script lies under TORCHRIG_BOOTSTRAP_ROOT (a temporary directory), and PATH
holds only the stubs plus links to the few real tools the script needs, so nothing here can touch the
real system. The stubs record each call; a command a package provides (docker, nvidia-smi, nvidia-ctk)
appears on PATH only once the fake apt has installed that package. `FakeVM.boot()` is a reboot: a new
boot id, and the kernel module of whatever driver is installed gets loaded (unless Secure Boot or
nouveau stops it).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "env" / "cloud" / "bootstrap.sh"
DRIVER = "570.133.20"
KERNEL = "6.8.0-48-generic"

# One dispatcher for every stub; it is linked under each command's name and reads argv[0].
FAKE_COMMAND = r"""
import json, os, sys
from pathlib import Path

FAKE = Path(os.environ["FAKE_DIR"])
ROOT = Path(os.environ["TORCHRIG_BOOTSTRAP_ROOT"])
BIN = FAKE / "bin"
name, args = os.path.basename(sys.argv[0]), sys.argv[1:]
with open(FAKE / "calls", "a") as log:
    log.write(json.dumps([name, *args]) + "\n")
state = json.loads((FAKE / "state.json").read_text())
pk = state["packages"]


def out(text="", code=0):
    if text:
        print(text)
    save()
    sys.exit(code)


def save():
    (FAKE / "state.json").write_text(json.dumps(state))
    modules = []
    if state["nouveau"]:
        modules.append("nouveau 2433024 1 - Live 0x0")
    if state["loaded"]:
        modules.append("nvidia 54018048 1 - Live 0x0")
    (ROOT / "proc" / "modules").write_text("".join(m + "\n" for m in modules))


def provide(command):
    link = BIN / command
    if not link.exists():
        link.symlink_to(BIN / "fake.py")


def driver_version():
    return next((v for p, v in pk.items() if p.startswith(("nvidia-headless", "nvidia-driver-"))), None)


NO_DAEMON = "Cannot connect to the Docker daemon at unix:///var/run/docker.sock. Is the docker daemon running?"
NO_DRIVER = ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
             "Make sure that the latest NVIDIA driver is installed and running.")

if name == "id":
    out(str(state["uid"]) if args == ["-u"] else "uid=0(root)")
if name == "uname":
    out(state["arch"] if args == ["-m"] else state["kernel"] if args == ["-r"] else "Linux")
if name == "lspci":
    lines = [f"{i + 1:02x}:00.0 0300: 10de:2684 (rev a1)\n{i + 1:02x}:00.1 0403: 10de:22ba (rev a1)"
             for i in range(state["gpus"])]
    out("\n".join(lines))
if name == "mokutil":
    out("SecureBoot enabled" if state["secure_boot"] else "SecureBoot disabled")
if name == "dpkg":
    out("amd64")
if name == "dpkg-query":
    fmt = next(a.split("=", 1)[1] for a in args if a.startswith("-f="))
    names = [a for a in args if not a.startswith("-")]
    def line(p):
        return (fmt.replace("${Package}", p).replace("${Version}", pk[p]).replace("${db:Status-Abbrev}", "ii ")
                .replace("\\t", "\t").replace("\\n", "\n"))
    if names:
        missing = [n for n in names if n not in pk]
        sys.stdout.write("".join(line(n) for n in names if n in pk))
        if missing:
            print(f"dpkg-query: no packages found matching {missing[0]}", file=sys.stderr)
        out(code=1 if missing else 0)
    sys.stdout.write("".join(line(p) for p in sorted(pk)))
    out()
if name == "apt-mark":
    if args[0] == "showhold":
        out("\n".join(state["held"]))
    state["held"] += [a for a in args[1:] if a not in state["held"]]
    out()
if name == "apt-get":
    if args[0] == "update":
        if state["broken_source"]:
            out(f"E: The repository '{state['broken_source']} jammy Release' does not have a Release file.", 100)
        out("Reading package lists... Done")
    for spec in args[2:]:
        package, _, version = spec.partition("=")
        pk[package] = version or "1.0"
        if package.startswith("nvidia-utils-"):
            provide("nvidia-smi")
        if package == "docker-ce-cli":
            provide("docker")
        if package == "docker-ce":
            state["engine"] = True
        if package == "nvidia-container-toolkit":
            provide("nvidia-ctk")
    out()
if name == "ubuntu-drivers":
    assert args[:2] == ["install", "--gpgpu"], args
    branch = args[2].split(":")[1].split("-")[0]
    for package in (f"nvidia-headless-no-dkms-{branch}-server", f"linux-modules-nvidia-{branch}-server-generic",
                    f"libnvidia-compute-{branch}-server"):
        pk[package] = f"{state['driver']}-0ubuntu0.24.04.1"
    out()
if name == "modprobe":
    if state["secure_boot"] and any(p.startswith("nvidia-dkms-") for p in pk):
        error = state.get("modprobe_error", "Key was rejected by service")
        out(f"modprobe: ERROR: could not insert 'nvidia': {error}", 1)
    if state["nouveau"]:
        out("modprobe: ERROR: could not insert 'nvidia': No such device", 1)
    if state["modules_missing"] or not driver_version():
        out(f"modprobe: FATAL: Module nvidia not found in directory /lib/modules/{state['kernel']}", 1)
    state["loaded"] = driver_version().split("-")[0]
    out()
if name == "nvidia-smi":
    if state["mismatch"]:
        out("Failed to initialize NVML: Driver/library version mismatch\nNVML library version: 570.133", 18)
    if not state["loaded"]:
        out(NO_DRIVER, 9)
    out("\n".join([state["loaded"]] * state["gpus"]))
if name == "nvidia-ctk":
    state["runtime_configured"] = True
    out("INFO[0000] Wrote updated config to /etc/docker/daemon.json")
if name == "systemctl":
    if args[:2] == ["restart", "docker"] or args[:3] == ["enable", "--now", "docker"]:
        if "docker-ce" not in pk:
            out("Failed to restart docker.service: Unit docker.service not found.", 5)
        state["engine"] = True
        if not state["restart_ineffective"]:
            state["runtime_loaded"] = state["runtime_configured"]
    out()
if name == "snap":
    out("docker  27.2.0  2963  latest/stable  canonical**  -") if state["snap_docker"] else out(
        "error: no matching snaps installed", 1)
if name == "docker":
    if args[:2] == ["compose", "version"]:
        ok = "docker-compose-plugin" in pk or state["snap_docker"]
        out("Docker Compose version v2.32.4" if ok else "docker: 'compose' is not a docker command.", 0 if ok else 1)
    if not state["engine"]:
        out(NO_DAEMON, 1)
    if args[0] == "info":
        runtimes = {"runc": {"path": "runc"}} | ({"nvidia": {"path": "nvidia-container-runtime"}}
                                                  if state["runtime_loaded"] else {})
        out(json.dumps(runtimes) if "--format" in args else "Server Version: 27.5.1")
    if args[0] == "version":
        out("27.5.1")
    if args[0] == "run":
        if not state["runtime_loaded"]:
            driver = state.get("device_driver", "")  # Docker 20.10 names none for --gpus; others say "nvidia"
            out(f'docker: Error response from daemon: could not select device driver "{driver}" with '
                "capabilities: [[gpu]].", 125)
        if not state["loaded"]:
            out(NO_DRIVER, 9)
        seen = state["gpus"] if state["container_gpus"] is None else state["container_gpus"]
        out("\n".join(f"GPU {i}: NVIDIA GeForce RTX 4090 (UUID: GPU-{i:08d})" for i in range(seen)))
if name == "curl":
    target = Path(args[args.index("-o") + 1])
    target.write_text(f"-----BEGIN PGP PUBLIC KEY BLOCK-----\nfake key from {args[1]}\n")
    out()
if name == "reboot":
    out()
if name == "make":
    target = args[2]
    if target in state["make_fails"]:
        out(state["make_fails"][target], 2)
    out(f"make {target}: ok")
out(f"fake: no behaviour for {name} {args}", 97)
"""

STUBS = (
    "id",
    "uname",
    "lspci",
    "mokutil",
    "dpkg",
    "dpkg-query",
    "apt-get",
    "apt-mark",
    "ubuntu-drivers",
    "modprobe",
    "systemctl",
    "snap",
    "curl",
    "reboot",
    "make",
)
REAL_TOOLS = (
    "bash",
    "env",
    "cat",
    "mkdir",
    "rm",
    "mv",
    "cp",
    "chmod",
    "ln",
    "tee",
    "grep",
    "sed",
    "awk",
    "cut",
    "head",
    "tail",
    "tr",
    "sort",
    "wc",
    "date",
    "sleep",
    "flock",
    "dirname",
    "basename",
    "readlink",
    "mktemp",
    "touch",
    "find",
    "ls",
    "stat",
    "true",
    "false",
)
UBUNTU_2404 = 'PRETTY_NAME="Ubuntu 24.04.1 LTS"\nID=ubuntu\nVERSION_ID="24.04"\nVERSION_CODENAME=noble\n'
DEBIAN_12 = 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\nVERSION_ID="12"\nVERSION_CODENAME=bookworm\n'
# Calls that change the fake system; reads (nvidia-smi, docker info, dpkg-query, apt-mark showhold) are not.
MUTATING = {"apt-get", "ubuntu-drivers", "modprobe", "nvidia-ctk", "systemctl", "curl", "reboot"}


class FakeVM:
    def __init__(self, base: Path, **state: object) -> None:
        self.base = base
        self.root = base / "root"
        self.fake = base / "fake"
        self.bin = self.fake / "bin"
        self.tools = self.fake / "tools"
        for directory in (
            self.root / "etc" / "apt" / "sources.list.d",
            self.root / "proc/sys/kernel/random",
            self.bin,
            self.tools,
        ):
            directory.mkdir(parents=True, exist_ok=True)
        (self.root / "etc" / "os-release").write_text(UBUNTU_2404)
        (self.root / "etc" / "apt" / "sources.list").write_text("deb http://archive.ubuntu.com/ubuntu noble main\n")
        (self.root / "proc/sys/kernel/random/boot_id").write_text(str(uuid.uuid4()))
        self.state = {
            "uid": 0,
            "arch": "x86_64",
            "kernel": KERNEL,
            "gpus": 3,
            "driver": DRIVER,
            "loaded": None,
            "nouveau": True,
            "secure_boot": False,
            "mismatch": False,
            "modules_missing": False,
            "packages": {"ubuntu-drivers-common": "1:0.9.7.6", "curl": "8.5.0-2ubuntu10"},
            "held": [],
            "engine": False,
            "runtime_configured": False,
            "runtime_loaded": False,
            "restart_ineffective": False,
            "snap_docker": False,
            "broken_source": None,
            "container_gpus": None,
            "make_fails": {},
        }
        self.state.update(state)
        self.save()
        (self.bin / "fake.py").write_text(f"#!{sys.executable} -I\n{FAKE_COMMAND}")
        (self.bin / "fake.py").chmod(0o755)
        for name in STUBS:
            (self.bin / name).symlink_to(self.bin / "fake.py")
        for tool in REAL_TOOLS:
            (self.tools / tool).symlink_to(shutil.which(tool))
        (self.tools / "python3").symlink_to(sys.executable)

    def save(self) -> None:
        (self.fake / "state.json").write_text(json.dumps(self.state))
        modules = ["nouveau 2433024 1 - Live 0x0"] * bool(self.state["nouveau"])
        modules += ["nvidia 54018048 1 - Live 0x0"] * bool(self.state["loaded"])
        (self.root / "proc" / "modules").write_text("".join(m + "\n" for m in modules))

    def load(self) -> dict:
        self.state = json.loads((self.fake / "state.json").read_text())
        return self.state

    def provide(self, *commands: str) -> None:
        for command in commands:
            (self.bin / command).symlink_to(self.bin / "fake.py")

    def install_ready(self, driver: str = DRIVER) -> None:
        """A VM the bootstrap has finished: driver loaded, Docker, the toolkit at its pin, runtime loaded."""
        self.state["packages"] |= {
            "nvidia-headless-no-dkms-570-server": f"{driver}-0ubuntu0.24.04.1",
            "linux-modules-nvidia-570-server-generic": f"{driver}-0ubuntu0.24.04.1",
            "nvidia-utils-570-server": f"{driver}-0ubuntu0.24.04.1",
            "docker-ce": "5:27.5.1-1~ubuntu.24.04~noble",
            "docker-ce-cli": "5:27.5.1-1~ubuntu.24.04~noble",
            "docker-compose-plugin": "2.32.4-1~ubuntu.24.04~noble",
            "nvidia-container-toolkit": "1.17.8-1",
        }
        self.state |= {
            "loaded": driver,
            "nouveau": False,
            "engine": True,
            "runtime_configured": True,
            "runtime_loaded": True,
        }
        self.provide("nvidia-smi", "docker", "nvidia-ctk")
        self.save()

    def boot(self) -> None:
        state = self.load()
        (self.root / "proc/sys/kernel/random/boot_id").write_text(str(uuid.uuid4()))
        driver = next(
            (v for p, v in state["packages"].items() if p.startswith(("nvidia-headless", "nvidia-driver-"))), None
        )
        signed = any(p.startswith("linux-modules-nvidia-") for p in state["packages"])
        blocked = state["secure_boot"] and not signed
        state["nouveau"] = state["nouveau"] and (driver is None or state.get("nouveau_sticky", False))
        state["loaded"] = None if (driver is None or blocked or state["nouveau"]) else driver.split("-")[0]
        state["mismatch"] = False
        state["engine"] = "docker-ce" in state["packages"]
        state["runtime_loaded"] = state["engine"] and state["runtime_configured"]
        self.save()

    def run(self, *flags: str, env: dict[str, str] | None = None, extra_path: str = "") -> Run:
        calls = self.fake / "calls"
        calls.write_text("")
        environment = {
            "PATH": f"{self.bin}:{extra_path}{self.tools}",
            "HOME": str(self.base),
            "FAKE_DIR": str(self.fake),
            "TORCHRIG_BOOTSTRAP_ROOT": str(self.root),
            "TMPDIR": str(self.base),
            **(env or {}),
        }
        result = subprocess.run(
            [shutil.which("bash"), str(SCRIPT), *flags], env=environment, capture_output=True, text=True, timeout=300
        )
        recorded = [json.loads(line) for line in calls.read_text().splitlines()]
        self.load()
        return Run(result.returncode, result.stdout + result.stderr, recorded)


class Run:
    def __init__(self, code: int, output: str, calls: list[list[str]]) -> None:
        self.code, self.output, self.calls = code, output, calls

    def changes(self) -> list[str]:
        """The mutating calls, each as one command line; apt-mark counts only when it holds."""
        return [" ".join(c) for c in self.calls if c[0] in MUTATING or c[:2] == ["apt-mark", "hold"]]

    def __repr__(self) -> str:  # shown by pytest when an assertion fails
        return f"exit {self.code}\n{self.output}\ncalls: {self.changes()}"


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

    task = yaml.safe_load((REPO / "env/cloud/skypilot.yaml").read_text())
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
    user_data = (REPO / "env/cloud/user-data.yaml").read_text()
    script = SCRIPT.read_text()
    assert "STATE_DIR=${TORCHRIG_BOOTSTRAP_STATE:-$ROOT/var/lib/torchrig-bootstrap}" in script
    assert 'write_file "$STATE_DIR/reboot-pending"' in script
    assert user_data.count("/var/lib/torchrig-bootstrap/reboot-pending") == 2  # power_state and the per-boot hook
    assert user_data.startswith("#cloud-config\n")
