"""Exceptions raised by deep_ep_py and its CUDA extension.

The extension (``deep_ep_py._C``) maps its C++ ``EPException`` to :class:`DeepEPError` and ``EPTimeoutException``
to :class:`DeepEPTimeoutError`. This module imports nothing else from the package, so the extension can import it
while the package itself is still initialising.
"""

from __future__ import annotations

__all__ = ["DeepEPError", "DeepEPTimeoutError"]


class DeepEPError(RuntimeError):
    """A check in deep_ep_py's kernels or runtime failed; the message carries file:line and the values seen."""


class DeepEPTimeoutError(DeepEPError, TimeoutError):
    """A wait (on the host or in a kernel) ran past its deadline; the message names rank, channel and what it
    waited for."""
