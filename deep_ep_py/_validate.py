"""Argument checks that run before any work, each error naming the argument, what was expected and what came."""

from __future__ import annotations

import os
import weakref
from collections.abc import Sequence
from typing import Any

import torch

from .device import is_current_stream_capturing, is_kernel_tensor

SKIP_VALUE_CHECKS_ENV = "DEEP_EP_PY_SKIP_VALUE_CHECKS"


def _dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return " or ".join(str(d) for d in dtypes)


def check_int(name: str, value: Any, *, minimum: int | None = None, even: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected int, got {type(value).__name__} ({value!r})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    if even and value % 2 != 0:
        raise ValueError(f"{name}: expected an even int, got {value}")
    return value


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected bool, got {type(value).__name__} ({value!r})")
    return value


def check_tensor(
    name: str,
    tensor: Any,
    *,
    dtype: torch.dtype | Sequence[torch.dtype] | None = None,
    shape: Sequence[int | None] | None = None,
    contiguous: bool = False,
    device: torch.device | None = None,
) -> torch.Tensor:
    """`shape` entries of None match any size; the tensor must have exactly len(shape) dims."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
    if dtype is not None:
        allowed = (dtype,) if isinstance(dtype, torch.dtype) else tuple(dtype)
        if tensor.dtype not in allowed:
            raise TypeError(f"{name}: expected dtype {_dtype_names(allowed)}, got {tensor.dtype}")
    if shape is not None:
        expected = tuple("*" if s is None else s for s in shape)
        actual = tuple(tensor.shape)
        if len(actual) != len(shape) or any(s is not None and s != a for s, a in zip(shape, actual)):
            raise ValueError(f"{name}: expected shape {expected}, got {actual}")
    if contiguous and not tensor.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor, got strides {tuple(tensor.stride())}")
    if device is not None and tensor.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {tensor.device}")
    return tensor


def value_checks_enabled(tensor: torch.Tensor) -> bool:
    """Checking values costs a device sync on GPU tensors: skipped while a CUDA graph is being captured,
    and everywhere when DEEP_EP_PY_SKIP_VALUE_CHECKS=1."""
    if os.environ.get(SKIP_VALUE_CHECKS_ENV, "0") not in ("", "0"):
        return False
    return not (is_kernel_tensor(tensor) and is_current_stream_capturing())


# The last topk_idx whose ids passed: (a weak reference to it, its version counter, num_experts). The next check of
# the same tensor, unmodified by torch, skips its device sync once (dispatch right after get_dispatch_layout, the
# usual sequence), then the entry is gone: a buffer that a kernel outside torch refills in place (no version bump)
# is read again at its next get_dispatch_layout. Inference tensors keep no version counter: checked every time.
_last_passed: tuple[weakref.ref, int, int] | None = None


def _version_of(tensor: torch.Tensor) -> int | None:
    if tensor.is_inference():
        return None
    return tensor._version


def check_expert_ids(name: str, topk_idx: torch.Tensor, num_experts: int) -> None:
    """Every id in [-1, num_experts); -1 means no expert. One device sync; none, once, for the tensor that passed
    last with the same num_experts and no in-place write by torch since."""
    global _last_passed
    if topk_idx.numel() == 0 or not value_checks_enabled(topk_idx):
        return
    version = _version_of(topk_idx)
    last = _last_passed
    if version is not None and last is not None and last[0]() is topk_idx and last[1:] == (version, num_experts):
        _last_passed = None
        return
    low, high = torch.stack(torch.aminmax(topk_idx)).tolist()
    if low < -1 or high >= num_experts:
        bad = low if low < -1 else high
        raise ValueError(f"{name}: expected expert ids in [-1, {num_experts}) (-1 = none), got {bad}")
    note_expert_ids_checked(topk_idx, num_experts)


def note_expert_ids_checked(topk_idx: torch.Tensor, num_experts: int) -> None:
    """topk_idx's ids are checked (on the host, or by a kernel that records those out of range): the next
    check_expert_ids of the same tensor, unmodified by torch, skips its device sync once."""
    global _last_passed
    version = _version_of(topk_idx)
    _last_passed = None if version is None else (weakref.ref(topk_idx), version, num_experts)
