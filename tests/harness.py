"""Helpers the child functions share to build a Buffer the way clients do (size hints from the configs)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

import deep_ep_py
from deep_ep_py import device as ep_device


def backend_kwargs(backend: str | None) -> dict:
    """Buffer(..., backend=...) only when a backend is named ('default' or None: the library's choice)."""
    return {} if backend in (None, "default") else {"backend": backend}


def normal_buffer(group: Any, hidden: int, backend: str | None, **kwargs: Any) -> deep_ep_py.Buffer:
    """A normal-mode Buffer sized as Megatron-Core sizes it: the max of the dispatch and combine configs' hints."""
    num_ranks = group.size() if hasattr(group, "size") else dist.get_world_size(group)
    hidden_bytes = hidden * 2
    num_nvl_bytes, num_rdma_bytes = 0, 0
    for config in (deep_ep_py.Buffer.get_dispatch_config(num_ranks), deep_ep_py.Buffer.get_combine_config(num_ranks)):
        num_nvl_bytes = max(config.get_nvl_buffer_size_hint(hidden_bytes, num_ranks), num_nvl_bytes)
        num_rdma_bytes = max(config.get_rdma_buffer_size_hint(hidden_bytes, num_ranks), num_rdma_bytes)
    return deep_ep_py.Buffer(group, num_nvl_bytes, num_rdma_bytes, **kwargs, **backend_kwargs(backend))


def low_latency_buffer(
    group: Any, max_tokens: int, hidden: int, num_experts: int, backend: str | None, **kwargs: Any
) -> deep_ep_py.Buffer:
    num_ranks = dist.get_world_size(group)
    num_rdma_bytes = deep_ep_py.Buffer.get_low_latency_rdma_size_hint(max_tokens, hidden, num_ranks, num_experts)
    return deep_ep_py.Buffer(
        group,
        num_rdma_bytes=num_rdma_bytes,
        low_latency_mode=True,
        num_qps_per_rank=max(1, num_experts // num_ranks),
        **kwargs,
        **backend_kwargs(backend),
    )


def column_major(t: torch.Tensor) -> torch.Tensor:
    """The same values as a [T, G] tensor with strides (1, T), made as clients make it: empty(G, T).T."""
    out = torch.empty((t.shape[1], t.shape[0]), dtype=t.dtype).T
    out.copy_(t)
    return out


def import_deep_ep():
    """`import deep_ep` as the frameworks do, after deep_ep_py.alias() registered the package under that name."""
    import deep_ep_py

    deep_ep_py.alias()
    import deep_ep

    return deep_ep


def check_kernels_took(buffer: Any, module: str, handle: Any, where: str) -> None:
    """Under the CPU emulator of the kernels with the kernels on (a framework test's "emulated" run), the call that
    made `handle` went by the kernels (Buffer's backend module `module`, "intranode" or "low_latency", made it), not
    the reference fallback; elsewhere nothing to check."""
    from deep_ep_py import device as ep_device
    from deep_ep_py.backends.cuda import unverified_kernels_enabled

    if not ep_device.emulated() or not unverified_kernels_enabled():
        return
    kernels = getattr(buffer._backend, module, None)
    assert kernels is not None, f"{where}: Buffer(backend={buffer.backend!r}) built no {module} kernels"
    assert kernels.owns(handle), f"{where}: the {module} kernels did not make this handle: the call took the reference"


def framework_launch_kwargs(device: str) -> dict:
    """launch() keywords of a framework test's run on `device`: "cpu" (the reference backend), or "emulated" (the
    kernels on their CPU emulator, the same calls; skipped where the emulator is not built)."""
    import pytest

    from deep_ep_py import _ext

    if device == "cpu":
        return {}
    if not _ext.emulator_available():
        pytest.skip(f"the CPU emulator of the kernels is not built: {_ext.emulator_unavailable_reason()}")
    return {"device": "emulated", "env": {"DEEP_EP_PY_UNVERIFIED_KERNELS": "1"}}


def dispatch_past_worst_tokens(
    kernels: Any, reference: deep_ep_py.Buffer, inp: Any, num_experts: int, group: Any = None
) -> str:
    """Kernel dispatch of `inp` (make_rank_inputs, on CPU) with num_worst_tokens = 1 on every rank of group. Where
    any rank receives more rows, every rank must find the same capacity record, naming the lowest such rank and its
    rows (DeepEPError, not a timeout), once the device (a GPU, or the CPU emulator) is done: so all of them raise at
    their next call, not that rank alone while its peers wait for it. Where none does, no rank may find one. Returns
    the message ("" for none)."""
    from deep_ep_py.errors import DeepEPError, DeepEPTimeoutError

    kernel_device = ep_device.kernel_device()
    x, topk_idx, topk_weights = (t.to(kernel_device) for t in (inp.x, inp.topk_idx, inp.topk_weights))
    per_rank, _, per_expert, in_rank, _ = reference.get_dispatch_layout(topk_idx, num_experts)
    # Rows every rank receives: over the group, the columns of every rank's is_token_in_rank.
    received = in_rank.to(torch.int64).sum(dim=0).cpu()
    dist.all_reduce(received, group=group)
    kernels.dispatch(x, None, None, in_rank, per_rank, per_expert, topk_idx, topk_weights, 1, 1, 8)
    ep_device.synchronize()
    message = ""
    try:
        kernels._check_device_errors("the num_worst_tokens test")
    except DeepEPTimeoutError:
        raise
    except DeepEPError as exc:
        message = str(exc)
    rank = dist.get_rank(group)
    past = [r for r, rows in enumerate(received.tolist()) if rows > 1]
    if not past:
        assert message == "", f"rank {rank}: every rank receives at most 1 row (num_worst_tokens), yet: {message}"
        return message
    # csrc/runtime/error_record.cu: "num_worst_tokens: rank R receives N rows, more than the W given".
    want = f"num_worst_tokens: rank {past[0]} receives {int(received[past[0]])} rows, more than the 1 given"
    assert want in message, f"rank {rank}: expected {want!r}, got {message!r}"
    return message
