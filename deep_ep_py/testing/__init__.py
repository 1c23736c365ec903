"""Test utilities: a launcher that runs a function on N ranks with torch.distributed initialised."""

from .launcher import RankFailedError, find_free_port, launch

__all__ = ["RankFailedError", "find_free_port", "launch"]
