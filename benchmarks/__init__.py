"""The side-by-side benchmark harness (see run.py)."""
