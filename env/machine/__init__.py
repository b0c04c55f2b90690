"""What this box is: facts.py, nvml.py, links.py, p2p.py, peaks.py, and the doctor's checks.py and doctor.py."""
