"""Benchmarks that print figures (no pass/fail on speed): `python -m train.benchmarks.<name> --help`."""
