"""`make nccl-test`: launch.py (the launcher), worker.py (one rank), options.py, report.py, watchdog.py."""
