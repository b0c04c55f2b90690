"""The machine and the rig's shell, one subpackage per concern; never imports train.

rig/ runs the make targets (runtime, docker, launcher, profiles); machine/ says what this box is (facts,
NVML, links, P2P, peaks, checks, doctor); nccl/ is `make nccl-test`; records/ is what a run leaves (manifest,
compare, run lock, plots); common/ holds the CLI runner and file helpers; slurm/ and cloud/ bring up
clusters and VMs; ci/ the scripts CI runs; profiles/ the CUDA profiles' locks.
"""
