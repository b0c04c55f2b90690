#!/usr/bin/env bash
# make test-current: the test suite against the newest torch instead of the pinned 2.4.1, so that the code
# keeps working on current releases (lent GPU machines and users' own installs run current torch).
# Deliberately unpinned: CURRENT_TORCH (default: the newest torch pip may install) picks the release.
set -euo pipefail
cd "$(dirname "$0")/../.."

venv=.build/current-venv
[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
# The profiles' libraries, unpinned; transformers[torch]: pip keeps to the torch floor transformers declares,
# so an older CURRENT_TORCH gets the newest transformers that still supports it.
# shellcheck disable=SC2086  # CURRENT_TORCH may name torch and torchvision with versions
"$venv/bin/pip" install --quiet --disable-pip-version-check --upgrade ${CURRENT_TORCH:-torch torchvision} \
    pyyaml numpy pytest pytest-timeout nvidia-ml-py matplotlib tensorboard tokenizers safetensors \
    'transformers[torch]' peft pyarrow datasets zstandard wandb mlflow-skinny sqlalchemy alembic
"$venv/bin/python" -c 'import torch; print(f"test-current: torch {torch.__version__}")'
# Tests marked pinned_venv run make's targets, which run .venv's pinned torch whatever python runs pytest:
# make test covers them, and here they would test that same torch again.
"$venv/bin/python" -m pytest -q -m "not pinned_venv" "$@"
