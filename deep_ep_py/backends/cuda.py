"""The kernel backend: calls deep_ep_py._C where a kernel exists for the call, the reference elsewhere.

Kernels take raw device pointers and a stream handle (no torch in csrc/), so this file is where tensors become
pointers. Outputs are allocated here with torch on the current stream, which Buffer has set to the
communication stream. Calls whose kernels are not written yet, and calls on CPU tensors, run the inherited
reference implementation: same results, and the README's status table says which path is which.
"""

from __future__ import annotations

import torch

from .._ext import load_extension
from .reference import ReferenceBackend

# What the layout kernel's shared-memory tiles are sized for (csrc/layout.cu).
LAYOUT_MAX_TOPK = 32


class CudaBackend(ReferenceBackend):
    name = "cuda"

    def __init__(self, group, topology, sizes) -> None:
        super().__init__(group, topology)
        self._C = load_extension()
        self.sizes = sizes

    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int):
        if not topk_idx.is_cuda or topk_idx.shape[1] > LAYOUT_MAX_TOPK:
            return super().get_dispatch_layout(topk_idx, num_experts)
        num_tokens, num_topk = topk_idx.shape
        device = topk_idx.device
        num_ranks = self.num_ranks
        num_nodes = self.topology.num_nodes
        num_tokens_per_rank = torch.empty(num_ranks, dtype=torch.int32, device=device)
        num_tokens_per_rdma_rank = torch.empty(num_nodes, dtype=torch.int32, device=device) if num_nodes > 1 else None
        num_tokens_per_expert = torch.empty(num_experts, dtype=torch.int32, device=device)
        is_token_in_rank = torch.empty(num_tokens, num_ranks, dtype=torch.bool, device=device)
        self._C.get_dispatch_layout(
            topk_idx.data_ptr(),
            num_tokens,
            num_topk,
            num_experts,
            num_ranks,
            self.topology.num_ranks_per_node,
            num_tokens_per_rank.data_ptr(),
            num_tokens_per_rdma_rank.data_ptr() if num_tokens_per_rdma_rank is not None else 0,
            num_tokens_per_expert.data_ptr(),
            is_token_in_rank.data_ptr(),
            torch.cuda.current_stream(device).cuda_stream,
        )
        return num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank
