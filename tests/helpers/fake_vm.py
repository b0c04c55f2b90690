"""A fake Ubuntu VM for env/cloud/bootstrap.sh: stub commands that act on one JSON state file.

Every system path of the script lies under TORCHRIG_BOOTSTRAP_ROOT (a temporary directory), and PATH
holds only the stubs plus links to the few real tools the script needs, so nothing here can touch the
real system. The stubs are one program, tests/helpers/fake_vm_command.py, linked under each command's
name; they record each call, and a command a package provides (docker, nvidia-smi, nvidia-ctk)
appears on PATH only once the fake apt has installed that package. `FakeVM.boot()` is a reboot: a new
boot id, and the kernel module of whatever driver is installed gets loaded (unless Secure Boot or
nouveau stops it).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

from tests.helpers.paths import ROOT

SCRIPT = ROOT / "env" / "cloud" / "bootstrap.sh"
DRIVER = "570.133.20"
KERNEL = "6.8.0-48-generic"

# One program for every stub; it is linked under each command's name and reads argv[0]. Each VM gets its own
# copy (bin/fake.py), run in isolated mode.
COMMAND = Path(__file__).with_name("fake_vm_command.py")
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
        (self.bin / "fake.py").write_text(f"#!{sys.executable} -I\n{COMMAND.read_text()}")
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
