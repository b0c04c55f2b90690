"""The fake VM's commands: one program, linked under each stub's name (id, apt-get, docker, ...), that reads
argv[0], records the call in $FAKE_DIR/calls and acts on the VM's state in $FAKE_DIR/state.json.

tests/helpers/fake_vm.py copies it into the VM's bin/ as fake.py, run by the tests' interpreter in isolated
mode (-I): it imports nothing of the project, and runs only as that program.
"""

import json
import os
import sys
from pathlib import Path

NO_DAEMON = "Cannot connect to the Docker daemon at unix:///var/run/docker.sock. Is the docker daemon running?"
NO_DRIVER = (
    "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
    "Make sure that the latest NVIDIA driver is installed and running."
)


def main() -> None:
    fake = Path(os.environ["FAKE_DIR"])
    root = Path(os.environ["TORCHRIG_BOOTSTRAP_ROOT"])
    bin_dir = fake / "bin"
    name, args = os.path.basename(sys.argv[0]), sys.argv[1:]
    with open(fake / "calls", "a") as log:
        log.write(json.dumps([name, *args]) + "\n")
    state = json.loads((fake / "state.json").read_text())
    pk = state["packages"]

    def out(text="", code=0):
        if text:
            print(text)
        save()
        sys.exit(code)

    def save():
        (fake / "state.json").write_text(json.dumps(state))
        modules = []
        if state["nouveau"]:
            modules.append("nouveau 2433024 1 - Live 0x0")
        if state["loaded"]:
            modules.append("nvidia 54018048 1 - Live 0x0")
        (root / "proc" / "modules").write_text("".join(m + "\n" for m in modules))

    def provide(command):
        link = bin_dir / command
        if not link.exists():
            link.symlink_to(bin_dir / "fake.py")

    def driver_version():
        return next((v for p, v in pk.items() if p.startswith(("nvidia-headless", "nvidia-driver-"))), None)

    if name == "id":
        out(str(state["uid"]) if args == ["-u"] else "uid=0(root)")
    if name == "uname":
        out(state["arch"] if args == ["-m"] else state["kernel"] if args == ["-r"] else "Linux")
    if name == "lspci":
        lines = [
            f"{i + 1:02x}:00.0 0300: 10de:2684 (rev a1)\n{i + 1:02x}:00.1 0403: 10de:22ba (rev a1)"
            for i in range(state["gpus"])
        ]
        out("\n".join(lines))
    if name == "mokutil":
        out("SecureBoot enabled" if state["secure_boot"] else "SecureBoot disabled")
    if name == "dpkg":
        out("amd64")
    if name == "dpkg-query":
        fmt = next(a.split("=", 1)[1] for a in args if a.startswith("-f="))
        names = [a for a in args if not a.startswith("-")]

        def line(p):
            return (
                fmt.replace("${Package}", p)
                .replace("${Version}", pk[p])
                .replace("${db:Status-Abbrev}", "ii ")
                .replace("\\t", "\t")
                .replace("\\n", "\n")
            )

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
        for package in (
            f"nvidia-headless-no-dkms-{branch}-server",
            f"linux-modules-nvidia-{branch}-server-generic",
            f"libnvidia-compute-{branch}-server",
        ):
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
            "error: no matching snaps installed", 1
        )
    if name == "docker":
        if args[:2] == ["compose", "version"]:
            ok = "docker-compose-plugin" in pk or state["snap_docker"]
            found = "Docker Compose version v2.32.4" if ok else "docker: 'compose' is not a docker command."
            out(found, 0 if ok else 1)
        if not state["engine"]:
            out(NO_DAEMON, 1)
        if args[0] == "info":
            runtimes = {"runc": {"path": "runc"}} | (
                {"nvidia": {"path": "nvidia-container-runtime"}} if state["runtime_loaded"] else {}
            )
            out(json.dumps(runtimes) if "--format" in args else "Server Version: 27.5.1")
        if args[0] == "version":
            out("27.5.1")
        if args[0] == "run":
            if not state["runtime_loaded"]:
                driver = state.get("device_driver", "")  # Docker 20.10 names none for --gpus; others say "nvidia"
                out(
                    f'docker: Error response from daemon: could not select device driver "{driver}" with '
                    "capabilities: [[gpu]].",
                    125,
                )
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


if __name__ == "__main__":
    main()
