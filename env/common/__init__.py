"""Shared by every CLI: cli.py (the one runner, one-line user errors), atomic.py and readfile.py (file helpers)."""
