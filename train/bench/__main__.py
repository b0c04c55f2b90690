"""python -m train.bench: the scaling table (train/bench/cli.py)."""

from env.common.cli import run_cli
from train.bench.cli import main

if __name__ == "__main__":
    run_cli("bench", main)
