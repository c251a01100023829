"""Test-only code shared by tests/ and bench/: the fake Kubernetes API server and its parts.

Never part of the installed package (pyproject.toml packages only agent*; the image's build
context leaves tests/ out); tests/unit/test_wheel_contents.py checks the wheel.
"""
