"""Helpers the child functions share to build a Buffer the way clients do (size hints from the configs)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

import deep_ep_py


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
