"""Facts about the machine: runtime choice, NVML, P2P, collectives, doctor. Never imports train."""
