"""CUDA profiles: the base image, PyTorch trio, NCCL and lock file that belong to each CUDA version.

This module owns every version fact the rig checks against: the profiles, the torch/torchvision/
torchaudio pairings (TORCH_TRIOS), the minimum driver of each CUDA release (CUDA_MIN_DRIVER), the
lock files and how they are read (parse_lock, read_pins, lock_path, locked_version).

Newer GPUs need newer CUDA (RTX 50-series and other Blackwell cards need 12.8). Builds use only PyPI's
default Linux wheels, so each profile's torch is a release whose default wheels are built on that CUDA;
its NCCL pin is the exact nvidia-nccl-cu12 that torch itself requires. tests/env/rig/test_profiles.py
keeps each lock file consistent with this table, and the image build checks the installed stack against it.

Standard library only: scripts and the Dockerfile call `python3 -m env.rig.profiles` before any venv exists.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from env.common.cli import ArgumentParser, UserError, run_cli

ROOT = Path(__file__).resolve().parents[2]


TRIO = ("torch", "torchvision", "torchaudio")
NCCL_DIST = "nvidia-nccl-cu12"

# torch -> (torchvision, torchaudio) built against it. A torchvision built for another torch fails
# at import or first use with "operator torchvision::nms does not exist".
TORCH_TRIOS: dict[str, tuple[str, str]] = {
    "2.0.0": ("0.15.1", "2.0.1"),
    "2.0.1": ("0.15.2", "2.0.2"),
    "2.1.0": ("0.16.0", "2.1.0"),
    "2.1.1": ("0.16.1", "2.1.1"),
    "2.1.2": ("0.16.2", "2.1.2"),
    "2.2.0": ("0.17.0", "2.2.0"),
    "2.2.1": ("0.17.1", "2.2.1"),
    "2.2.2": ("0.17.2", "2.2.2"),
    "2.3.0": ("0.18.0", "2.3.0"),
    "2.3.1": ("0.18.1", "2.3.1"),
    "2.4.0": ("0.19.0", "2.4.0"),
    "2.4.1": ("0.19.1", "2.4.1"),
    "2.5.0": ("0.20.0", "2.5.0"),
    "2.5.1": ("0.20.1", "2.5.1"),
    "2.6.0": ("0.21.0", "2.6.0"),
    "2.7.0": ("0.22.0", "2.7.0"),
    "2.7.1": ("0.22.1", "2.7.1"),
    "2.8.0": ("0.23.0", "2.8.0"),
    "2.9.0": ("0.24.0", "2.9.0"),
    "2.9.1": ("0.24.1", "2.9.1"),
}

# Minimum Linux driver for each CUDA toolkit release (CUDA release notes, "toolkit driver version").
CUDA_MIN_DRIVER: dict[tuple[int, int], str] = {
    (11, 8): "520.61.05",
    (12, 0): "525.60.13",
    (12, 1): "530.30.02",
    (12, 2): "535.54.03",
    (12, 3): "545.23.06",
    (12, 4): "550.54.14",
    (12, 5): "555.42.02",
    (12, 6): "560.28.03",
    (12, 8): "570.26",
    (12, 9): "575.51.03",
    (13, 0): "580.65.06",
}


@dataclass(frozen=True)
class CudaProfile:
    """One buildable CUDA stack. `cuda` is what torch.version.cuda reports for these wheels.

    torchvision, torchaudio and min_driver are read from TORCH_TRIOS and CUDA_MIN_DRIVER."""

    cuda: str
    base_image: str
    torch: str
    nccl: str  # nvidia-nccl-cu12, equal to torch's own requirement
    lock: str  # hash-locked requirements, relative to the repository root
    for_gpus: str

    @property
    def name(self) -> str:
        return "cu" + self.cuda.replace(".", "")

    @property
    def lock_input(self) -> str:
        return f"env/profiles/{self.name}.in"

    @property
    def torchvision(self) -> str:
        return TORCH_TRIOS[self.torch][0]

    @property
    def torchaudio(self) -> str:
        return TORCH_TRIOS[self.torch][1]

    @property
    def min_driver(self) -> int:
        """Driver branch that first reports this CUDA; the base image refuses older drivers."""
        major, minor = (int(part) for part in self.cuda.split("."))
        return int(CUDA_MIN_DRIVER[(major, minor)].split(".")[0])


DERIVED_FIELDS = ("name", "lock_input", "torchvision", "torchaudio", "min_driver")

# `-base-` tags: the torch wheels bring their own CUDA runtime, cuDNN, cuBLAS and NCCL as nvidia-* wheels
# and need only the driver, which the NVIDIA container toolkit mounts in. The -runtime-/-cudnn- tags would
# add about 2 GB of libraries that torch never loads.
PROFILES: tuple[CudaProfile, ...] = (
    CudaProfile(
        "12.1",
        "nvidia/cuda:12.1.1-base-ubuntu22.04",
        "2.4.1",
        "2.20.5",
        "requirements.txt",
        "Maxwell to Hopper (V100, A100, RTX 30/40, H100)",
    ),
    CudaProfile(
        "12.4",
        "nvidia/cuda:12.4.1-base-ubuntu22.04",
        "2.6.0",
        "2.21.5",
        "env/profiles/cu124.txt",
        "the 12.1 range, with newer kernels and NCCL",
    ),
    CudaProfile(
        "12.6",
        "nvidia/cuda:12.6.3-base-ubuntu22.04",
        "2.7.1",
        "2.26.2",
        "env/profiles/cu126.txt",
        "the 12.1 range, with newer kernels and NCCL",
    ),
    CudaProfile(
        "12.8",
        "nvidia/cuda:12.8.1-base-ubuntu22.04",
        "2.8.0",
        "2.27.3",
        "env/profiles/cu128.txt",
        "Blackwell (RTX 50-series, B200), and Turing to Hopper",
    ),
)
DEFAULT_CUDA = "12.1"


class UnknownProfile(UserError):
    """A CUDA version with no profile; the message names the valid ones."""


def profile(cuda: str) -> CudaProfile:
    for candidate in PROFILES:
        if cuda in (candidate.cuda, candidate.name):
            return candidate
    choices = ", ".join(p.cuda for p in PROFILES)
    raise UnknownProfile(f"no CUDA profile '{cuda}'; choose one of {choices} (e.g. CUDA=12.8)")


@dataclass(frozen=True)
class InstalledStack:
    """What the running interpreter has: torch's version, the CUDA it was built on, and NCCL."""

    torch: str | None
    cuda: str | None
    nccl_loaded: str | None  # the library torch loads (torch.cuda.nccl.version())
    nccl_package: str | None  # the nvidia-nccl-cu12 distribution


def dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def loaded_nccl(torch: Any) -> str:
    """The NCCL the imported torch loads, "2.20.5"; raises (AttributeError, RuntimeError) on a CPU build."""
    return ".".join(str(part) for part in tuple(torch.cuda.nccl.version())[:3])


def installed_stack() -> InstalledStack:
    """Read without a GPU: NCCL's version is a library call that needs no device."""
    try:
        torch = importlib.import_module("torch")
    except ImportError:
        return InstalledStack(None, None, None, dist_version("nvidia-nccl-cu12"))
    try:
        nccl_loaded = loaded_nccl(torch)
    except (AttributeError, RuntimeError):  # a CPU build has no NCCL
        nccl_loaded = None
    base_version = torch.__version__.split("+")[0]
    return InstalledStack(base_version, torch.version.cuda, nccl_loaded, dist_version("nvidia-nccl-cu12"))


def stack_mismatches(stack: InstalledStack, *, cuda: str, nccl: str, torch: str | None = None) -> list[str]:
    """One line per pin the installed stack breaks; empty when it matches."""
    problems = []
    if torch is not None and stack.torch != torch:
        problems.append(f"torch is {stack.torch}, the pin is {torch}")
    if stack.cuda != cuda:
        problems.append(f"torch.version.cuda is {stack.cuda}, the pin is {cuda}")
    if stack.nccl_loaded != nccl:
        problems.append(f"torch loads NCCL {stack.nccl_loaded}, the pin is {nccl}")
    if stack.nccl_package not in (None, nccl):
        problems.append(f"nvidia-nccl-cu12 is {stack.nccl_package}, the pin is {nccl}")
    return problems


@dataclass(frozen=True)
class LockedRequirement:
    """One `name==version` entry of a hash-locked requirements file, as uv pip compile writes it."""

    name: str
    version: str
    marker: str
    hashes: tuple[str, ...]
    via: tuple[str, ...]  # what requires it: other packages, or "-r <input>"


_PINNED = re.compile(
    r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;\\]+)\s*(?:;\s*(?P<marker>[^\\]*?))?\s*\\?$"
)
_HASH = re.compile(r"^--hash=sha256:[0-9a-f]{64}\s*\\?$")


def normalise_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_lock(text: str, *, strict: bool = True) -> list[LockedRequirement]:
    """Entries in file order; ValueError names any requirement line that is not an exact pin.

    strict=False skips such lines instead (read_pins: a lock may carry options or comments)."""
    entries: list[dict] = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or (stripped.startswith("#") and not entries):
            continue
        if not line[0].isspace():
            pinned = _PINNED.match(line)
            if pinned is None and not strict:
                continue
            if pinned is None:
                raise ValueError(f"line {number} is not an exact `name==version` pin: {line}")
            entries.append({**pinned.groupdict(), "hashes": [], "via": []})
        elif not entries:  # an indented line before any pin
            if strict:
                raise ValueError(f"line {number} continues no `name==version` pin: {line}")
        elif _HASH.match(stripped):
            entries[-1]["hashes"].append(stripped.split(":", 1)[1].rstrip(" \\"))
        elif stripped.startswith("#"):
            words = stripped.lstrip("#").strip()
            words = words.removeprefix("via").strip()
            if words:
                entries[-1]["via"].append(words)
    return [
        LockedRequirement(
            normalise_name(e["name"]), e["version"], (e["marker"] or "").strip(), tuple(e["hashes"]), tuple(e["via"])
        )
        for e in entries
    ]


def _lock_entries(lock: Path) -> list[LockedRequirement] | None:
    """A lock's pins, leniently parsed; None when the file cannot be read."""
    try:
        text = lock.read_text()
    except OSError:
        return None
    return parse_lock(text, strict=False)


def read_pins(lock: Path) -> dict[str, str]:
    """Normalised name -> version of a lock's pins (the first entry of a name wins); {} when unreadable."""
    pins: dict[str, str] = {}
    for entry in _lock_entries(lock) or []:
        pins.setdefault(entry.name, entry.version)
    return pins


def lock_path() -> Path:
    """The lock this environment was made from: $TORCHRIG_LOCK when set, else the lock of the image's
    CUDA profile ($TORCHRIG_CUDA_PROFILE), else requirements.txt (the local .venv's)."""
    if os.environ.get("TORCHRIG_LOCK"):
        return Path(os.environ["TORCHRIG_LOCK"])
    cuda_profile = os.environ.get("TORCHRIG_CUDA_PROFILE")
    if cuda_profile:
        try:
            return ROOT / profile(cuda_profile).lock
        except UnknownProfile:
            pass  # an image from a newer checkout: fall back to the default lock, the pins check will say so
    return ROOT / profile(DEFAULT_CUDA).lock


def locked_version(name: str, locks: tuple[Path, ...] | None = None) -> str | None:
    """name's pin in the first of `locks` that can be read (default: lock_path()); None when it has none."""
    for lock in (lock_path(),) if locks is None else locks:
        if (entries := _lock_entries(lock)) is not None:
            return next((e.version for e in entries if e.name == normalise_name(name)), None)
    return None


def _versions(entries: list[LockedRequirement], name: str) -> set[str]:
    return {entry.version for entry in entries if entry.name == name}


def lock_problems(chosen: CudaProfile, text: str) -> list[str]:
    """Ways a profile's lock disagrees with the profile or with torch; empty when consistent."""
    try:
        entries = parse_lock(text)
    except ValueError as exc:
        return [str(exc)]
    problems = [f"{e.name}=={e.version} has no sha256 hash" for e in entries if not e.hashes]
    for name in (*TRIO, NCCL_DIST):
        pin = getattr(chosen, name.removeprefix("nvidia-").removesuffix("-cu12"))
        if _versions(entries, name) != {pin}:
            problems.append(f"{name} is locked at {sorted(_versions(entries, name))}, the profile says {pin}")
    # torch pins its NCCL with ==, so a lock that has NCCL "via torch" holds exactly the NCCL torch requires.
    if not any(e.name == "nvidia-nccl-cu12" and "torch" in e.via for e in entries):
        problems.append("nvidia-nccl-cu12 is not locked as a requirement of torch")
    runtime = _versions(entries, "nvidia-cuda-runtime-cu12")
    if not runtime or any(not version.startswith(chosen.cuda + ".") for version in runtime):
        problems.append(f"nvidia-cuda-runtime-cu12 is locked at {sorted(runtime)}, not a CUDA {chosen.cuda} release")
    return problems


def _check_locks(_args: argparse.Namespace) -> int:
    failed = 0
    for p in PROFILES:
        problems = lock_problems(p, (ROOT / p.lock).read_text())
        for problem in problems:
            print(f"{p.lock}: {problem}", file=sys.stderr)
        failed += bool(problems)
        print(f"{p.lock}: {'INCONSISTENT' if problems else 'consistent'} (CUDA {p.cuda} profile)")
    return 1 if failed else 0


def _list(args: argparse.Namespace) -> int:
    if args.format == "tsv":
        for p in PROFILES:
            print("\t".join([p.cuda, p.lock_input, p.lock, p.base_image]))
        return 0
    print(f"{'CUDA':<6}{'torch':<8}{'vision':<8}{'audio':<8}{'NCCL':<8}{'driver':<8}{'base image':<40}for")
    for p in PROFILES:
        default = " (default)" if p.cuda == DEFAULT_CUDA else ""
        print(
            f"{p.cuda:<6}{p.torch:<8}{p.torchvision:<8}{p.torchaudio:<8}{p.nccl:<8}>={p.min_driver:<6}"
            f"{p.base_image:<40}{p.for_gpus}{default}"
        )
    return 0


def _show(args: argparse.Namespace) -> int:
    chosen = profile(args.cuda)
    fields = {**asdict(chosen), **{name: getattr(chosen, name) for name in DERIVED_FIELDS}}
    print(fields[args.field] if args.field else json.dumps(fields, indent=2))
    return 0


def _verify(args: argparse.Namespace) -> int:
    stack = installed_stack()
    problems = stack_mismatches(stack, cuda=args.cuda, nccl=args.nccl, torch=args.torch)
    for problem in problems:
        print(f"torchrig self-check FAILED: {problem}", file=sys.stderr)
    if not problems:
        print(f"torchrig self-check: torch {stack.torch}, CUDA {stack.cuda}, NCCL {stack.nccl_loaded}: match the pins")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python3 -m env.rig.profiles", description="torchrig CUDA profiles")
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="every profile")
    listing.add_argument("--format", choices=("table", "tsv"), default="table")
    listing.set_defaults(run=_list)
    show = commands.add_parser("show", help="one profile as JSON, or one field of it")
    show.add_argument("cuda", help="e.g. 12.8 or cu128")
    show.add_argument("--field", choices=[*CudaProfile.__dataclass_fields__, *DERIVED_FIELDS])
    show.set_defaults(run=_show)
    verify = commands.add_parser("verify", help="check the installed torch stack against pins (exit 1 on mismatch)")
    verify.add_argument("--cuda", required=True)
    verify.add_argument("--nccl", required=True)
    verify.add_argument("--torch")
    verify.set_defaults(run=_verify)
    commands.add_parser("check-locks", help="each lock agrees with its profile (exit 1 if not)").set_defaults(
        run=_check_locks
    )
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    run_cli("profiles", main)
