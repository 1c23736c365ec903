"""The reference backend: the whole API on torch.distributed, any device, any process-group backend.

It is the oracle the kernels are tested against and what runs where no kernels are built. It moves data with
one variable-size all-to-all per call (see exchange.py) and computes everything else with plain torch ops,
so each result follows the contract's definition directly. Inputs arrive validated by Buffer.
"""

from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple

import torch

from .. import device as ep_device
from .. import fp8
from ..config import Config
from ..errors import DeepEPError
from ..topology import Topology
from .exchange import RowExchange

_NO_HOOK: Callable[[], None] = lambda: None


class DispatchHandle(NamedTuple):
    """Normal-mode handle. Element 0 is the contract's rank_prefix_matrix; the rest is this library's own."""

    rank_prefix_matrix: torch.Tensor  # int32 [R, R]: [i][r] = tokens rank r receives from ranks 0..i
    is_token_in_rank: torch.Tensor  # bool [T, R] of the sending side
    recv_src_idx: torch.Tensor  # int32 [N]: source token index of each received row
    num_tokens: int  # T of the dispatch that made the handle
    num_recv_tokens: int  # N, the real received count
    num_worst_tokens: int  # rows the received tensors were padded to (0: not padded)
    hidden: int
    # What a kernel backend needs besides the fields above (e.g. send positions, channel prefixes); None when the
    # reference made the handle. A backend that gets a handle whose state is not its own runs the reference.
    backend_state: object = None


class LowLatencyHandle(NamedTuple):
    """Low-latency handle, laid out as DeepEP V1's first five elements, then this library's own."""

    src_info: torch.Tensor  # int32 [L, R*M]: source token index of each received row
    layout_range: torch.Tensor  # int64 [L, R]: (row offset << 32) | row count of each source rank
    num_max_dispatch_tokens_per_rank: int
    hidden: int
    num_experts: int
    src_topk_slot: torch.Tensor  # int32 [L, R*M]: the top-k slot k that routed the row (duplicates stay apart)
    recv_count: torch.Tensor  # int32 [L]
    num_tokens: int  # T of the dispatch that made the handle
    backend_state: object = None  # as DispatchHandle.backend_state


def _round_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


class ReferenceBackend:
    """Implements each call of the API contract; Buffer has validated the arguments before calling."""

    name = "reference"

    def __init__(self, group, topology: Topology) -> None:
        self.exchange = RowExchange(group)
        self.topology = topology
        self.rank = self.exchange.rank
        self.num_ranks = self.exchange.num_ranks
        # Low-latency state: two alternating combine buffers (as the kernels' two halves of the RDMA buffer),
        # the half the next call uses, and the ranks masked out by fault tolerance.
        self.low_latency_buffer_idx = 0
        self.combine_buffers: dict[tuple, list[torch.Tensor]] = {}
        self.rank_mask = torch.zeros(self.num_ranks, dtype=torch.int32)

    # ------------------------------------------------------------------------------------------------ layout

    def _refuse_capture(self, call: str) -> None:
        """Before any state changes: a DeepEPError where the calling stream is being captured into a CUDA graph. The
        reference copies to the host and gathers over torch.distributed, which a capture cannot hold (CUDA's own
        error would not say why the call took this path)."""
        if not ep_device.is_current_stream_capturing():
            return
        raise DeepEPError(
            f"{call}: expected no CUDA-graph capture, got a capturing stream on the reference implementation, which "
            f"syncs with the host ({self._reference_reason()}); the kernels can be captured: Buffer(backend='cuda') "
            "on CUDA tensors, with DEEP_EP_PY_UNVERIFIED_KERNELS=1 until they have passed the GPU tier"
        )

    def _reference_reason(self) -> str:
        """Why this call runs on the reference, for _refuse_capture's message."""
        return "this Buffer's backend is 'reference'"

    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int):
        """-> (num_tokens_per_rank int32 [R], num_tokens_per_rdma_rank int32 [nodes] or None,
        num_tokens_per_expert int32 [E], is_token_in_rank bool [T, R])."""
        self._refuse_capture("get_dispatch_layout")
        num_tokens = topk_idx.shape[0]
        experts_per_rank = num_experts // self.num_ranks
        token_of, slot_of = torch.nonzero(topk_idx >= 0, as_tuple=True)
        token_has_expert = torch.zeros(num_tokens, num_experts, dtype=torch.bool, device=topk_idx.device)
        token_has_expert[token_of, topk_idx[token_of, slot_of]] = True
        num_tokens_per_expert = token_has_expert.sum(0, dtype=torch.int32)
        is_token_in_rank = token_has_expert.view(num_tokens, self.num_ranks, experts_per_rank).any(-1)
        num_tokens_per_rank = is_token_in_rank.sum(0, dtype=torch.int32)
        num_tokens_per_rdma_rank = None
        if self.topology.num_nodes > 1:
            per_node = self.topology.num_ranks_per_node
            is_token_in_node = is_token_in_rank.view(num_tokens, self.topology.num_nodes, per_node).any(-1)
            num_tokens_per_rdma_rank = is_token_in_node.sum(0, dtype=torch.int32)
        return num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank

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
        config: Config | None = None,
    ):
        """-> (recv_x, recv_x_scales or None, recv_topk_idx or None, recv_topk_weights or None,
        num_recv_tokens_per_expert_list, handle). `config` is for the kernels (SMs, chunks); unused here."""
        self._refuse_capture("dispatch")
        device = x.device
        num_tokens, hidden = x.shape
        num_ranks, rank = self.num_ranks, self.rank
        num_experts = num_tokens_per_expert.numel() if num_tokens_per_expert is not None else 0
        if handle is not None:
            is_token_in_rank = handle.is_token_in_rank
            num_worst_tokens = handle.num_worst_tokens
        in_rank = is_token_in_rank.cpu()
        send_idx = [torch.nonzero(in_rank[:, dst]).flatten() for dst in range(num_ranks)]
        send_counts = [int(idx.numel()) for idx in send_idx]
        if num_tokens_per_rank is not None:
            expected = in_rank.sum(0, dtype=torch.int32)
            if not torch.equal(num_tokens_per_rank.cpu(), expected):
                raise ValueError(
                    "num_tokens_per_rank: expected the per-rank counts of is_token_in_rank "
                    f"{expected.tolist()}, got {num_tokens_per_rank.cpu().tolist()}"
                )

        # One gather carries the send counts (for rank_prefix_matrix), each rank's per-expert counts and the
        # shape of what it sends, so that ranks that disagree fail with a message instead of garbage.
        num_topk = topk_idx.shape[1] if topk_idx is not None else 0
        num_scales = x_scales.shape[1] if x_scales is not None else -1
        per_expert = num_tokens_per_expert.cpu().tolist() if num_tokens_per_expert is not None else []
        meta = [hidden, num_topk, num_scales, x.element_size(), num_experts, *send_counts, *per_expert]
        gathered = self.exchange.all_gather_ints(meta)
        self._check_agree(gathered[:, :5], ("hidden", "top-k", "scale columns", "x element size", "num_experts"))
        counts = gathered[:, 5 : 5 + num_ranks]
        rank_prefix_matrix = counts.cumsum(0).to(torch.int32)
        recv_counts = counts[:, rank].tolist()
        num_recv_tokens = sum(recv_counts)

        per_token = [_byte_view_of_fp8(x.cpu())]
        if x_scales is not None:
            per_token.append(x_scales.cpu())
        if topk_idx is not None:
            per_token += [topk_idx.cpu(), topk_weights.cpu()]
        fields_per_dest = [
            [per_token[0][idx], idx.to(torch.int32), *(t[idx] for t in per_token[1:])] for idx in send_idx
        ]
        received = self.exchange.exchange_rows(fields_per_dest, recv_counts, fields_per_dest[0])
        recv_x, recv_src_idx = received[0], received[1]
        recv_x_scales = received[2] if x_scales is not None else None

        recv_topk_idx = recv_topk_weights = None
        if topk_idx is not None:
            raw_idx, raw_weights = received[-2], received[-1]
            experts_per_rank = num_experts // num_ranks
            local = raw_idx - rank * experts_per_rank
            is_local = (raw_idx >= 0) & (local >= 0) & (local < experts_per_rank)
            recv_topk_idx = torch.where(is_local, local, torch.full_like(local, -1))
            recv_topk_weights = torch.where(is_local, raw_weights, torch.zeros_like(raw_weights))

        if handle is None:
            experts_per_rank = num_experts // num_ranks
            own = gathered[:, 5 + num_ranks + rank * experts_per_rank : 5 + num_ranks + (rank + 1) * experts_per_rank]
            recv_per_expert = [_round_up(int(c), expert_alignment) for c in own.sum(0).tolist()]
        else:
            recv_per_expert = []

        if num_worst_tokens > 0:
            if num_recv_tokens > num_worst_tokens:
                raise ValueError(
                    f"num_worst_tokens: expected at least the {num_recv_tokens} tokens rank {rank} receives, "
                    f"got {num_worst_tokens}"
                )
            recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights = (
                _pad_rows(t, num_worst_tokens, fill)
                for t, fill in ((recv_x, 0), (recv_x_scales, 0), (recv_topk_idx, -1), (recv_topk_weights, 0))
            )
            recv_per_expert = []

        new_handle = DispatchHandle(
            rank_prefix_matrix=rank_prefix_matrix.to(device),
            is_token_in_rank=is_token_in_rank,
            recv_src_idx=recv_src_idx.to(device),
            num_tokens=num_tokens,
            num_recv_tokens=num_recv_tokens,
            num_worst_tokens=num_worst_tokens,
            hidden=hidden,
        )
        to_device = lambda t: t.to(device) if t is not None else None
        return (
            recv_x.to(device).view(x.dtype),
            to_device(recv_x_scales),
            to_device(recv_topk_idx),
            to_device(recv_topk_weights),
            recv_per_expert,
            handle if handle is not None else new_handle,
        )

    # ----------------------------------------------------------------------------------------------- combine

    def combine(
        self,
        x: torch.Tensor,
        handle: DispatchHandle,
        topk_weights: torch.Tensor | None,
        bias: tuple[torch.Tensor, ...],
        config: Config | None = None,
    ):
        """-> (combined_x bf16 [T, H], combined_topk_weights float32 [T, K] or None). `config`: unused here."""
        self._refuse_capture("combine")
        device = x.device
        rank, num_ranks = self.rank, self.num_ranks
        meta = [x.shape[1], topk_weights.shape[1] if topk_weights is not None else -1]
        self._check_agree(self.exchange.all_gather_ints(meta), ("hidden", "top-k of topk_weights"))

        # Rows received from rank s sit at [prefix[s-1][me], prefix[s][me]) and go back to s in that order.
        column = handle.rank_prefix_matrix[:, rank].cpu().tolist()
        starts = [0, *column[:-1]]
        x_cpu = x.cpu()
        weights_cpu = topk_weights.cpu() if topk_weights is not None else None
        fields_per_dest = []
        for src in range(num_ranks):
            rows = slice(starts[src], column[src])
            fields = [x_cpu[rows]]
            if weights_cpu is not None:
                fields.append(weights_cpu[rows])
            fields_per_dest.append(fields)
        in_rank = handle.is_token_in_rank.cpu()
        send_idx = [torch.nonzero(in_rank[:, dst]).flatten() for dst in range(num_ranks)]
        received = self.exchange.exchange_rows(fields_per_dest, [int(i.numel()) for i in send_idx], fields_per_dest[0])
        token_idx = torch.cat(send_idx)
        combined = torch.zeros(handle.num_tokens, x.shape[1], dtype=torch.float32)
        combined.index_add_(0, token_idx, received[0].float())
        for b in bias:
            combined += b.cpu().float()
        combined_weights = None
        if topk_weights is not None:
            combined_weights = torch.zeros(handle.num_tokens, topk_weights.shape[1], dtype=torch.float32)
            combined_weights.index_add_(0, token_idx, received[1].float())
            combined_weights = combined_weights.to(device)
        return combined.to(torch.bfloat16).to(device), combined_weights

    # ----------------------------------------------------------------------------------------- low latency

    def _next_buffer_idx(self) -> int:
        idx = self.low_latency_buffer_idx
        self.low_latency_buffer_idx ^= 1
        return idx

    def combine_buffer(self, handle: LowLatencyHandle, buffer_idx: int, device: torch.device) -> torch.Tensor:
        """The bf16 [L, R*M, H] tensor a zero-copy combine reads, one per alternating half."""
        experts_per_rank = handle.num_experts // self.num_ranks
        key = (experts_per_rank, self.num_ranks * handle.num_max_dispatch_tokens_per_rank, handle.hidden, str(device))
        if key not in self.combine_buffers:
            self.combine_buffers[key] = [torch.zeros(key[:3], dtype=torch.bfloat16, device=device) for _ in range(2)]
        return self.combine_buffers[key][buffer_idx]

    def next_combine_buffer(self, handle: LowLatencyHandle, device: torch.device) -> torch.Tensor:
        return self.combine_buffer(handle, self.low_latency_buffer_idx, device)

    def local_buffer_bytes(self, use_rdma_buffer: bool) -> torch.Tensor | None:
        """uint8 view of the memory the kernels use as this rank's NVLink (or RDMA) buffer, or None where no kernel
        holds one (the reference moves its data through torch.distributed, with no such buffer)."""
        return None

    def checks_expert_ids_on_device(self, call: str, tensor: torch.Tensor) -> bool:
        """Whether `call` ("get_dispatch_layout" on topk_idx, "low_latency_dispatch" on x) runs on kernels that
        skip an expert id outside [-1, E) and record it for the next such call to raise, so that Buffer need not
        read the ids on the host (a device sync per call)."""
        return False

    def clean_low_latency_buffer(self, num_experts: int) -> None:
        self._zero_combine_buffers()
        self.exchange.barrier()

    def _zero_combine_buffers(self) -> None:
        for halves in self.combine_buffers.values():
            for half in halves:
                half.zero_()

    def low_latency_dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        num_max_dispatch_tokens_per_rank: int,
        num_experts: int,
        cumulative_local_expert_recv_stats: torch.Tensor | None,
        dispatch_wait_recv_cost_stats: torch.Tensor | None,
        use_fp8: bool,
        round_scale: bool,
        use_ue8m0: bool,
        return_recv_hook: bool,
    ):
        """-> (recv_x, recv_x_scales or None, recv_count int32 [L], handle, hook)."""
        self._refuse_capture("low_latency_dispatch")
        device = x.device
        num_tokens, hidden = x.shape
        num_ranks, rank = self.num_ranks, self.rank
        max_tokens = num_max_dispatch_tokens_per_rank
        experts_per_rank = num_experts // num_ranks
        self._next_buffer_idx()

        # One row per (token, top-k slot) with an expert on an unmasked rank, grouped by destination rank and
        # ordered inside it by (local expert, token, slot).
        topk_cpu = topk_idx.cpu()
        dest_of = torch.where(topk_cpu >= 0, topk_cpu // experts_per_rank, torch.full_like(topk_cpu, -1))
        masked = self.rank_mask.bool()
        send = (topk_cpu >= 0) & ~masked[dest_of.clamp(min=0)]
        token_of, slot_of = torch.nonzero(send, as_tuple=True)
        expert_of = topk_cpu[token_of, slot_of]
        order = torch.argsort(expert_of, stable=True)
        token_of, slot_of, expert_of = token_of[order], slot_of[order], expert_of[order]
        dest = expert_of // experts_per_rank

        if use_fp8:
            payload, scales = fp8.per_token_cast_to_fp8(x.cpu(), round_scale=round_scale, use_ue8m0=use_ue8m0)
        else:
            payload, scales = x.cpu(), None
        payload = _byte_view_of_fp8(payload)
        fields_per_dest = []
        for dst in range(num_ranks):
            rows = dest == dst
            tokens = token_of[rows]
            fields = [
                payload[tokens],
                (expert_of[rows] % experts_per_rank).to(torch.int32),
                tokens.to(torch.int32),
                slot_of[rows].to(torch.int32),
            ]
            if scales is not None:
                fields.append(scales[tokens])
            fields_per_dest.append(fields)
        send_counts = [int(f[0].shape[0]) for f in fields_per_dest]
        meta = [max_tokens, hidden, num_experts, int(use_fp8), int(use_ue8m0), *send_counts]
        started = time.perf_counter_ns()
        gathered = self.exchange.all_gather_ints(meta)
        self._check_agree(
            gathered[:, :5], ("num_max_dispatch_tokens_per_rank", "hidden", "num_experts", "use_fp8", "use_ue8m0")
        )
        recv_counts = gathered[:, 5 + rank].tolist()
        received = self.exchange.exchange_rows(fields_per_dest, recv_counts, fields_per_dest[0])
        wait_ns = time.perf_counter_ns() - started
        # Masks are each rank's own view: rows from a source this rank masked are dropped on arrival.
        recv_source = torch.repeat_interleave(torch.arange(num_ranks), torch.tensor(recv_counts, dtype=torch.int64))
        keep = ~masked[recv_source]
        received = [t[keep] for t in received]
        recv_source = recv_source[keep]
        # Pack: for each local expert, source rank 0's rows, then rank 1's, ...; inside a source, token order.
        order = torch.argsort(received[1], stable=True)
        received = [t[order] for t in received]
        recv_source = recv_source[order]
        recv_payload, recv_expert, recv_token, recv_slot = received[:4]
        recv_scales = received[4] if scales is not None else None
        recv_count = torch.bincount(recv_expert.long(), minlength=experts_per_rank).to(torch.int32)
        expert_start = torch.cumsum(recv_count, 0) - recv_count
        position = torch.arange(recv_expert.numel()) - expert_start[recv_expert.long()]
        per_source = torch.zeros(experts_per_rank, num_ranks, dtype=torch.int64)
        per_source.index_put_((recv_expert.long(), recv_source), torch.ones_like(recv_source), accumulate=True)
        source_offset = torch.cumsum(per_source, 1) - per_source
        if per_source.numel() and int(per_source.max()) > max_tokens:
            raise ValueError(
                f"topk_idx: a rank sent more than num_max_dispatch_tokens_per_rank ({max_tokens}) rows to one "
                "expert; a token lists the same expert twice"
            )
        layout_range = (source_offset << 32) | per_source

        slots = num_ranks * max_tokens
        out_dtype = torch.float8_e4m3fn if use_fp8 else torch.bfloat16
        recv_x = torch.empty(experts_per_rank, slots, hidden, dtype=out_dtype, device=device)
        recv_x_scales = None
        if use_fp8:
            num_scale_cols = recv_scales.shape[1] if recv_scales is not None else hidden // fp8.GROUP_SIZE
            scale_dtype = torch.int32 if use_ue8m0 else torch.float32
            # column-major in the last two dims: [L, cols, R*M] storage seen as [L, R*M, cols]
            recv_x_scales = torch.empty(
                experts_per_rank, num_scale_cols, slots, dtype=scale_dtype, device=device
            ).transpose(1, 2)
        src_info = torch.full((experts_per_rank, slots), -1, dtype=torch.int32)
        src_slot = torch.full((experts_per_rank, slots), -1, dtype=torch.int32)
        src_info[recv_expert.long(), position] = recv_token
        src_slot[recv_expert.long(), position] = recv_slot
        handle = LowLatencyHandle(
            src_info=src_info.to(device),
            layout_range=layout_range.to(device),
            num_max_dispatch_tokens_per_rank=max_tokens,
            hidden=hidden,
            num_experts=num_experts,
            src_topk_slot=src_slot.to(device),
            recv_count=recv_count.to(device),
            num_tokens=num_tokens,
        )

        def receive() -> None:
            index = (recv_expert.long().to(device), position.to(device))
            _byte_view_of_fp8(recv_x).index_put_(index, recv_payload.to(device))
            if recv_x_scales is not None:
                recv_x_scales.index_put_(index, recv_scales.to(device))
            if cumulative_local_expert_recv_stats is not None:
                cumulative_local_expert_recv_stats.add_(recv_count.to(cumulative_local_expert_recv_stats.device))
            if dispatch_wait_recv_cost_stats is not None:
                # the reference waits for all sources in one collective: every source is charged that wait
                dispatch_wait_recv_cost_stats.add_(wait_ns)

        hook = _deferred(receive, return_recv_hook, device)
        return recv_x, recv_x_scales, recv_count.to(device), handle, hook

    def low_latency_combine(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        handle: LowLatencyHandle,
        zero_copy: bool,
        return_recv_hook: bool,
        out: torch.Tensor | None,
        combine_wait_recv_cost_stats: torch.Tensor | None,
    ):
        """-> (combined_x bf16 [T, H], hook)."""
        self._refuse_capture("low_latency_combine")
        device = topk_idx.device
        num_ranks = self.num_ranks
        buffer_idx = self._next_buffer_idx()
        source = self.combine_buffer(handle, buffer_idx, x.device) if zero_copy else x
        masked = self.rank_mask.bool()

        # The valid rows of each expert are [0, recv_count[e]); row p came from the last source whose block
        # starts at or before p (blocks are laid out by source rank, empty blocks share their successor's start).
        recv_count = handle.recv_count.cpu()
        offsets = handle.layout_range.cpu() >> 32
        is_valid_row = torch.arange(handle.src_info.shape[1]).unsqueeze(0) < recv_count.unsqueeze(1)
        expert_of, position = torch.nonzero(is_valid_row, as_tuple=True)
        source_of = torch.searchsorted(offsets[expert_of], position.unsqueeze(1), right=True).squeeze(1) - 1
        rows = source.cpu()[expert_of, position]
        tokens = handle.src_info.cpu()[expert_of, position]
        slots = handle.src_topk_slot.cpu()[expert_of, position]
        fields_per_dest = []
        for src in range(num_ranks):
            to_src = (source_of == src) & ~masked[src]
            fields_per_dest.append([rows[to_src], tokens[to_src], slots[to_src]])
        send_counts = [int(f[0].shape[0]) for f in fields_per_dest]
        started = time.perf_counter_ns()
        gathered = self.exchange.all_gather_ints([handle.hidden, *send_counts])
        self._check_agree(gathered[:, :1], ("hidden",))
        recv_counts = gathered[:, 1 + self.rank].tolist()
        received = self.exchange.exchange_rows(fields_per_dest, recv_counts, fields_per_dest[0])
        wait_ns = time.perf_counter_ns() - started
        recv_source = torch.repeat_interleave(torch.arange(num_ranks), torch.tensor(recv_counts, dtype=torch.int64))
        keep = ~masked[recv_source]
        rows, tokens, slots = received[0][keep], received[1][keep].long(), received[2][keep].long()

        combined = (
            out
            if out is not None
            else torch.empty(topk_idx.shape[0], handle.hidden, dtype=torch.bfloat16, device=device)
        )

        def receive() -> None:
            topk_cpu = topk_idx.cpu()
            weights = topk_weights.cpu().float()[tokens, slots]
            weights = torch.where(topk_cpu[tokens, slots] >= 0, weights, torch.zeros_like(weights))
            acc = torch.zeros(topk_idx.shape[0], handle.hidden, dtype=torch.float32)
            acc.index_add_(0, tokens, rows.float() * weights.unsqueeze(1))
            combined.copy_(acc.to(torch.bfloat16))
            if combine_wait_recv_cost_stats is not None:
                combine_wait_recv_cost_stats.add_(wait_ns)

        return combined, _deferred(receive, return_recv_hook, device)

    # ------------------------------------------------------------------------------------------- rank mask

    def update_mask(self, rank: int, mask: bool) -> None:
        self.rank_mask[rank] = 1 if mask else 0

    def query_mask(self, mask_status: torch.Tensor) -> None:
        mask_status.copy_(self.rank_mask.to(mask_status.device))

    def clean_mask(self) -> None:
        self.rank_mask.zero_()

    # ------------------------------------------------------------------------------------------------ misc

    def _check_agree(self, gathered: torch.Tensor, names: tuple[str, ...]) -> None:
        """Raise when ranks passed different shapes: the kernels would read garbage, the reference says so."""
        for column, name in enumerate(names):
            values = gathered[:, column].tolist()
            if any(v != values[0] for v in values):
                raise ValueError(f"{name}: expected the same value on every rank, got {values} (by rank)")

    def barrier(self) -> None:
        self.exchange.barrier()

    def record_stream(self, tensor: torch.Tensor, stream: Any) -> None:
        """tensor.record_stream(stream), through the receive arena for dispatch results that live in one."""
        from ..recv_arena import record_stream

        record_stream(tensor, stream)

    def destroy(self) -> None:
        """Release what the backend holds (the reference holds only host-side state)."""
        self.combine_buffers.clear()


def _byte_view_of_fp8(tensor: torch.Tensor) -> torch.Tensor:
    """tensor, or its bytes where it is FP8: torch before 2.10 or so (2.9 has none) lacks CPU indexing kernels for
    float8 dtypes, and the reference only moves FP8 values, never computes with them."""
    return tensor.view(torch.uint8) if tensor.dtype == torch.float8_e4m3fn else tensor


def _pad_rows(tensor: torch.Tensor | None, num_rows: int, fill: float) -> torch.Tensor | None:
    if tensor is None:
        return None
    padded = torch.full((num_rows, *tensor.shape[1:]), fill, dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    return padded


def _deferred(receive: Callable[[], None], return_recv_hook: bool, device: torch.device) -> Callable[[], None]:
    """Without a hook the receive completes now; with one, hook() completes it (once), on the call's stream."""
    if not return_recv_hook:
        receive()
        return _NO_HOOK
    receive = ep_device.on_stream_of_now(receive, device)
    done = []

    def hook() -> None:
        if not done:
            receive()
            done.append(True)

    return hook
