"""What a run leaves behind: manifest.py, compare.py, runlock.py (one writer per run directory), plots.py."""
