"""The rig's shell: runtime.py (the make dispatcher), docker.py, launch.py (torchrun), lifeline.py, profiles.py."""
