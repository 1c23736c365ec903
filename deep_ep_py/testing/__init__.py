"""Test utilities: a launcher that runs a function on N ranks with torch.distributed initialised, and batches of
test cases run in one launch with an outcome per case (deep_ep_py.testing.batch)."""

from .batch import BatchCase, BatchResult, CaseOutcome, launch_batch, run_case
from .launcher import RankFailedError, find_free_port, launch

__all__ = [
    "BatchCase",
    "BatchResult",
    "CaseOutcome",
    "RankFailedError",
    "find_free_port",
    "launch",
    "launch_batch",
    "run_case",
]
