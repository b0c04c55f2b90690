"""The container side of the runtime: is there a Docker engine, build the image, run a command in it.

env.rig.runtime calls engine_status() to choose the default runtime, build_image() for `make build`, and
run_in_container() for every target under RUNTIME=docker. The Docker client is $DOCKER (default
`docker`); compose is $COMPOSE, else `docker compose` (v2) when it answers, else `docker-compose` (v1).
Standard library only: this runs on the host before any venv exists.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from env.common.cli import ArgumentParser, UserError, run_cli
from env.rig.lifeline import signal_when_parent_dies
from env.rig.profiles import DEFAULT_CUDA, CudaProfile, profile

ROOT = Path(__file__).resolve().parents[2]
IMAGE_REPOSITORY = "torchrig"
LATEST_IMAGE = f"{IMAGE_REPOSITORY}:latest"  # what compose runs unless TORCHRIG_IMAGE says otherwise
IMAGE_UID = 1000  # the image's fixed non-root user (Dockerfile)
VOLUME_DIRS = ("data", "runs", "checkpoints")  # mounted at /workspace/<name> (docker-compose.yml)
ENGINE_TIMEOUT_S = 5.0
# Where the NVIDIA container toolkit leaves a trace on the engine's host: its runtime hook (used for
# `--gpus` and compose device reservations) or a CDI spec.
NVIDIA_TOOLKIT_BINARIES = ("nvidia-container-runtime-hook", "nvidia-ctk", "nvidia-container-runtime")
CDI_SPEC_DIRS = ("/etc/cdi", "/var/run/cdi")
INSTALL_DOCKER = "install Docker Engine (apt-get install docker.io docker-compose, or Docker's own packages)"


@dataclass(frozen=True)
class EngineStatus:
    """Whether a Docker engine answers, whether it can hand GPUs to containers, and why, in one line."""

    answers: bool
    nvidia: bool
    reason: str


def docker_client() -> str:
    return os.environ.get("DOCKER", "docker")


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def _cdi_has_nvidia(spec_dirs: Sequence[str]) -> bool:
    return any(
        path.name.startswith("nvidia")
        for spec_dir in spec_dirs
        if Path(spec_dir).is_dir()
        for path in Path(spec_dir).iterdir()
    )


def nvidia_support(info: dict, *, toolkit_on_path: bool, cdi_spec_dirs: Sequence[str] = CDI_SPEC_DIRS) -> bool:
    """From `docker info`: an `nvidia` runtime, an NVIDIA CDI spec, or the toolkit's hook on this host."""
    if "nvidia" in (info.get("Runtimes") or {}):
        return True
    return toolkit_on_path or _cdi_has_nvidia([*cdi_spec_dirs, *(info.get("CDISpecDirs") or [])])


def engine_status(timeout_s: float = ENGINE_TIMEOUT_S) -> EngineStatus:
    client = docker_client()
    if shutil.which(client) is None:
        return EngineStatus(False, False, f"no Docker client ('{client}' is not on PATH)")
    try:
        answer = subprocess.run(
            [client, "info", "--format", "{{json .}}"], capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        return EngineStatus(False, False, f"the Docker engine did not answer '{client} info' within {timeout_s:g} s")
    except OSError as exc:
        return EngineStatus(False, False, f"'{client}' could not run: {exc.strerror}")
    try:
        info = json.loads(answer.stdout)
    except json.JSONDecodeError:
        info = {}
    # A client with no engine behind it may still exit 0, naming the problem in ServerErrors.
    errors = info.get("ServerErrors") or []
    if answer.returncode != 0 or errors or not info.get("ServerVersion"):
        why = _first_line(errors[0] if errors else answer.stderr or answer.stdout) or f"'{client} info' failed"
        return EngineStatus(False, False, f"no Docker engine answers: {why}")
    toolkit = any(shutil.which(binary) for binary in NVIDIA_TOOLKIT_BINARIES)
    if nvidia_support(info, toolkit_on_path=toolkit, cdi_spec_dirs=CDI_SPEC_DIRS):
        return EngineStatus(True, True, f"Docker {info['ServerVersion']} answers, with the NVIDIA runtime")
    return EngineStatus(
        True, False, f"Docker {info['ServerVersion']} answers, without the NVIDIA runtime (nvidia-container-toolkit)"
    )


def compose_command() -> list[str] | None:
    """$COMPOSE, else `docker compose` (v2) if it answers, else `docker-compose` (v1) if installed."""
    if os.environ.get("COMPOSE"):
        return shlex.split(os.environ["COMPOSE"])
    client = docker_client()
    if shutil.which(client):
        try:
            v2 = subprocess.run([client, "compose", "version"], capture_output=True, timeout=20, check=False)
            if v2.returncode == 0:
                return [client, "compose"]
        except (OSError, subprocess.TimeoutExpired):
            pass
    return ["docker-compose"] if shutil.which("docker-compose") else None


def image_tag(chosen: CudaProfile) -> str:
    return f"{IMAGE_REPOSITORY}:{chosen.name}"


def _git(*args: str) -> str:
    try:
        done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False)
    except OSError:
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def _public_url(url: str) -> str:
    """The remote URL without any user or token in it: it goes into an image label."""
    parts = urlsplit(url)
    if not parts.scheme or "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def build_arguments(chosen: CudaProfile, base_image: str | None = None) -> dict[str, str]:
    """The Dockerfile's build arguments for a profile, with provenance from git."""
    return {
        "BASE_IMAGE": base_image or chosen.base_image,
        "LOCK_FILE": chosen.lock,
        "TORCHRIG_CUDA": chosen.cuda,
        "TORCHRIG_NCCL": chosen.nccl,
        "TORCHRIG_TORCH": chosen.torch,
        "SOURCE_URL": _public_url(_git("config", "--get", "remote.origin.url")),
        "REVISION": _git("rev-parse", "HEAD") or "unknown",
        "VERSION": _git("describe", "--tags", "--always", "--dirty") or "unknown",
    }


def _say(message: str) -> None:
    print(f"torchrig: {message}", file=sys.stderr, flush=True)


def _engine_problem(status: EngineStatus | None = None) -> str | None:
    """One line saying what to install or start, or None when an engine answers (status: already asked)."""
    status = status or engine_status()
    if status.answers:
        return None
    if shutil.which(docker_client()) is None:
        return f"{status.reason}: {INSTALL_DOCKER}, or set DOCKER=/path/to/docker"
    return f"{status.reason}; start it (sudo systemctl start docker) and retry"


def _buildx_problem() -> str | None:
    """Docker 23+ clients build through the buildx plugin; older ones have BuildKit built in."""
    client = docker_client()
    version = subprocess.run(
        [client, "version", "--format", "{{.Client.Version}}"], capture_output=True, text=True, check=False
    ).stdout.strip()
    major = version.split(".")[0]
    if not major.isdigit() or int(major) < 23:
        return None
    if subprocess.run([client, "buildx", "version"], capture_output=True, check=False).returncode == 0:
        return None
    return (
        f"Docker {version} ('{client}') builds through the buildx plugin, which is missing: install "
        "docker-buildx-plugin (Docker's apt repository) or docker-buildx (Ubuntu), or set DOCKER to a client "
        "with BuildKit built in (Docker 20.10 to 22)"
    )


def build_image(
    cuda: str = DEFAULT_CUDA,
    *,
    base_image: str | None = None,
    tags: Sequence[str] | None = None,
    ca_bundle: str | None = None,
    extra_args: Sequence[str] = (),
) -> int:
    """Build the image of one CUDA profile with BuildKit; returns the exit code (a UserError for bad input).

    By default it is tagged torchrig:cuXYZ and torchrig:latest. ca_bundle (default $CA_BUNDLE) is a PEM
    file handed to the build as the `ca_bundle` secret, for TLS-intercepting proxies.
    """
    chosen = profile(cuda)
    ca_bundle = ca_bundle if ca_bundle is not None else os.environ.get("CA_BUNDLE", "")
    if ca_bundle and not Path(ca_bundle).is_file():
        raise UserError(
            f"CA_BUNDLE={ca_bundle} is not a file; give the path of a PEM bundle your proxy's TLS verifies with"
        )
    problem = _engine_problem() or _buildx_problem()
    if problem:
        _say(f"cannot build: {problem}")
        return 1
    tags = list(tags) if tags else [image_tag(chosen), LATEST_IMAGE]
    arguments = build_arguments(chosen, base_image)
    command = [docker_client(), "build", "--file", str(ROOT / "Dockerfile")]
    command += [option for tag in tags for option in ("--tag", tag)]
    command += [option for name, value in arguments.items() for option in ("--build-arg", f"{name}={value}")]
    if ca_bundle:
        command += ["--secret", f"id=ca_bundle,src={Path(ca_bundle).resolve()}"]
    command += [*extra_args, str(ROOT)]
    _say(
        f"building {', '.join(tags)}: CUDA {chosen.cuda}, torch {chosen.torch}, NCCL {chosen.nccl}, "
        f"on {arguments['BASE_IMAGE']}"
    )
    # BuildKit is the default only from Docker 23; the Dockerfile needs it (cache and secret mounts).
    built = subprocess.run(command, env={**os.environ, "DOCKER_BUILDKIT": "1"}, check=False)
    if built.returncode == 0:
        _say(f"built {', '.join(tags)}")
    else:
        _say(f"the image build failed (exit {built.returncode}); the build output above says where")
    return built.returncode


@dataclass(frozen=True)
class ImageFacts:
    image_id: str
    labels: dict[str, str]


def image_facts(image: str) -> ImageFacts | None:
    """The image's id and labels, or None when the engine has no such image."""
    found = subprocess.run(
        [docker_client(), "image", "inspect", "--format", "{{.Id}} {{json .Config.Labels}}", image],
        capture_output=True,
        text=True,
        check=False,
    )
    if found.returncode != 0:
        return None
    image_id, _, labels = found.stdout.strip().partition(" ")
    return ImageFacts(image_id, json.loads(labels or "null") or {})


def _hand_to_image_user(directory: Path) -> None:
    """chown what the image's user does not own yet; files it already owns are left alone."""
    for path in [directory, *directory.rglob("*")]:
        if path.lstat().st_uid != IMAGE_UID:
            os.lchown(path, IMAGE_UID, IMAGE_UID)


def prepare_volume_dirs(root: Path, host_uid: int, host_gid: int) -> tuple[int, int]:
    """Make data/, runs/ and checkpoints/ writable by the container's user; returns that user's uid:gid.

    As root, the container keeps the image's user (1000) and the directories are handed to it. As anyone
    else, the container runs as the caller's uid:gid, so what it writes belongs to the caller.
    """
    for name in VOLUME_DIRS:
        (root / name).mkdir(exist_ok=True)
    if host_uid == 0:
        for name in VOLUME_DIRS:
            _hand_to_image_user(root / name)
        return IMAGE_UID, IMAGE_UID
    for name in VOLUME_DIRS:
        if not os.access(root / name, os.W_OK | os.X_OK):
            raise PermissionError(f"{root / name} is not writable by uid {host_uid}; sudo chown -R {host_uid} {name}")
    return host_uid, host_gid


def _stale_image_note(image: str, labels: dict[str, str]) -> str | None:
    built_from = labels.get("org.opencontainers.image.revision", "")
    checkout = _git("rev-parse", "HEAD")
    if not checkout or built_from in ("", "unknown", checkout):
        return None
    return f"{image} was built from {built_from[:12]}, the checkout is at {checkout[:12]}: make build to include it"


def _wait_forwarding_signals(process: subprocess.Popen) -> int:
    """Wait for compose; SIGTERM is passed on, and Ctrl-C already reached compose (same process group)."""
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: process.send_signal(signum))
    try:
        while True:
            try:
                return process.wait()
            except KeyboardInterrupt:
                continue
    finally:
        signal.signal(signal.SIGTERM, previous)


def compose_run_command(
    compose: Sequence[str], argv: Sequence[str], *, gpu: bool, env: dict[str, str], tty: bool
) -> list[str]:
    """compose reads docker-compose.yml from the repository root (the working directory it is given), plus
    docker-compose.override.yml when present, or the files in $COMPOSE_FILE: the usual place for site changes."""
    service = "gpu" if gpu else "cpu"
    command = [*compose, "--profile", service, "run", "--rm"]
    if not tty:
        command.append("-T")
    command += [option for name, value in sorted(env.items()) for option in ("-e", f"{name}={value}")]
    return [*command, service, *argv]


def passthrough_env() -> dict[str, str]:
    """The caller's variables that a job in the container sees too."""
    prefixes = ("NCCL_", "TORCH_", "TORCHRIG_", "CUDA_VISIBLE", "WANDB_", "MLFLOW_")  # the trackers' own too
    return {k: v for k, v in os.environ.items() if k.startswith(prefixes)}


def run_in_container(argv: list[str], *, gpu: bool, env: dict[str, str], status: EngineStatus | None = None) -> int:
    """Run argv in the image (venv on PATH, repo at /workspace) through compose's gpu or cpu service.

    env is passed with -e, with TORCHRIG_IMAGE and TORCHRIG_IMAGE_ID added. The image is $TORCHRIG_IMAGE,
    default torchrig:latest (the last one built). status: the engine's, when the caller asked it already.
    Returns the command's exit code, or 1 with one line saying what is missing.
    """
    compose = compose_command()
    if compose is None:
        _say(f"no Docker Compose ('docker compose' nor 'docker-compose'): {INSTALL_DOCKER}, or set COMPOSE")
        return 1
    problem = _engine_problem(status)
    if problem:
        _say(f"cannot run in the container: {problem}")
        return 1
    image = os.environ.get("TORCHRIG_IMAGE", LATEST_IMAGE)
    facts = image_facts(image)
    if facts is None:
        _say(f"no image {image}: build it with make build (CUDA={DEFAULT_CUDA} by default)")
        return 1
    note = _stale_image_note(image, facts.labels)
    if note:
        _say(f"note: {note}")
    try:
        uid, gid = prepare_volume_dirs(ROOT, os.getuid(), os.getgid())
    except PermissionError as exc:
        _say(str(exc))
        return 1
    # The doctor and run manifests name the image they ran in.
    env = {**env, "TORCHRIG_IMAGE": image, "TORCHRIG_IMAGE_ID": facts.image_id}
    command = compose_run_command(compose, argv, gpu=gpu, env=env, tty=sys.stdin.isatty() and sys.stdout.isatty())
    compose_env = {**os.environ, "TORCHRIG_IMAGE": image, "TORCHRIG_UID": str(uid), "TORCHRIG_GID": str(gid)}
    client_dir = os.path.dirname(docker_client())
    if client_dir:  # compose v1 runs `docker` from PATH for interactive runs: make it the same client
        compose_env["PATH"] = os.pathsep.join([client_dir, os.environ.get("PATH", "")])
    # The client ends (SIGTERM, passed into the container) when this dispatcher is killed (env/rig/lifeline.py).
    with subprocess.Popen(command, cwd=ROOT, env=compose_env, preexec_fn=signal_when_parent_dies()) as process:
        return _wait_forwarding_signals(process)


def _status(_args: argparse.Namespace) -> int:
    status = engine_status()
    print(f"answers={status.answers} nvidia={status.nvidia}: {status.reason}")
    return 0 if status.answers else 1


def _build(args: argparse.Namespace) -> int:
    return build_image(
        args.cuda, base_image=args.base_image, tags=args.tag, ca_bundle=args.ca_bundle, extra_args=args.docker_args
    )


def _run(args: argparse.Namespace) -> int:
    if not args.argv:
        raise UserError("nothing to run; e.g. python3 -m env.rig.docker run -- python -m env.rig.profiles list")
    return run_in_container(args.argv, gpu=args.gpu, env=passthrough_env())


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python3 -m env.rig.docker", description="torchrig's Docker side")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("status", help="does a Docker engine answer, with the NVIDIA runtime?").set_defaults(
        run=_status
    )
    build = commands.add_parser("build", help="build a CUDA profile's image; extra docker build options after --")
    build.add_argument("--cuda", default=DEFAULT_CUDA)
    build.add_argument("--base-image", help="replace the profile's base image (image tests use a local one)")
    build.add_argument("--tag", action="append", help="instead of torchrig:cuXYZ and torchrig:latest; repeatable")
    build.add_argument("--ca-bundle", help="PEM bundle for TLS-intercepting proxies (default $CA_BUNDLE)")
    build.add_argument("docker_args", nargs="*", help="passed to docker build, e.g. -- --network host")
    build.set_defaults(run=_build)
    run = commands.add_parser("run", help="run a command in the image through compose")
    run.add_argument("--gpu", action="store_true", help="the gpu service (default: the cpu service)")
    run.add_argument("argv", nargs=argparse.REMAINDER)
    run.set_defaults(run=_run)
    args = parser.parse_args(argv)
    if getattr(args, "argv", None) and args.argv[0] == "--":
        args.argv = args.argv[1:]
    return args.run(args)


if __name__ == "__main__":
    run_cli("docker", main)
