"""Backend choice: the CUDA kernels where they are built and a GPU exists (or, under DEEP_EP_PY_EMULATE_DEVICE=1,
where their CPU emulator is built), else the reference."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch.distributed as dist

from ..topology import Topology
from .reference import ReferenceBackend

BACKEND_ENV = "DEEP_EP_PY_BACKEND"
BACKEND_NAMES = ("auto", "cuda", "reference")


@dataclass(frozen=True)
class BufferSizes:
    """What Buffer was asked to reserve; kernel backends allocate from it, the reference needs none of it."""

    num_nvl_bytes: int
    num_rdma_bytes: int
    low_latency_mode: bool
    enable_shrink: bool
    num_recv_arena_bytes: int = 0  # one-copy intranode dispatch (0: none)


def select_backend(
    requested: str | None, group: dist.ProcessGroup, topology: Topology, sizes: BufferSizes
) -> ReferenceBackend:
    """`requested` (Buffer's backend=) wins over DEEP_EP_PY_BACKEND; "auto" takes the kernels when they can run."""
    source = "backend"
    if requested is None:
        requested, source = os.environ.get(BACKEND_ENV, "auto") or "auto", BACKEND_ENV
    if requested not in BACKEND_NAMES:
        raise ValueError(f"{source}: expected one of {BACKEND_NAMES}, got {requested!r}")
    from .._ext import gpu_available, kernels_unavailable_reason

    if requested == "reference" or (requested == "auto" and not gpu_available()):
        return ReferenceBackend(group, topology)
    if not gpu_available():
        raise RuntimeError(
            f"{source}: 'cuda' requested, but the kernels cannot run here: {kernels_unavailable_reason()}"
        )
    from .cuda import CudaBackend

    return CudaBackend(group, topology, sizes)
