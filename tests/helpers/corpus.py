"""Small text corpora of seeded random words, for the tests of prepare, the BPE tokenizer and evaluation."""

from __future__ import annotations

from pathlib import Path

import numpy as np

WORDS = ["alpha", "beta", "gamma", "delta", "über", "naïve", "日本語", "return", "def", "x = 1"]


def write_corpus(folder: Path, files: int = 3, lines: int = 300) -> list[Path]:
    """A few text files of seeded random words: enough text for a BPE and a validation split."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(files):
        text = "\n".join(" ".join(rng.choice(WORDS, 10)) for _ in range(lines)) + "\n"
        path = folder / f"doc{index}.txt"
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths
