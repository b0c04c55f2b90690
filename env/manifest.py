"""The run manifest: what a run ran on, written as run_dir/manifest.json at its start.

Training, the collective test and the bench call `write_manifest` from rank 0. It records
the doctor's facts (without the doctor's GPU load, so it stays cheap), the git commit and
whether the tree was dirty, the image and its labels, the installed packages with a hash,
the resolved config, the NCCL_*/TORCH_* environment and the P2P decision. `python -m
env.compare A B` reads two of them back.

Layout (schema 1): schema, kind, created_utc, created_unix, hostname, command, git
{commit, dirty, changed, source}, image {in_container, id, labels}, packages {sha256,
count, list}, config, environment, p2p, facts, extra.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from env.atomic import write_text_atomically
from env.doctor import ROOT, gather_facts
from env.profiles import normalise_name

SCHEMA = 1
KINDS = ("train", "nccl-test", "bench")
MANIFEST_NAME = "manifest.json"
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


def write_manifest(
    run_dir: Path,
    *,
    kind: str,
    config: dict[str, Any] | None = None,
    p2p: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    repo_dir: Path = ROOT,
) -> Path:
    """Write run_dir/manifest.json atomically and return its path. Call it once, from rank 0, at the run's start.

    kind: "train", "nccl-test" or "bench". config: the resolved config (dataclasses.asdict(cfg)).
    p2p: the P2P decision the run applied (P2PDecision.to_dict()). extra: anything else the caller
    wants kept (world size, launcher flags). repo_dir: the checkout whose commit is recorded.
    """
    if kind not in KINDS:
        raise ValueError(f"manifest kind {kind!r} is not one of {', '.join(KINDS)}")
    run_dir = Path(run_dir)
    facts = gather_facts(run_dir, gpu_load=False, probe_docker=False)
    now = time.time()
    manifest = {
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
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / MANIFEST_NAME
    write_text_atomically(path, json.dumps(manifest, indent=2, default=str) + "\n")
    return path
