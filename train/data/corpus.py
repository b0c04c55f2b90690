"""The built-in corpus: byte-level text that needs no download.

The running Python's standard library sources (every *.py under sysconfig's stdlib path, sorted,
without test directories or site-packages), each file followed by a NUL byte, capped at
CORPUS_MAX_BYTES. It is built once into a cached token file under $TORCHRIG_DATA_DIR (default
<repo>/data/), named with the Python version. The corpus therefore depends on the Python version
(3.11 in the image and a typical local venv, but not always the same patch release), and so do the
losses: compare runs only on the same corpus (its sha256 is in the cache's .json and in describe()).
"""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

from env.common.readfile import ReadRefused, read_json
from train.data.text import document_chunks
from train.data.tokens import BYTE_VOCAB, BYTES_TOKENIZER, SIDECAR_LIMIT, sidecar_path, write_token_file
from train.errors import DataError

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
CORPUS_MAX_BYTES = 16 * 2**20
# Directory names left out of the corpus so that it is the same on every install of a version.
CORPUS_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


def data_dir() -> Path:
    """$TORCHRIG_DATA_DIR, else data/ of the checkout, else (an installed package) data/ in the working directory."""
    checkout = REPO_ROOT / "Makefile"
    return Path(os.environ.get("TORCHRIG_DATA_DIR") or (REPO_ROOT if checkout.is_file() else Path.cwd()) / "data")


def corpus_files(stdlib: Path) -> list[Path]:
    """The standard library's *.py files, in a stable order, without tests or installed packages."""
    found = []
    for folder, subdirs, names in os.walk(stdlib):
        subdirs[:] = [d for d in subdirs if d not in CORPUS_EXCLUDED_DIRS]
        found += [Path(folder, name) for name in names if name.endswith(".py")]
    return sorted(found, key=lambda path: path.relative_to(stdlib).as_posix())


def build_corpus(cache_dir: Path | None = None, max_bytes: int = CORPUS_MAX_BYTES) -> Path:
    """The cached corpus token file, built first if missing or stale; safe for ranks to race."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    version = ".".join(map(str, sys.version_info[:3]))
    path = Path(cache_dir or data_dir()) / f"corpus-{sys.implementation.name}-{version}.bin"
    # The tokenizer record is part of the identity: a cache written before token files recorded theirs is rebuilt.
    identity = {"source": "corpus", "python": version, "stdlib": str(stdlib), "max_bytes": max_bytes}
    identity["tokenizer"] = BYTES_TOKENIZER
    try:
        meta = read_json(sidecar_path(path), SIDECAR_LIMIT)
        if {k: meta.get(k) for k in identity} == identity and path.stat().st_size == meta["count"]:
            return path
    except (OSError, ReadRefused, KeyError, TypeError, AttributeError):
        pass  # missing or unreadable cache: build it
    files = corpus_files(stdlib)
    if not files:
        raise DataError(f"found no Python sources under {stdlib} for the corpus; use data.source=synthetic or files")
    try:
        write_token_file(
            path, document_chunks(files, max_bytes), BYTE_VOCAB, tokenizer=BYTES_TOKENIZER, dtype="uint8", meta=identity
        )
    except OSError as exc:
        raise DataError(
            f"cannot write the corpus cache {path} ({exc.strerror}); set TORCHRIG_DATA_DIR to a writable directory"
        ) from None
    return path
