"""deep_ep_py: expert-parallel dispatch/combine for Mixture-of-Experts, a drop-in for DeepEP V1's deep_ep.

import deep_ep_py as deep_ep          # or: deep_ep_py.alias(); import deep_ep
buffer = deep_ep.Buffer(group, num_nvl_bytes, num_rdma_bytes)
"""

from __future__ import annotations

import sys

import torch

from . import fp8, utils
from ._ext import has_kernels
from .buffer import Buffer
from .config import Config
from .errors import DeepEPError, DeepEPTimeoutError
from .events import EventHandle, EventOverlap

__version__ = "0.1.0"

# DeepEP's type for expert ids.
topk_idx_t = torch.int64


def alias(name: str = "deep_ep") -> None:
    """Register this package as `name` (default deep_ep) so `import deep_ep`, `from deep_ep.utils import ...`
    and importlib.util.find_spec("deep_ep") find it: framework code that imports DeepEP runs unchanged."""
    package = sys.modules[__name__]
    sys.modules[name] = package
    sys.modules[f"{name}.utils"] = utils


__all__ = [
    "Buffer",
    "Config",
    "DeepEPError",
    "DeepEPTimeoutError",
    "EventHandle",
    "EventOverlap",
    "alias",
    "fp8",
    "has_kernels",
    "topk_idx_t",
    "utils",
]
