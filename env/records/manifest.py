"""The run manifest: what a run ran on, written as run_dir/manifest.json at its start.

The collective test and the bench call `write_manifest` from rank 0; training calls
`record_launch` from rank 0 once the resume check passed (a refused launch writes nothing). It records
the machine facts (env.machine.facts, without the doctor's GPU load, so it stays cheap), the git commit and
whether the tree was dirty, the image and its labels, the installed packages with a hash,
the resolved config, the NCCL_*/TORCH_* environment and the P2P decision. `python -m
env.records.compare A B` reads two of them back.

Layout (schema 1): schema, kind, created_utc, created_unix, hostname, command, git
{commit, dirty, changed, source}, image {in_container, id, labels}, packages {sha256,
count, list}, config, environment, p2p, facts, extra; a training manifest adds launches, one
{created_utc, hostname, command, git, image, packages_sha256, config, p2p} per launch that trained.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from env.common.atomic import write_text_atomically
from env.common.readfile import read_regular
from env.machine.facts import gather_facts
from env.rig.profiles import ROOT, normalise_name

SCHEMA = 1
KINDS = ("train", "nccl-test", "bench")
MANIFEST_NAME = "manifest.json"
MANIFEST_LIMIT = 64 << 20  # reading one back: far above what a run writes
# The launcher's manifest of a training launch, as JSON, for rank 0 to record once the resume check passed.
MANIFEST_ENV = "TORCHRIG_MANIFEST"
GIT_TIMEOUT_S = 5
# GLOO_SOCKET_IFNAME: the interface gloo used between nodes (NCCL_SOCKET_IFNAME is one of the NCCL_ ones).
ENV_PREFIXES = ("NCCL_", "TORCH_", "GLOO_SOCKET_IFNAME")
MAX_CHANGED_PATHS = 50


def _git(repo: Path, *args: str) -> str | None:
    """git's stdout, or None where git is absent, the directory is no repository, or git refuses it."""
    try:
        done = subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=GIT_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def git_state(repo: Path) -> dict[str, Any]:
    """The commit and whether tracked files differ from it. In the image, where the checkout may
    have no .git (or git is missing), TORCHRIG_GIT_COMMIT, set at build time, stands in."""
    commit = _git(repo, "rev-parse", "HEAD")
    if commit is None:
        from_env = os.environ.get("TORCHRIG_GIT_COMMIT")
        return {
            "commit": from_env or "unknown",
            "dirty": None,
            "changed": [],
            "source": "TORCHRIG_GIT_COMMIT" if from_env else "unknown",
        }
    status = _git(repo, "status", "--porcelain", "--untracked-files=no") or ""
    changed = [line[3:] for line in status.splitlines() if line.strip()]
    return {"commit": commit.strip(), "dirty": bool(changed), "changed": changed[:MAX_CHANGED_PATHS], "source": "git"}


def installed_packages() -> list[str]:
    """'name==version' of every installed distribution, sorted: pip freeze's content, without a subprocess."""
    from importlib import metadata

    found = {
        f"{normalise_name(d.metadata['Name'])}=={d.version}" for d in metadata.distributions() if d.metadata["Name"]
    }
    return sorted(found)


def packages_record() -> dict[str, Any]:
    packages = installed_packages()
    digest = hashlib.sha256("\n".join(packages).encode()).hexdigest()
    return {"sha256": digest, "count": len(packages), "list": packages}


def _image_id(labels: dict[str, str]) -> str:
    return labels.get("TORCHRIG_IMAGE_ID") or labels.get("TORCHRIG_IMAGE") or "unknown"


def build_manifest(
    run_dir: Path,
    *,
    kind: str,
    config: dict[str, Any] | None = None,
    p2p: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    repo_dir: Path = ROOT,
) -> dict[str, Any]:
    """The manifest of a run starting now, as a dict; nothing is written.

    kind: "train", "nccl-test" or "bench". config: the resolved config (dataclasses.asdict(cfg)).
    p2p: the P2P decision the run applied (P2PDecision.to_dict()). extra: anything else the caller
    wants kept (world size, launcher flags). repo_dir: the checkout whose commit is recorded.
    """
    if kind not in KINDS:
        raise ValueError(f"manifest kind {kind!r} is not one of {', '.join(KINDS)}")
    facts = gather_facts(Path(run_dir), gpu_load=False, probe_docker=False)
    now = time.time()
    return {
        "schema": SCHEMA,
        "kind": kind,
        "created_utc": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="seconds"),
        "created_unix": now,
        "hostname": socket.gethostname(),
        "command": sys.argv,
        "git": git_state(repo_dir),
        "image": {
            "in_container": facts.in_container,
            # The id when the launcher passed it, else the tag it ran.
            "id": _image_id(facts.image_labels) if facts.in_container else None,
            "labels": facts.image_labels,
        },
        "packages": packages_record(),
        "config": config,
        "environment": {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES)},
        "p2p": p2p,
        "facts": facts.to_dict(),
        "extra": extra,
    }


def write_manifest(run_dir: Path, **fields: Any) -> Path:
    """Write run_dir/manifest.json atomically and return its path; `fields` are build_manifest's keywords.
    Call it once, from rank 0, at the run's start (nccl-test, bench; training uses record_launch)."""
    return _write(Path(run_dir), build_manifest(run_dir, **fields))


def launch_entry(manifest: dict[str, Any]) -> dict[str, Any]:
    """One launch of a run, as `launches` lists it: when, where, what it ran and on what."""
    image = manifest.get("image") or {}
    packages = manifest.get("packages") or {}
    return {
        "created_utc": manifest.get("created_utc"),
        "hostname": manifest.get("hostname"),
        "command": manifest.get("command"),
        "git": manifest.get("git"),
        "image": image.get("id") if isinstance(image, dict) else None,
        "packages_sha256": packages.get("sha256") if isinstance(packages, dict) else None,
        "config": manifest.get("config"),
        "p2p": manifest.get("p2p"),
    }


def record_launch(run_dir: Path, manifest: dict[str, Any]) -> Path:
    """Add a training launch that passed its resume check to run_dir/manifest.json.

    The first launch writes the whole manifest: it describes the run that makes the checkpoints.
    Every launch, the first included, appends its entry to `launches`, so that a resume on another
    commit, image or host is on record. A manifest that cannot be read as ours is kept beside, under
    a new name, and a new one started: the project never overwrites what it may not have written.
    """
    run_dir = Path(run_dir)
    path = run_dir / MANIFEST_NAME
    existing = _read_own(path)
    if existing is None:
        existing = {**manifest, "launches": []}
    elif not isinstance(existing.get("launches"), list):  # written before launches were recorded
        existing["launches"] = [launch_entry(existing)]
    existing["launches"].append(launch_entry(manifest))
    return _write(run_dir, existing)


def _read_own(path: Path) -> dict[str, Any] | None:
    """The manifest at path when it is one this module wrote; None when there is none (one not ours is moved aside)."""
    if not os.path.lexists(path):
        return None
    text = read_regular(path, MANIFEST_LIMIT)
    try:
        data = json.loads(text) if text is not None else None
    except (ValueError, UnicodeDecodeError, RecursionError):
        data = None
    if isinstance(data, dict) and data.get("schema") == SCHEMA and data.get("kind") == "train":
        return data
    aside = path.with_name(f"{path.name}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}")
    os.replace(path, aside)
    print(f"torchrig: {path} was not a training manifest; kept as {aside.name}, a new one started", file=sys.stderr)
    return None


def _write(run_dir: Path, manifest: dict[str, Any]) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / MANIFEST_NAME
    write_text_atomically(path, json.dumps(manifest, indent=2, default=str) + "\n")
    return path
