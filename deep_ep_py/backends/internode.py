"""Internode (hierarchical) normal-mode dispatch and combine on the kernels of csrc/internode: the group spans
several nodes (or one host plays several, DEEP_EP_PY_RANKS_PER_NODE / Buffer(num_ranks_per_node=)).

A token crosses the network at most once per destination node, to its forwarder (the rank of that node with the
source's local index), and fans out over NVLink from there; combine reduces inside the node first and sends one
partial sum per node back. csrc/internode/internode.hpp has the protocol, buffer_layout.hpp the buffer (an NVSHMEM
symmetric allocation of num_rdma_bytes).

Tensors become device pointers here; outputs are allocated with torch on the current stream (Buffer has made it the
communication stream). Results are what ReferenceBackend.dispatch/combine return, except that combined_x is summed
in float32 inside a node, sent between nodes as bf16 and finished in float32 (two bf16 roundings instead of one).

Shapes: T tokens here, H hidden, K top-k, R ranks, N nodes, P = R / N ranks per node, L = E / R local experts,
N_recv rows received here, F rows this rank forwards.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.distributed as dist

from .. import config
from ..device import current_stream, is_current_stream_capturing, record_stream, synchronize
from ..errors import DeepEPError
from ..recv_arena import Part
from ..runtime import device_bytes_view
from ..topology import Topology
from .reference import DispatchHandle
from .round_kernels import UNBOUNDED_ROUNDS, RoundKernels
from .tensor_args import aligned16, on_device, ptr

__all__ = ["InternodeKernels", "InternodeState"]


@dataclasses.dataclass(frozen=True)
class InternodeState:
    """What the kernels keep in DispatchHandle.backend_state.

    send_pos int32 [T, R], node_send_pos int32 [T, N], node_send_list int32 [N, T]: this rank's ordinals per rank and
    per node, and the token of each node ordinal. node_counts int32 [R, N]: tokens each rank sends to each node.
    num_rounds_device int32 [1]: rounds the kernels run; num_rounds: rounds the host launches (>= that).
    recv_node_slot int32 [N_cap]: node ordinal of each received row at its source (-1 on padding rows).
    forward_mask int32 [F_cap]: which ranks of this node received each row this rank forwarded.
    """

    send_pos: torch.Tensor
    node_send_pos: torch.Tensor
    node_send_list: torch.Tensor
    node_counts: torch.Tensor
    num_rounds_device: torch.Tensor
    recv_node_slot: torch.Tensor
    forward_mask: torch.Tensor
    rows_per_round: int
    num_rounds: int
    dispatch_stride: int
    combine_stride: int
    num_local_experts: int
    owner: int


class InternodeKernels(RoundKernels):
    """The internode kernels of one Buffer: num_rdma_bytes of NVSHMEM symmetric memory per rank (from
    `nvshmem_context`, an open runtime.NvshmemContext over `group`), an error record and host counters.
    Collective to construct and to destroy (every rank of `group`)."""

    def __init__(self, group: Any, topology: Topology, num_rdma_bytes: int, ext: Any, nvshmem_context: Any) -> None:
        num_ranks = dist.get_world_size(group)
        super().__init__(
            ext, "internode", InternodeState, ext.internode_layout(num_ranks, topology.num_nodes) if ext else {}
        )
        self.rank = dist.get_rank(group)
        self.num_ranks = num_ranks
        self.num_nodes = topology.num_nodes
        self.num_local_ranks = topology.num_ranks_per_node
        # Ranks of other nodes only through puts and signals, though nvshmem_ptr maps them (one GPU as several nodes).
        self.emulate_network = config.emulate_network()
        c = self._constants
        if self.num_nodes < 2:
            raise ValueError(f"InternodeKernels: expected a group spanning 2 or more nodes, got {self.num_nodes}")
        if self.num_ranks > c["max_ranks"]:
            raise ValueError(f"InternodeKernels: expected at most {c['max_ranks']} ranks, got {self.num_ranks}")
        if self.num_local_ranks > c["max_ranks_per_node"]:
            raise ValueError(
                f"num_ranks_per_node: expected at most {c['max_ranks_per_node']} ranks per node for the internode "
                f"kernels, got {self.num_local_ranks}"
            )
        if num_rdma_bytes <= c["control_bytes"]:
            raise ValueError(
                f"num_rdma_bytes: expected more than the {c['control_bytes']} bytes of the internode control area "
                f"({self.num_ranks} ranks, {self.num_nodes} nodes), got {num_rdma_bytes}"
            )
        self.num_rdma_bytes = num_rdma_bytes
        self.nvshmem_context = nvshmem_context
        self.buffer_ptr = nvshmem_context.malloc(num_rdma_bytes)
        # The pull and push steps read and write the buffers of the node's ranks directly: every rank must see
        # every rank of its node through nvshmem_ptr. Agreed on by all ranks, so that all of them raise together.
        mapped = bool(self._ext.internode_node_peers_mapped(**self._buffer_args()))
        everyone: list[Any] = [None] * self.num_ranks
        dist.all_gather_object(everyone, mapped, group=group)
        if not all(everyone):
            unmapped = [rank for rank, ok in enumerate(everyone) if not ok]
            self.destroy()
            raise DeepEPError(
                f"InternodeKernels: ranks {unmapped} cannot map the NVSHMEM buffers of their node's ranks "
                f"(nvshmem_ptr returned null): the ranks given as one node ({self.num_local_ranks} per node) must "
                "share an NVLink domain or a GPU"
            )

    # ------------------------------------------------------------------------------------------------ helpers

    def _buffer_args(self) -> dict[str, Any]:
        return {
            "buffer": self.buffer_ptr,
            "num_bytes": self.num_rdma_bytes,
            "rank": self.rank,
            "num_ranks": self.num_ranks,
            "num_local_ranks": self.num_local_ranks,
            "emulate_network": self.emulate_network,
        }

    def _common(self) -> dict[str, Any]:
        return {
            **self._buffer_args(),
            **self._wait_args(),
            "stream": current_stream().cuda_stream,
        }

    def rows_per_round(self, hidden: int, num_topk: int) -> tuple[int, int]:
        """(rows per source block per round, reserved dispatch slot bytes) for a handle of this hidden and top-k."""
        dispatch_stride, _ = self._ext.internode_strides(hidden, num_topk, self.num_local_ranks)
        rows = self._ext.internode_rows_per_round(self.num_rdma_bytes, self.num_ranks, self.num_nodes, hidden, num_topk)
        if rows < 1:
            needed = self._ext.internode_min_bytes(self.num_ranks, self.num_nodes, hidden, num_topk, 1)
            raise ValueError(
                f"num_rdma_bytes: expected at least {needed} bytes for one row per node block (hidden {hidden}, "
                f"top-k {num_topk}, {self.num_nodes} nodes x {self.num_local_ranks} ranks), got {self.num_rdma_bytes}"
            )
        return rows, dispatch_stride

    def poison_staging(self, byte: int = 0xFF) -> None:
        """Test hook: fill this rank's staging area with `byte`. The caller makes sure no peer is inside a call
        (synchronize and barrier before and after), or rows in flight are destroyed."""
        control_bytes = self._constants["control_bytes"]
        device_bytes_view(self.buffer_ptr, self.num_rdma_bytes)[control_bytes:].fill_(byte)

    # ---------------------------------------------------------------------------------------------- dispatch

    def dispatch(
        self,
        x: torch.Tensor,
        x_scales: torch.Tensor | None,
        handle: DispatchHandle | None,
        is_token_in_rank: torch.Tensor | None,
        num_tokens_per_rank: torch.Tensor | None,
        num_tokens_per_expert: torch.Tensor | None,
        topk_idx: torch.Tensor | None,
        topk_weights: torch.Tensor | None,
        expert_alignment: int,
        num_worst_tokens: int,
        num_sms: int,
    ):
        """Arguments and results as IntranodeKernels.dispatch (inputs validated by Buffer; num_tokens_per_rank and
        num_tokens_per_rdma_rank are not read: the kernels count is_token_in_rank themselves)."""
        del num_tokens_per_rank
        self._check_device_errors("internode dispatch (an earlier call's device wait)")
        x = aligned16(x)
        device = x.device
        x_scales, topk_idx, topk_weights = (on_device(t, device) for t in (x_scales, topk_idx, topk_weights))
        num_tokens, hidden = x.shape
        if handle is not None:
            state = self._state_of(handle)
            num_worst_tokens = handle.num_worst_tokens
            rank_prefix_matrix = handle.rank_prefix_matrix
            num_recv_rows = num_worst_tokens if num_worst_tokens > 0 else handle.num_recv_tokens
            topk_idx = topk_weights = None
            per_expert: list[int] = []
        else:
            state, rank_prefix_matrix, num_recv_rows, per_expert = self._notify(
                x,
                is_token_in_rank,
                num_tokens_per_expert,
                0 if topk_idx is None else topk_idx.shape[1],
                expert_alignment,
                num_worst_tokens,
            )

        num_topk = topk_idx.shape[1] if topk_idx is not None else 0
        num_scales = x_scales.shape[1] if x_scales is not None else 0
        recv_x, recv_scales, recv_topk_idx, recv_topk_weights = self._empty_outputs(
            [
                Part((num_recv_rows, hidden), x.dtype),
                Part((num_recv_rows, num_scales), torch.float32) if x_scales is not None else None,
                Part((num_recv_rows, num_topk), torch.int64) if num_topk else None,
                Part((num_recv_rows, num_topk), torch.float32) if num_topk else None,
            ],
            device,
        )
        assert recv_x is not None
        recv_src_idx = self._empty((num_recv_rows,), torch.int32, device) if handle is None else None
        self._ext.internode_dispatch(
            **self._common(),
            num_rounds=state.num_rounds,
            rows_per_round=state.rows_per_round,
            dispatch_stride=state.dispatch_stride,
            combine_stride=state.combine_stride,
            x=ptr(x),
            payload_bytes=hidden * x.element_size(),
            x_scales=ptr(x_scales),
            num_scales=num_scales,
            scale_stride_token=x_scales.stride(0) if x_scales is not None else 0,
            scale_stride_group=x_scales.stride(1) if x_scales is not None else 0,
            topk_idx=ptr(topk_idx),
            topk_weights=ptr(topk_weights),
            num_topk=num_topk,
            num_tokens=num_tokens,
            send_pos=ptr(state.send_pos),
            node_send_list=ptr(state.node_send_list),
            rank_prefix_matrix=ptr(rank_prefix_matrix),
            node_counts=ptr(state.node_counts),
            num_rounds_device=ptr(state.num_rounds_device),
            recv_x=ptr(recv_x),
            recv_scales=ptr(recv_scales),
            recv_src_idx=ptr(recv_src_idx),
            recv_topk_idx=ptr(recv_topk_idx),
            recv_topk_weights=ptr(recv_topk_weights),
            recv_node_slot=ptr(state.recv_node_slot),
            num_recv_rows=num_recv_rows,
            pad_rows=num_worst_tokens > 0,
            num_local_experts=state.num_local_experts,
            forward_mask=ptr(state.forward_mask),
            num_forward_rows=state.forward_mask.numel(),
            num_sms=num_sms,
        )
        if handle is None:
            handle = DispatchHandle(
                rank_prefix_matrix=rank_prefix_matrix,
                is_token_in_rank=is_token_in_rank,
                recv_src_idx=recv_src_idx,
                num_tokens=num_tokens,
                num_recv_tokens=-1 if num_worst_tokens > 0 else num_recv_rows,
                num_worst_tokens=num_worst_tokens,
                hidden=hidden,
                backend_state=state,
            )
        return recv_x, recv_scales, recv_topk_idx, recv_topk_weights, per_expert, handle

    def _notify(
        self,
        x: torch.Tensor,
        is_token_in_rank: torch.Tensor,
        num_tokens_per_expert: torch.Tensor,
        num_topk: int,
        expert_alignment: int,
        num_worst_tokens: int,
    ) -> tuple[InternodeState, torch.Tensor, int, list[int]]:
        """Notify of a dispatch without handle: (state, rank_prefix_matrix, received rows to allocate, per-expert)."""
        device = x.device
        num_tokens, hidden = x.shape
        num_ranks, num_nodes = self.num_ranks, self.num_nodes
        num_local_experts = num_tokens_per_expert.numel() // num_ranks
        max_local = self._constants["max_local_experts"]
        if num_local_experts > max_local:
            raise ValueError(
                f"num_tokens_per_expert: expected at most {max_local} experts per rank for the internode kernels, "
                f"got {num_local_experts}"
            )
        rows_per_round, dispatch_stride = self.rows_per_round(hidden, num_topk)
        _, combine_stride = self._ext.internode_strides(hidden, num_topk, self.num_local_ranks)
        if num_worst_tokens == 0 and is_current_stream_capturing():
            # Checked before any launch: the host would wait for counts from a kernel that is only captured.
            raise ValueError(
                "num_worst_tokens: expected > 0 inside CUDA graph capture (a dispatch without it waits on the host "
                "for the received counts), got 0"
            )
        # The notify kernel reads num_tokens_per_expert on this (communication) stream, possibly after the call
        # returns, and Buffer does not keep it alive: keep its memory from being reused before that read.
        record_stream(num_tokens_per_expert, current_stream(device))
        is_token_in_rank = on_device(is_token_in_rank, device).contiguous()
        num_tokens_per_expert = on_device(num_tokens_per_expert, device).contiguous()

        def ints(*shape: int) -> torch.Tensor:
            return torch.empty(shape, dtype=torch.int32, device=device)

        send_pos, send_counts = ints(num_tokens, num_ranks), ints(num_ranks)
        node_send_pos, node_send_list = ints(num_tokens, num_nodes), ints(num_nodes, num_tokens)
        node_send_counts, node_counts = ints(num_nodes), ints(num_ranks, num_nodes)
        rank_prefix_matrix, num_rounds_device = ints(num_ranks, num_ranks), ints(1)
        if num_worst_tokens > 0:
            # No host sync: every rank passes the same num_worst_tokens (the notify records a rank that does not).
            # A row forwarded to a node reaches at least one of its P ranks, each of which receives at most
            # num_worst_tokens rows, so no (source, node) pair carries more than P * num_worst_tokens rows, and
            # every rank launches the same rounds.
            num_recv_rows = num_worst_tokens
            num_forward_rows = self.num_local_ranks * num_worst_tokens
            max_rounds = max(1, math.ceil(num_forward_rows / rows_per_round))
            sequence = 0
        else:
            max_rounds = UNBOUNDED_ROUNDS
            sequence = self._next_sequence()
        self._ext.internode_notify(
            **self._common(),
            is_token_in_rank=ptr(is_token_in_rank),
            num_tokens=num_tokens,
            num_tokens_per_expert=ptr(num_tokens_per_expert),
            num_local_experts=num_local_experts,
            expert_alignment=expert_alignment,
            rows_per_round=rows_per_round,
            max_rounds=max_rounds,
            send_pos=ptr(send_pos),
            send_counts=ptr(send_counts),
            node_send_pos=ptr(node_send_pos),
            node_send_list=ptr(node_send_list),
            node_send_counts=ptr(node_send_counts),
            rank_prefix_matrix=ptr(rank_prefix_matrix),
            node_counts=ptr(node_counts),
            num_rounds_device=ptr(num_rounds_device),
            host_counters=self.host_counters.device_ptr if sequence else 0,
            host_sequence=sequence,
            num_worst_tokens=num_worst_tokens,
        )
        per_expert: list[int] = []
        if sequence:
            self._wait_host_counters(sequence, self.rank)
            num_recv_rows = self._counter("counter_num_recv_tokens")
            num_rounds = self._counter("counter_num_rounds")
            num_forward_rows = self._counter("counter_num_forwarded")
            per_expert = self._per_expert_counts(num_local_experts)
        else:
            num_rounds = max_rounds
        state = InternodeState(
            send_pos=send_pos,
            node_send_pos=node_send_pos,
            node_send_list=node_send_list,
            node_counts=node_counts,
            num_rounds_device=num_rounds_device,
            recv_node_slot=ints(num_recv_rows),
            forward_mask=ints(num_forward_rows),
            rows_per_round=rows_per_round,
            num_rounds=num_rounds,
            dispatch_stride=dispatch_stride,
            combine_stride=combine_stride,
            num_local_experts=num_local_experts,
            owner=self._owner,
        )
        return state, rank_prefix_matrix, num_recv_rows, per_expert

    # ----------------------------------------------------------------------------------------------- combine

    def combine(
        self,
        x: torch.Tensor,
        handle: DispatchHandle,
        topk_weights: torch.Tensor | None,
        bias: tuple[torch.Tensor, ...],
        num_sms: int,
    ):
        """Arguments and results as ReferenceBackend.combine (inputs validated by Buffer), plus num_sms:
        x bf16 [N', H] -> (combined_x bf16 [T, H], combined_topk_weights float32 [T, K] or None)."""
        self._check_device_errors("internode combine (an earlier call's device wait)")
        state = self._state_of(handle)
        x = aligned16(x)
        device = x.device
        topk_weights = on_device(topk_weights, device)
        if topk_weights is not None:
            topk_weights = topk_weights.contiguous()
        num_x_rows, hidden = x.shape
        num_tokens = handle.num_tokens
        num_topk = topk_weights.shape[1] if topk_weights is not None else 0
        row_bytes = self._ext.internode_combine_row_bytes(hidden, num_topk)
        if row_bytes > state.combine_stride:
            raise ValueError(
                f"x/topk_weights: a combine row of hidden {hidden} and top-k {num_topk} takes {row_bytes} bytes, "
                f"more than the {state.combine_stride} bytes the dispatch reserved (hidden {handle.hidden})"
            )
        acc_x, acc_weights, combined_x, combined_weights = self._combine_outputs(
            num_tokens, hidden, num_topk, state.num_rounds > 1, device
        )
        biases = [aligned16(on_device(b, device)) for b in bias]
        self._ext.internode_combine(
            **self._common(),
            num_rounds=state.num_rounds,
            rows_per_round=state.rows_per_round,
            dispatch_stride=state.dispatch_stride,
            combine_stride=state.combine_stride,
            hidden=hidden,
            x=ptr(x),
            num_x_rows=num_x_rows,
            topk_weights=ptr(topk_weights),
            num_topk=num_topk,
            recv_node_slot=ptr(state.recv_node_slot),
            rank_prefix_matrix=ptr(handle.rank_prefix_matrix),
            node_counts=ptr(state.node_counts),
            num_rounds_device=ptr(state.num_rounds_device),
            forward_mask=ptr(state.forward_mask),
            num_forward_rows=state.forward_mask.numel(),
            node_send_pos=ptr(state.node_send_pos),
            num_tokens=num_tokens,
            bias0=ptr(biases[0] if len(biases) > 0 else None),
            bias1=ptr(biases[1] if len(biases) > 1 else None),
            acc_x=ptr(acc_x),
            acc_weights=ptr(acc_weights),
            combined_x=ptr(combined_x),
            combined_weights=ptr(combined_weights),
            num_sms=num_sms,
        )
        return combined_x, combined_weights

    # -------------------------------------------------------------------------------------------- lifetime

    def barrier(self) -> None:
        """One barrier kernel of all ranks on the current stream."""
        self._ext.internode_barrier(**self._common())

    def destroy(self) -> None:
        """Collective: free the symmetric buffer (the NVSHMEM context is the caller's). Idempotent."""
        buffer_ptr = getattr(self, "buffer_ptr", 0)
        if buffer_ptr:
            self.buffer_ptr = 0
            synchronize()
            self.nvshmem_context.free(buffer_ptr)
