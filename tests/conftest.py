"""Shared test setup: tests marked `cuda` skip with a reason where there is no CUDA GPU.

tests/ is a package (each folder has an __init__.py), so pytest puts the repository root on sys.path
and imports each test as tests.<folder>.<file>: two files of one name in different folders are two
modules, and the shared helpers import as tests.helpers.<module>.
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run env/gpu_check.sh on a GPU machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
