"""Benchmarks of deep_ep_py: ``python -m bench`` (see bench/run.py)."""
