"""`make nccl-test`: launch.py (the launcher), worker.py (one rank), collectives.py (the table of collectives),
options.py, place.py, report.py, watchdog.py."""
