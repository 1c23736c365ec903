"""Intranode normal-mode dispatch and combine on the kernels of csrc/intranode (all ranks of the group on one node).

Tensors become device pointers here; outputs are allocated with torch on the current stream (Buffer has made it the
communication stream) and the kernels run on it. Results are exactly what ReferenceBackend.dispatch/combine return.

How a call runs (csrc/intranode/intranode.hpp has the protocol, buffer_layout.hpp the buffer):
- dispatch: notify kernels (send positions, counts to every rank, one barrier, rank_prefix_matrix, counts for the
  host); the host waits for its counts (N, rounds, per-expert) unless num_worst_tokens > 0; then num_rounds rounds
  of send / barrier / receive / barrier.
- cached dispatch: the rounds only, with the positions and counts of the handle.
- one-copy dispatch (num_recv_arena_bytes > 0): the received tensors are blocks of this rank's receive arena
  (recv_arena.py), which every peer maps, so senders write rows straight into them: publish / barrier / send /
  barrier, one HBM pass per byte instead of two. A call whose results do not fit the arena (or that is being
  captured into a CUDA graph) takes ordinary tensors, and then every rank moves that call's rows through the rounds.
- combine: the rounds in reverse (received rows back to their sources), reduced in float32 at the source.

Shapes: T tokens here, H hidden, K top-k, R ranks, E experts, L = E / R, N rows received here.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from typing import Any

import torch
import torch.distributed as dist

from ..device import current_stream, is_current_stream_capturing, kernel_device, record_stream, synchronize
from ..recv_arena import Part, RecvArena
from ..runtime import PeerMappedBuffer, device_bytes_view
from ..topology import Topology
from .reference import DispatchHandle
from .round_kernels import UNBOUNDED_ROUNDS, RoundKernels
from .tensor_args import aligned16 as _aligned
from .tensor_args import on_device as _on
from .tensor_args import ptr as _ptr

__all__ = ["IntranodeKernels", "IntranodeState"]


@dataclasses.dataclass(frozen=True)
class IntranodeState:
    """What the kernels keep in DispatchHandle.backend_state.

    send_pos int32 [T, R]: ordinal of token t among this rank's tokens for rank d (-1: not sent there).
    send_list int32 [R, T]: the token of each ordinal (first send_counts[d] entries of row d).
    send_counts int32 [R]: tokens this rank sends to each rank.
    rows_per_round: B, rows per (source, destination) pair per round; num_rounds: rounds the host launches in every
    call on the handle; num_rounds_device int32 [1]: rounds the kernels run (<= num_rounds: without a host sync the
    host launches the most the counts could need, and those past the notify's count return at once).
    slot_bytes: staging bytes per row reserved by the handle; num_local_experts: L; owner: the kernels' owner token.
    """

    send_pos: torch.Tensor
    send_list: torch.Tensor
    send_counts: torch.Tensor
    num_rounds_device: torch.Tensor
    rows_per_round: int
    num_rounds: int
    slot_bytes: int
    num_local_experts: int
    owner: int


class IntranodeKernels(RoundKernels):
    """The intranode kernels of one Buffer: an IPC-mapped buffer of num_nvl_bytes per rank, its error record and
    host counters, and with num_recv_arena_bytes > 0 an IPC-mapped receive arena of that size for one-copy
    dispatch. Collective to construct and to destroy (every rank of `group`)."""

    def __init__(
        self, group: Any, topology: Topology, num_nvl_bytes: int, ext: Any, num_recv_arena_bytes: int = 0
    ) -> None:
        super().__init__(ext, "intranode", IntranodeState, ext.intranode_layout() if ext is not None else {})
        self.rank = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        if topology.num_nodes != 1:
            raise ValueError(
                f"IntranodeKernels: expected every rank of the group on one node, got {topology.num_nodes} nodes"
            )
        max_ranks = self._constants["max_ranks"]
        if not 1 <= self.num_ranks <= max_ranks:
            raise ValueError(f"IntranodeKernels: expected 1 to {max_ranks} ranks, got {self.num_ranks}")
        staging_offset = self._constants["staging_offset"]
        if num_nvl_bytes <= staging_offset:
            raise ValueError(
                f"num_nvl_bytes: expected more than the {staging_offset} bytes of the intranode control area, "
                f"got {num_nvl_bytes}"
            )
        self.num_nvl_bytes = num_nvl_bytes
        self.buffer = PeerMappedBuffer(group, num_nvl_bytes)
        self.peer_ptrs = list(self.buffer.peer_ptrs)
        self.recv_arena_buffer: PeerMappedBuffer | None = None
        self.recv_arena: RecvArena | None = None
        self._arena_finalizer: weakref.finalize | None = None
        # Every rank must take the same branch (the arena's construction is collective), and the size comes from an
        # argument or a per-process environment variable: agree first, and say which ranks differ.
        sizes: list[Any] = [None] * self.num_ranks
        dist.all_gather_object(sizes, num_recv_arena_bytes, group=group)
        if len(set(sizes)) != 1:
            self.buffer.close()
            raise ValueError(
                f"num_recv_arena_bytes: expected the same value on every rank, got {sizes} (by rank); "
                "DEEP_EP_PY_RECV_ARENA_BYTES is read per process"
            )
        if num_recv_arena_bytes > 0:
            self.recv_arena_buffer = PeerMappedBuffer(group, num_recv_arena_bytes)
            self.recv_arena = RecvArena(
                self.recv_arena_buffer.local_ptr,
                num_recv_arena_bytes,
                kernel_device(),
            )
            # Dropped without destroy(): results may still view the arena, so its memory outlives this object and
            # is freed with the last of them (PeerMappedBuffer's own finaliser would free it at once).
            self._arena_finalizer = weakref.finalize(
                self, _close_arena, self.recv_arena_buffer, self.recv_arena, collective=False
            )

    # ------------------------------------------------------------------------------------------------ helpers

    def _common(self) -> dict[str, Any]:
        return {
            "peer_ptrs": self.peer_ptrs,
            "num_bytes": self.num_nvl_bytes,
            "rank": self.rank,
            **self._wait_args(),
            "stream": current_stream().cuda_stream,
        }

    def rows_per_round(self, hidden: int, num_topk: int) -> tuple[int, int]:
        """(rows per source per round, reserved slot bytes) for a handle of this hidden and top-k."""
        slot_bytes = self._ext.intranode_reserved_slot_bytes(hidden, num_topk)
        rows = self._ext.intranode_rows_per_round(self.num_nvl_bytes, self.num_ranks, slot_bytes)
        if rows < 1:
            needed = self._constants["staging_offset"] + self.num_ranks * slot_bytes
            raise ValueError(
                f"num_nvl_bytes: expected at least {needed} bytes for one {slot_bytes}-byte row per rank "
                f"(hidden {hidden}, top-k {num_topk}, {self.num_ranks} ranks), got {self.num_nvl_bytes}"
            )
        return rows, slot_bytes

    def poison_staging(self, byte: int = 0xFF) -> None:
        """Test hook: fill this rank's staging area with `byte`. The caller makes sure no peer is inside a call
        (synchronize and barrier before and after), or rows in flight are destroyed."""
        staging_offset = self._constants["staging_offset"]
        device_bytes_view(self.buffer.local_ptr, self.num_nvl_bytes)[staging_offset:].fill_(byte)

    def debug_one_copy_note(self) -> bool:
        """Test hook (synchronizes): whether the last one-copy dispatch or combine found a block on every rank, i.e.
        its rows went by the one-copy path rather than the rounds."""
        synchronize()
        offset = self._constants["one_copy_note_offset"]
        note = device_bytes_view(self.buffer.local_ptr, self.num_nvl_bytes)[offset : offset + 4]
        return bool(note.view(torch.int32).item())

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
        """Arguments and results as ReferenceBackend.dispatch (inputs validated by Buffer):
        -> (recv_x [N', H], recv_x_scales float32 [N', H/128] or None, recv_topk_idx int64 [N', K] or None,
        recv_topk_weights float32 [N', K] or None, num_recv_tokens_per_expert_list, handle), N' = N, or
        num_worst_tokens when padding (then the handle's num_recv_tokens is -1: N is known only on the device,
        and its recv_src_idx has num_worst_tokens entries, -1 past N). num_tokens_per_rank is not read: the kernels
        count is_token_in_rank themselves. num_sms: blocks of the copy kernels."""
        del num_tokens_per_rank
        self._check_device_errors("intranode dispatch (an earlier call's device wait)")
        x = _aligned(x)
        device = x.device
        x_scales, topk_idx, topk_weights = (_on(t, device) for t in (x_scales, topk_idx, topk_weights))
        num_tokens, hidden = x.shape
        num_ranks = self.num_ranks
        if handle is not None:
            state = self._state_of(handle)
            num_worst_tokens = handle.num_worst_tokens
            rank_prefix_matrix = handle.rank_prefix_matrix
            num_rounds, rows_per_round = state.num_rounds, state.rows_per_round
            num_recv_rows = num_worst_tokens if num_worst_tokens > 0 else handle.num_recv_tokens
            num_local_experts = state.num_local_experts
            topk_idx = topk_weights = None
            per_expert: list[int] = []
        else:
            num_topk = topk_idx.shape[1] if topk_idx is not None else 0
            num_local_experts = num_tokens_per_expert.numel() // num_ranks
            max_local = self._constants["max_local_experts"]
            if num_local_experts > max_local:
                raise ValueError(
                    f"num_tokens_per_expert: expected at most {max_local} experts per rank for the intranode "
                    f"kernels, got {num_local_experts}"
                )
            rows_per_round, slot_bytes = self.rows_per_round(hidden, num_topk)
            if num_worst_tokens == 0 and is_current_stream_capturing():
                # Checked before any launch: the host would wait for counts from a kernel that is only captured.
                raise ValueError(
                    "num_worst_tokens: expected > 0 inside CUDA graph capture (a dispatch without it waits on the "
                    "host for the received counts), got 0"
                )
            # The notify kernel (or a copy below) reads num_tokens_per_expert on this (communication) stream, possibly
            # after the call returns (num_worst_tokens > 0 with async_finish), and Buffer does not list it among the
            # inputs it keeps alive: keep its memory from being reused before that read.
            record_stream(num_tokens_per_expert, current_stream(device))
            is_token_in_rank = _on(is_token_in_rank, device)
            num_tokens_per_expert = _on(num_tokens_per_expert, device).contiguous()
            send_pos = torch.empty((num_tokens, num_ranks), dtype=torch.int32, device=device)
            send_list = torch.empty((num_ranks, num_tokens), dtype=torch.int32, device=device)
            send_counts = torch.empty((num_ranks,), dtype=torch.int32, device=device)
            rank_prefix_matrix = torch.empty((num_ranks, num_ranks), dtype=torch.int32, device=device)
            num_rounds_device = torch.empty((1,), dtype=torch.int32, device=device)
            sequence = 0
            if num_worst_tokens == 0:
                sequence = self._next_sequence()
                max_rounds = UNBOUNDED_ROUNDS
            else:
                # No host sync: every rank passes the same num_worst_tokens (the notify records a rank that does
                # not), no (source, destination) pair carries more rows than that, so this many rounds carry
                # everything, and every rank computes the same.
                max_rounds = max(1, math.ceil(num_worst_tokens / rows_per_round))
            self._ext.intranode_notify(
                **self._common(),
                is_token_in_rank=is_token_in_rank.data_ptr(),
                num_tokens=num_tokens,
                num_tokens_per_expert=num_tokens_per_expert.data_ptr(),
                num_local_experts=num_local_experts,
                expert_alignment=expert_alignment,
                rows_per_round=rows_per_round,
                max_rounds=max_rounds,
                send_pos=send_pos.data_ptr(),
                send_list=send_list.data_ptr(),
                send_counts=send_counts.data_ptr(),
                rank_prefix_matrix=rank_prefix_matrix.data_ptr(),
                num_rounds_device=num_rounds_device.data_ptr(),
                host_counters=self.host_counters.device_ptr if sequence else 0,
                host_sequence=sequence,
                num_worst_tokens=num_worst_tokens,
            )
            if num_worst_tokens == 0:
                num_recv_rows, num_rounds, per_expert = self._wait_counts(sequence, num_local_experts)
            else:
                num_recv_rows = num_worst_tokens
                num_rounds = max_rounds
                per_expert = []
            state = IntranodeState(
                send_pos=send_pos,
                send_list=send_list,
                send_counts=send_counts,
                num_rounds_device=num_rounds_device,
                rows_per_round=rows_per_round,
                num_rounds=num_rounds,
                slot_bytes=slot_bytes,
                num_local_experts=num_local_experts,
                owner=self._owner,
            )

        num_topk = topk_idx.shape[1] if topk_idx is not None else 0
        num_scales = x_scales.shape[1] if x_scales is not None else 0
        src_idx_part = Part((num_recv_rows,), torch.int32) if handle is None else None
        parts = [
            Part((num_recv_rows, hidden), x.dtype),
            Part((num_recv_rows, num_scales), torch.float32) if x_scales is not None else None,
            src_idx_part,
            Part((num_recv_rows, num_topk), torch.int64) if num_topk else None,
            Part((num_recv_rows, num_topk), torch.float32) if num_topk else None,
        ]
        outputs = self._arena_outputs(parts, device)
        in_arena = outputs is not None
        if outputs is None:
            outputs = self._empty_outputs([None if part is src_idx_part else part for part in parts], device)
            # src_idx is handle state, which later calls read on the communication stream: allocated there.
            outputs[2] = self._empty(src_idx_part.shape, src_idx_part.dtype, device) if src_idx_part else None
        recv_x, recv_scales, recv_src_idx, recv_topk_idx, recv_topk_weights = outputs
        assert recv_x is not None
        arena = self.recv_arena_buffer
        self._ext.intranode_dispatch(
            **self._common(),
            num_rounds=num_rounds,
            num_rounds_device=state.num_rounds_device.data_ptr(),
            rows_per_round=rows_per_round,
            x=x.data_ptr(),
            payload_bytes=hidden * x.element_size(),
            x_scales=_ptr(x_scales),
            num_scales=num_scales,
            scale_stride_token=x_scales.stride(0) if x_scales is not None else 0,
            scale_stride_group=x_scales.stride(1) if x_scales is not None else 0,
            topk_idx=_ptr(topk_idx),
            topk_weights=_ptr(topk_weights),
            num_topk=num_topk,
            num_tokens=num_tokens,
            send_list=state.send_list.data_ptr(),
            send_counts=state.send_counts.data_ptr(),
            rank_prefix_matrix=rank_prefix_matrix.data_ptr(),
            recv_x=recv_x.data_ptr(),
            recv_scales=_ptr(recv_scales),
            recv_src_idx=_ptr(recv_src_idx),
            recv_topk_idx=_ptr(recv_topk_idx),
            recv_topk_weights=_ptr(recv_topk_weights),
            num_recv_rows=num_recv_rows,
            pad_rows=num_worst_tokens > 0,
            num_local_experts=num_local_experts,
            num_sms=num_sms,
            recv_arena_ptrs=list(arena.peer_ptrs) if arena is not None else [],
            recv_arena_bytes=arena.num_bytes if arena is not None else 0,
            recv_in_arena=in_arena,
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

    def _arena_outputs(self, parts: list[Part | None], device: torch.device) -> list[torch.Tensor | None] | None:
        """The received tensors as one block of the receive arena, or None (no arena, no room, or graph capture: a
        replay would write into a block the arena may have handed to another call by then)."""
        if self.recv_arena is None or is_current_stream_capturing():
            return None
        outputs = self.recv_arena.allocate(parts, current_stream(device))
        if outputs is not None and self.debug_poison_byte is not None:
            for tensor in outputs:
                if tensor is not None:
                    tensor.view(torch.uint8).fill_(self.debug_poison_byte)
        return outputs

    def _wait_counts(self, sequence: int, num_local_experts: int) -> tuple[int, int, list[int]]:
        """Wait (GIL released) for the notify kernel's counts of call `sequence`: (N, num_rounds, per-expert)."""
        self._wait_host_counters(sequence, self.rank)
        return (
            self._counter("counter_num_recv_tokens"),
            self._counter("counter_num_rounds"),
            self._per_expert_counts(num_local_experts),
        )

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
        self._check_device_errors("intranode combine (an earlier call's device wait)")
        state = self._state_of(handle)
        x = _aligned(x)
        device = x.device
        topk_weights = _on(topk_weights, device)
        num_x_rows, hidden = x.shape
        num_tokens = handle.num_tokens
        num_topk = topk_weights.shape[1] if topk_weights is not None else 0
        slot_bytes = self._ext.intranode_combine_slot_bytes(hidden, num_topk)
        if slot_bytes > state.slot_bytes:
            raise ValueError(
                f"x/topk_weights: a combine row of hidden {hidden} and top-k {num_topk} takes {slot_bytes} bytes, "
                f"more than the {state.slot_bytes} bytes the dispatch reserved (hidden {handle.hidden})"
            )
        acc_x, acc_weights, combined_x, combined_weights = self._combine_outputs(
            num_tokens, hidden, num_topk, state.num_rounds > 1, device
        )
        biases = [_aligned(_on(b, device).contiguous()) for b in bias]
        # Kept until the call returns: a staged copy goes back to the arena fenced after the kernels queued here.
        x, topk_weights, in_arena = self._arena_combine_inputs(x, topk_weights, device)
        arena = self.recv_arena_buffer
        self._ext.intranode_combine(
            **self._common(),
            num_rounds=state.num_rounds,
            num_rounds_device=state.num_rounds_device.data_ptr(),
            rows_per_round=state.rows_per_round,
            hidden=hidden,
            x=x.data_ptr(),
            num_x_rows=num_x_rows,
            topk_weights=_ptr(topk_weights),
            num_topk=num_topk,
            rank_prefix_matrix=handle.rank_prefix_matrix.data_ptr(),
            send_pos=state.send_pos.data_ptr(),
            num_tokens=num_tokens,
            bias0=_ptr(biases[0] if len(biases) > 0 else None),
            bias1=_ptr(biases[1] if len(biases) > 1 else None),
            acc_x=_ptr(acc_x),
            acc_weights=_ptr(acc_weights),
            combined_x=combined_x.data_ptr(),
            combined_weights=_ptr(combined_weights),
            num_sms=num_sms,
            recv_arena_ptrs=list(arena.peer_ptrs) if arena is not None else [],
            recv_arena_bytes=arena.num_bytes if arena is not None else 0,
            recv_in_arena=in_arena,
        )
        return combined_x, combined_weights

    def _arena_combine_inputs(
        self, x: torch.Tensor, topk_weights: torch.Tensor | None, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        """(x, topk_weights, in_arena) for a one-copy combine: the inputs where they already lie in this rank's
        receive arena (a dispatch's results), else copies in one block of it; or the inputs as given and False (no
        arena, no room, or graph capture), and the rounds move the rows. A copy costs what the rounds' first pass
        does (one read, one write) and saves their second and the partial sums between rounds."""
        arena = self.recv_arena
        if arena is None or is_current_stream_capturing():
            return x, topk_weights, False
        inputs = [x, topk_weights]
        # Empty inputs publish no rows (and torch gives them a null pointer, even in the arena): nothing to copy.
        to_copy = [i for i, t in enumerate(inputs) if t is not None and t.numel() > 0 and not arena.contains(t)]
        if to_copy:
            copies = arena.allocate(
                [Part(tuple(inputs[i].shape), inputs[i].dtype) for i in to_copy], current_stream(device)
            )
            if copies is None:
                return x, topk_weights, False
            for i, copy in zip(to_copy, copies):
                inputs[i] = copy.copy_(inputs[i])
        return inputs[0], inputs[1], True

    # -------------------------------------------------------------------------------------------- lifetime

    def barrier(self) -> None:
        """Test hook: one cross-rank barrier kernel on the current stream. Each rank's kernels step its barrier epoch
        with a plain read-modify-write, so the caller must order this after the rank's calls in flight on other
        streams (synchronize first), as Buffer orders its own calls on one stream."""
        self._ext.intranode_barrier(**self._common())

    def destroy(self) -> None:
        """Collective: drain the streams, then unmap and free the IPC buffers. Idempotent. Receive-arena memory that
        dispatch results still view is freed when the last of them dies."""
        buffer = getattr(self, "buffer", None)
        arena_buffer, arena = getattr(self, "recv_arena_buffer", None), getattr(self, "recv_arena", None)
        self.buffer = self.recv_arena_buffer = self.recv_arena = None
        try:
            if buffer is not None:
                buffer.close()
        finally:
            if arena_buffer is not None:
                self._arena_finalizer.detach()
                _close_arena(arena_buffer, arena, collective=True)


def _close_arena(arena_buffer: PeerMappedBuffer, arena: RecvArena, collective: bool) -> None:
    """Unmap the peers' arenas now (collectively, or at once from a finaliser); free this rank's arena memory when
    no result views it any more."""
    try:
        if collective:
            arena_buffer.close(keep_local=True)
        else:
            arena_buffer.release_now(keep_local=True)
    finally:
        arena.close(arena_buffer.free_local)
