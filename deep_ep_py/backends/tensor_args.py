"""Turning tensors into kernel arguments, shared by the kernel backends (intranode.py, internode.py, low_latency.py)."""

from __future__ import annotations

import torch

__all__ = ["aligned16", "on_device", "ptr"]


def aligned16(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor, contiguous and starting on 16 bytes (a copy only for a non-contiguous tensor or a view with an
    offset): the kernels move rows in 16-byte chunks."""
    tensor = tensor.contiguous()
    if tensor.numel() > 0 and tensor.data_ptr() % 16 != 0:
        tensor = tensor.clone()
    return tensor


def ptr(tensor: torch.Tensor | None) -> int:
    """Device address of a tensor; 0 for an absent or empty one (torch gives empty tensors no storage)."""
    return 0 if tensor is None or tensor.numel() == 0 else tensor.data_ptr()


def on_device(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """The tensor on `device`: Buffer checks dtype and shape but not the device, and a host pointer faults a kernel."""
    return tensor if tensor is None or tensor.device == device else tensor.to(device)
