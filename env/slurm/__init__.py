"""Slurm: sbatch scripts that run one torchrun per node, and their Python side (env/slurm/job.py)."""
