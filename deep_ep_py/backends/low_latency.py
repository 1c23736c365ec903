"""Low-latency (decode) dispatch and combine on the kernels of csrc/low_latency (NVSHMEM's standard device API).

:class:`LowLatencyKernels` owns one symmetric NVSHMEM buffer of ``num_rdma_bytes`` (laid out by
csrc/low_latency/buffer_layout.hpp, sized by :func:`deep_ep_py.config.low_latency_rdma_size_hint`), a device rank
mask, a small zeroed counter workspace per expert count, and a host-mapped error record that timed-out device
waits fill in. Its methods have the signatures and return tuples of the reference backend's low-latency methods;
Buffer has validated the arguments. Kernels run on the current stream (``deep_ep_py.device.current_stream()``);
nothing here synchronises the host or allocates outside torch, so every call can be captured in a CUDA graph.

Each call uses the half of the buffer after the previous call's (dispatch and combine alike, as DeepEP V1): keep at
most two calls' results pending (a hook not yet called counts), or a peer's third call overwrites the first. The
half is chosen on the host, so a CUDA graph replays the halves it was captured with: capture an even number of
low-latency calls (a dispatch and a combine per layer, as frameworks do) and make an even number of eager calls
between replays, or two consecutive calls share a half and a fast peer writes into one its peers still read. The
kernels record such a pair (the half of the last call is kept on the device), and the next check raises.
A timed-out wait (a dead or masked-on-one-side peer) leaves the kernels draining and the record filled in; the next
call, hook, or :meth:`LowLatencyKernels.check_device_errors` raises DeepEPTimeoutError naming the waiting rank and,
as the channel, the peer rank it waited for. Under mask_on_timeout (enable_shrink) such a wait masks that peer in
the device rank mask instead, and the call completes without it.
"""

from __future__ import annotations

import enum
import itertools
import os
from typing import Any, Callable, NamedTuple

import torch
import torch.distributed as dist

from .. import config
from .._ext import emulated
from ..device import (
    allocating_outputs,
    current_stream,
    is_current_stream_capturing,
    kernel_device,
    on_stream_of_now,
    synchronize,
)
from ..errors import DeepEPError
from ..runtime import device_bytes_view
from ..topology import Topology
from .reference import LowLatencyHandle
from .tensor_args import aligned16 as _aligned16
from .tensor_args import ptr as _ptr

# Blocks of every low-latency kernel (256 threads each). The receive kernels spin while peers send: with several
# ranks on one GPU, all ranks' receive grids plus one send grid must fit on the GPU at once.
DEFAULT_NUM_BLOCKS = 16
# The combine receive area keeps max(num_experts, this) top-k slots per token (csrc/low_latency/buffer_layout.hpp).
MIN_COMBINE_SLOTS_PER_TOKEN = 16


class DispatchFormat(enum.IntEnum):
    """csrc/low_latency/low_latency.hpp DispatchFormat."""

    BF16 = 0
    FP8 = 1
    FP8_ROUND_SCALE = 2
    FP8_UE8M0 = 3


class KernelHandleState(NamedTuple):
    """LowLatencyHandle.backend_state of a handle these kernels made."""

    owner: int  # the token of the LowLatencyKernels that made it (unique in the process, unlike an id())
    num_topk: int  # K of the dispatch


_owner_tokens = itertools.count(1)


def sync_words_bytes(num_ranks: int) -> int:
    """Symmetric bytes of the clean barrier's words (uint64 [R]) beside each LowLatencyKernels' buffer."""
    return 8 * num_ranks


def _noop() -> None:
    return None


def _accumulator(stats: torch.Tensor | None, device: torch.device) -> tuple[torch.Tensor | None, Callable[[], None]]:
    """(what the kernel atomically adds into, what to run on the stream after that kernel). The kernels add at
    base pointer + index: a stats tensor that is not a contiguous tensor on this GPU gets a zeroed contiguous
    stand-in, added into it after the kernel."""
    if stats is None or (stats.device == device and stats.is_contiguous()):
        return stats, _noop
    staging = torch.zeros(stats.shape, dtype=stats.dtype, device=device)
    return staging, lambda: stats.add_(staging.to(stats.device))


class LowLatencyKernels:
    """The low-latency calls on one symmetric buffer. Collective construction over ``group``.

    Args:
        group: the Buffer's torch.distributed group (used for the barrier of clean_low_latency_buffer).
        topology: the Buffer's topology: the kernels reach every peer through NVSHMEM, and under
            DEEP_EP_PY_EMULATE_NETWORK=1 the ranks of other nodes through puts and signals only.
        num_rdma_bytes: bytes of the symmetric buffer (>= low_latency_rdma_size_hint of every call's shapes).
        ext: the loaded deep_ep_py._C.
        nvshmem_context: an open runtime.NvshmemContext over ``group``.
        num_blocks: grid size of every kernel.
        mask_on_timeout: Buffer's enable_shrink (DeepEP's shrink mode): a peer that a receive waits for past the
            timeout is masked and the call completes without it, instead of the call raising DeepEPTimeoutError;
            clean_low_latency_buffer's barrier masks a rank that does not come, instead of raising.
    """

    def __init__(
        self,
        group: Any,
        topology: Topology,
        num_rdma_bytes: int,
        ext: Any,
        nvshmem_context: Any,
        num_blocks: int = DEFAULT_NUM_BLOCKS,
        mask_on_timeout: bool = False,
    ) -> None:
        if num_rdma_bytes <= 0:
            raise ValueError(
                f"num_rdma_bytes: expected a positive size for the low-latency kernels, got {num_rdma_bytes}"
            )
        if num_blocks <= 0:
            raise ValueError(f"num_blocks: expected a positive int, got {num_blocks}")
        self._C = ext
        self.group = group
        self.topology = topology
        self.nvshmem_context = nvshmem_context
        self.rank = nvshmem_context.rank
        self.num_ranks = nvshmem_context.num_ranks
        self.num_rdma_bytes = num_rdma_bytes
        self.num_blocks = num_blocks
        self.mask_on_timeout = mask_on_timeout
        # Ranks of other (emulated) nodes through puts and signals only: see Launch::emulated_node_size.
        self.emulated_node_size = topology.num_ranks_per_node if config.emulate_network() else 0
        self.device = kernel_device()
        # Zero-filled on every PE before malloc returns: all signals start at "not arrived".
        self.buffer_ptr = nvshmem_context.malloc(num_rdma_bytes)
        # The clean's barrier words (csrc/low_latency/barrier.cu), apart from the buffer a clean zeroes.
        self.sync_words_ptr = nvshmem_context.malloc(sync_words_bytes(self.num_ranks))
        self._num_cleans = 0
        self._check_peers_reachable(nvshmem_context)
        self.error_record = ext.ErrorRecord()
        self.rank_mask = torch.zeros(self.num_ranks, dtype=torch.int32, device=self.device)
        self._workspaces: dict[int, torch.Tensor] = {}
        self._owner = next(_owner_tokens)
        self.buffer_idx = 0
        self._capture_id = 0  # the CUDA-graph capture the last call was part of (0: none)
        # Ranks un-masked on the host (update_mask(r, False), clean_mask) whose device word stays 1 until the next
        # clean_low_latency_buffer: the host refuses eager calls in between (Buffer._check_not_unmasked), but
        # replays of a CUDA graph do not ask the host, and would wait for the rank again and read as theirs a
        # signal it left while masked.
        self._pending_unmask: set[int] = set()
        # 1 + the half of the last call the device ran (any E): the kernels record two calls in a row on one half,
        # which replays of a CUDA graph can make (csrc/low_latency/device_common.cuh check_halves_alternate).
        self._last_half = torch.zeros(1, dtype=torch.int32, device=self.device)

    # ------------------------------------------------------------------------------------------------ helpers

    def _check_peers_reachable(self, nvshmem_context: Any) -> None:
        """Collective. With no remote transport (NVSHMEM_REMOTE_TRANSPORT=none: the library sets it where every
        rank is on this host), the kernels reach a peer only where nvshmem_ptr maps it; one that is not mapped
        would take the put path with nothing behind it and time out on every call. Every rank raises, naming the
        pairs. The emulator maps no peer under DEEP_EP_PY_EMULATE_P2P_PES, and carries the puts itself."""
        if emulated() or os.environ.get("NVSHMEM_REMOTE_TRANSPORT", "").strip().lower() != "none":
            return
        unmapped = [pe for pe in range(self.num_ranks) if nvshmem_context.peer_ptr(self.buffer_ptr, pe) == 0]
        everyone: list[Any] = [None] * self.num_ranks
        dist.all_gather_object(everyone, unmapped, group=self.group)
        pairs = [(rank, pe) for rank, pes in enumerate(everyone) for pe in pes]
        if pairs:
            raise DeepEPError(
                f"low-latency Buffer: NVSHMEM_REMOTE_TRANSPORT=none, but nvshmem_ptr maps no peer memory for "
                f"(rank, peer) {pairs}: those peers are unreachable without a remote transport (the GPUs need P2P "
                "access, or several ranks on one GPU need MPS); set NVSHMEM_REMOTE_TRANSPORT for a NIC"
            )

    def owns(self, handle: LowLatencyHandle) -> bool:
        """Whether handle came from this object's dispatch (else the caller runs the reference)."""
        state = handle.backend_state
        return isinstance(state, KernelHandleState) and state.owner == self._owner

    def check_device_errors(self, what: str = "low-latency call") -> None:
        """Raise what a kernel recorded since the last check (DeepEPTimeoutError for a wait that timed out), then
        clear the record but its timed_out word, until update_mask or clean_low_latency_buffer: kernels still
        queued give up at once, and a later call raises again as soon as one of its waits has to wait (a wait
        whose signal is already there returns it without a look at timed_out: the LL receives read no host-mapped
        word before their polls, to keep that PCIe read off the decode path)."""
        self.error_record.check_and_reset(what)

    def _next_buffer_idx(self, what: str) -> int:
        """The half this call takes. A CUDA graph replays the halves of its capture, and clean_low_latency_buffer
        restarts every rank on half 0, so a capture must begin there: one begun on half 1 would, after an eager
        pair or a clean, put two calls in a row on one half at its next replay."""
        capture_id = self._current_capture_id()
        if capture_id != 0 and capture_id != self._capture_id and self.buffer_idx != 0:
            raise DeepEPError(
                f"{what}: expected a CUDA-graph capture to begin on low-latency buffer half 0, got half "
                f"{self.buffer_idx} (an odd number of low-latency calls since the Buffer was built or last "
                "cleaned). A replay reuses the halves chosen at its capture: make the calls before a capture come in "
                "dispatch/combine pairs, or call clean_low_latency_buffer(M, H, E) just before it"
            )
        self._capture_id = capture_id
        idx = self.buffer_idx
        self.buffer_idx ^= 1
        return idx

    def _current_capture_id(self) -> int:
        """The id of the CUDA-graph capture the current stream takes part in, 0 where none."""
        if not is_current_stream_capturing():
            return 0
        return self._C.stream_capture_id(current_stream(self.device).cuda_stream)

    def _workspace(self, what: str, num_experts: int) -> torch.Tensor:
        """int32 [2 * (E + 3)] counters, one set per buffer half, zero between kernels (each kernel's last block
        zeroes what it used). Made at the first call with this E, which must not be captured: a CUDA graph records
        the zero-fill without running it, and the eager calls before its first replay would count from garbage."""
        if num_experts not in self._workspaces:
            if is_current_stream_capturing():
                raise DeepEPError(
                    f"{what}: the first low-latency call with num_experts={num_experts} on this Buffer is being "
                    "captured in a CUDA graph, and its counters must be zeroed before any kernel uses them: make "
                    f"a low-latency dispatch and combine, or clean_low_latency_buffer(M, H, {num_experts}), before "
                    "the capture"
                )
            num_ints = self._C.low_latency_workspace_ints(num_experts)
            self._workspaces[num_experts] = torch.zeros(num_ints, dtype=torch.int32, device=self.device)
        return self._workspaces[num_experts]

    def _check_shapes(self, max_tokens: int, hidden: int, num_experts: int, num_topk: int) -> None:
        needed = self._C.low_latency_buffer_bytes(max_tokens, hidden, self.num_ranks, num_experts)
        if needed > self.num_rdma_bytes:
            raise ValueError(
                f"num_rdma_bytes: expected at least {needed} for M={max_tokens}, H={hidden}, R={self.num_ranks}, "
                f"E={num_experts}, got {self.num_rdma_bytes}"
            )
        max_topk = max(num_experts, MIN_COMBINE_SLOTS_PER_TOKEN)
        if num_topk > max_topk:
            raise ValueError(f"topk_idx: expected at most max(num_experts, 16) = {max_topk} columns, got {num_topk}")

    def _launch_args(self) -> dict[str, Any]:
        return {
            "num_blocks": self.num_blocks,
            "stream": current_stream(self.device).cuda_stream,
            "error_record_ptr": self.error_record.device_ptr,
            "timeout_s": config.timeout_s(),
            "trap_on_error": config.trap_on_device_error(is_current_stream_capturing()),
            "mask_on_timeout": self.mask_on_timeout,
            "emulated_node_size": self.emulated_node_size,
        }

    def _receive_launch_args(self, send_launch: dict[str, Any], return_recv_hook: bool) -> dict[str, Any]:
        """The launch arguments of a receive: its send's when it follows at once (same stream, same capture); taken
        anew when a hook launches it later, whose capture state (and so trap setting) is that of its own moment."""
        return self._launch_args() if return_recv_hook else send_launch

    def _with_hook(self, receive: Callable[[], None], return_recv_hook: bool, what: str) -> Callable[[], None]:
        """Without a hook the receive launches now; with one, hook() launches it (once) on the stream of the call,
        which its send and outputs were ordered on, whichever stream is current when hook() runs."""
        if not return_recv_hook:
            receive()
            return _noop
        receive = on_stream_of_now(receive, self.device)
        done: list[bool] = []

        def hook() -> None:
            if done:
                return
            if self.buffer_ptr == 0:
                raise DeepEPError(f"{what} hook: the Buffer was destroyed before hook() ran; its receive cannot run")
            self.check_device_errors(f"{what} hook")
            receive()
            done.append(True)

        return hook

    # ---------------------------------------------------------------------------------------------- dispatch

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
        """-> (recv_x, recv_x_scales or None, recv_count int32 [L], handle, hook), as ReferenceBackend.

        recv_x: fp8 e4m3 or bf16 [L, R*M, H]; recv_x_scales: float32 [L, R*M, H/128] (int32 [L, R*M, H/512]
        with ue8m0), column-major in the last two dims. Rows of expert l are grouped by source rank in increasing
        order (handle.layout_range), in arrival order inside a source. dispatch_wait_recv_cost_stats gets the
        nanoseconds (GPU global timer) each source's count took to arrive, summed over the local experts.
        """
        self.check_device_errors("low_latency_dispatch")
        num_tokens, hidden = x.shape
        num_topk = topk_idx.shape[1]
        max_tokens, num_ranks = num_max_dispatch_tokens_per_rank, self.num_ranks
        experts_per_rank = num_experts // num_ranks
        self._check_shapes(max_tokens, hidden, num_experts, num_topk)
        workspace = self._workspace("low_latency_dispatch", num_experts)
        x = _aligned16(x)
        # Buffer checks dtype and shape but not the device: a host pointer would fault the kernel.
        topk_idx = topk_idx.to(x.device).contiguous()
        if not use_fp8:
            fmt = DispatchFormat.BF16
        elif use_ue8m0:
            fmt = DispatchFormat.FP8_UE8M0
        elif round_scale:
            fmt = DispatchFormat.FP8_ROUND_SCALE
        else:
            fmt = DispatchFormat.FP8

        device = self.device
        num_slots = num_ranks * max_tokens
        with allocating_outputs():
            recv_x = torch.empty(
                experts_per_rank,
                num_slots,
                hidden,
                dtype=torch.float8_e4m3fn if use_fp8 else torch.bfloat16,
                device=device,
            )
            recv_x_scales = None
            if use_fp8:
                num_cols = hidden // (4 * config.FP8_GROUP_SIZE) if use_ue8m0 else hidden // config.FP8_GROUP_SIZE
                scale_dtype = torch.int32 if use_ue8m0 else torch.float32
                # column-major in the last two dims: [L, cols, R*M] storage seen as [L, R*M, cols]
                recv_x_scales = torch.empty(experts_per_rank, num_cols, num_slots, dtype=scale_dtype, device=device)
                recv_x_scales = recv_x_scales.transpose(1, 2)
            recv_count = torch.empty(experts_per_rank, dtype=torch.int32, device=device)
        # Handle state, read by the combine on the communication stream: allocated on the current one. Not filled
        # (a fill is a launch on the decode path): the receive writes every row of each (expert, source) range of
        # layout_range, and the combine reads those rows only, bounds-checked.
        src_info = torch.empty((experts_per_rank, num_slots), dtype=torch.int32, device=device)
        src_topk_slot = torch.empty((experts_per_rank, num_slots), dtype=torch.int32, device=device)
        layout_range = torch.empty(experts_per_rank, num_ranks, dtype=torch.int64, device=device)
        recv_stats, finish_recv_stats = _accumulator(cumulative_local_expert_recv_stats, device)
        wait_stats, finish_wait_stats = _accumulator(dispatch_wait_recv_cost_stats, device)
        # Last, after everything that can raise: a call that raised on the host took no half (ranks stay in step).
        half_idx = self._next_buffer_idx("low_latency_dispatch")

        args = {
            "num_max_dispatch_tokens_per_rank": max_tokens,
            "hidden": hidden,
            "num_ranks": num_ranks,
            "num_experts": num_experts,
            "rank": self.rank,
            "x_ptr": _ptr(x),
            "topk_idx_ptr": _ptr(topk_idx),
            "num_tokens": num_tokens,
            "num_topk": num_topk,
            "rank_mask_ptr": self.rank_mask.data_ptr(),
            "format": int(fmt),
            "buffer_ptr": self.buffer_ptr,
            "half_idx": half_idx,
            "workspace_ptr": workspace.data_ptr(),
            "last_half_ptr": self._last_half.data_ptr(),
            "recv_x_ptr": recv_x.data_ptr(),
            "recv_scales_ptr": recv_x_scales.data_ptr() if recv_x_scales is not None else 0,
            "src_info_ptr": src_info.data_ptr(),
            "src_topk_slot_ptr": src_topk_slot.data_ptr(),
            "layout_range_ptr": layout_range.data_ptr(),
            "recv_count_ptr": recv_count.data_ptr(),
            "cumulative_recv_stats_ptr": _ptr(recv_stats),
            "wait_recv_cost_stats_ptr": _ptr(wait_stats),
        }
        launch = self._launch_args()
        self._C.low_latency_dispatch_send(**args, **launch)
        handle = LowLatencyHandle(
            src_info=src_info,
            layout_range=layout_range,
            num_max_dispatch_tokens_per_rank=max_tokens,
            hidden=hidden,
            num_experts=num_experts,
            src_topk_slot=src_topk_slot,
            recv_count=recv_count,
            num_tokens=num_tokens,
            backend_state=KernelHandleState(owner=self._owner, num_topk=num_topk),
        )
        # The closure keeps every tensor the receive reads or writes alive until it is launched: a caller may drop the
        # results and keep only the hook (DeepEP's hook holds them too); their memory must not go to other tensors
        # before the receive kernel has written it.
        tensors = (x, topk_idx, recv_x, recv_x_scales, src_info, src_topk_slot, layout_range, recv_count)
        tensors += (recv_stats, wait_stats)

        def receive() -> None:
            assert tensors
            self._C.low_latency_dispatch_recv(**args, **self._receive_launch_args(launch, return_recv_hook))
            finish_recv_stats()
            finish_wait_stats()

        hook = self._with_hook(receive, return_recv_hook, "low_latency_dispatch")
        return recv_x, recv_x_scales, recv_count, handle, hook

    # ----------------------------------------------------------------------------------------------- combine

    def combine_buffer(self, handle: LowLatencyHandle, half_idx: int) -> torch.Tensor:
        """bf16 [L, R*M, H] over the send area of one half: where a zero-copy combine on that half reads x."""
        max_tokens, hidden, num_experts = handle.num_max_dispatch_tokens_per_rank, handle.hidden, handle.num_experts
        experts_per_rank = num_experts // self.num_ranks
        num_slots = self.num_ranks * max_tokens
        offset = self._C.low_latency_send_offset(max_tokens, hidden, self.num_ranks, num_experts, half_idx)
        num_bytes = experts_per_rank * num_slots * hidden * 2
        view = device_bytes_view(self.buffer_ptr + offset, num_bytes)
        return view.view(torch.bfloat16).view(experts_per_rank, num_slots, hidden)

    def next_combine_buffer(self, handle: LowLatencyHandle, device: torch.device) -> torch.Tensor:
        """The buffer the next low_latency_combine(zero_copy=True) reads (the half the next call uses)."""
        return self.combine_buffer(handle, self.buffer_idx)

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
        """-> (combined_x bf16 [T, H], hook), as ReferenceBackend. combine_wait_recv_cost_stats gets the
        nanoseconds each expert rank's rows took to arrive (summed over its experts)."""
        self.check_device_errors("low_latency_combine")
        if not self.owns(handle):
            raise ValueError("handle: expected a handle made by these kernels' low_latency_dispatch")
        max_tokens, hidden, num_experts = handle.num_max_dispatch_tokens_per_rank, handle.hidden, handle.num_experts
        num_tokens, num_topk = topk_idx.shape
        self._check_shapes(max_tokens, hidden, num_experts, num_topk)
        if out is not None and out.device != self.device:
            raise ValueError(f"out: expected a tensor on {self.device}, got one on {out.device}")
        if out is not None and out.numel() > 0 and out.data_ptr() % 16 != 0:
            raise ValueError(f"out: expected a 16-byte aligned tensor, got data_ptr {out.data_ptr():#x}")
        workspace = self._workspace("low_latency_combine", num_experts)
        # After everything that can raise: a call that raised on the host took no half (ranks stay in step).
        half_idx = self._next_buffer_idx("low_latency_combine")
        source = self.combine_buffer(handle, half_idx) if zero_copy else _aligned16(x)
        topk_idx = topk_idx.to(self.device).contiguous()
        topk_weights = topk_weights.to(self.device).contiguous()
        if out is not None:
            combined = out
        else:
            with allocating_outputs():
                combined = torch.empty(num_tokens, hidden, dtype=torch.bfloat16, device=self.device)
        wait_stats, finish_wait_stats = _accumulator(combine_wait_recv_cost_stats, self.device)
        args = {
            "num_max_dispatch_tokens_per_rank": max_tokens,
            "hidden": hidden,
            "num_ranks": self.num_ranks,
            "num_experts": num_experts,
            "rank": self.rank,
            "x_ptr": _ptr(source),
            "src_info_ptr": handle.src_info.data_ptr(),
            "src_topk_slot_ptr": handle.src_topk_slot.data_ptr(),
            "layout_range_ptr": handle.layout_range.data_ptr(),
            "topk_idx_ptr": _ptr(topk_idx),
            "topk_weights_ptr": _ptr(topk_weights),
            "num_tokens": num_tokens,
            "num_topk": num_topk,
            "rank_mask_ptr": self.rank_mask.data_ptr(),
            "buffer_ptr": self.buffer_ptr,
            "half_idx": half_idx,
            "workspace_ptr": workspace.data_ptr(),
            "last_half_ptr": self._last_half.data_ptr(),
            "out_ptr": _ptr(combined),
            "wait_recv_cost_stats_ptr": _ptr(wait_stats),
        }
        launch = self._launch_args()
        self._C.low_latency_combine_send(**args, **launch)
        # As in dispatch: everything the receive touches lives until it is launched, results included.
        tensors = (source, topk_idx, topk_weights, handle, combined, wait_stats)

        def receive() -> None:
            assert tensors
            self._C.low_latency_combine_recv(**args, **self._receive_launch_args(launch, return_recv_hook))
            finish_wait_stats()

        return combined, self._with_hook(receive, return_recv_hook, "low_latency_combine")

    # ------------------------------------------------------------------------------------- buffer and mask

    def clean_low_latency_buffer(self, num_experts: int) -> None:
        """Collective: zero the whole symmetric buffer (signals of both halves included) and the counters (made
        here for num_experts, so that a CUDA graph may capture the first call with it), with a barrier before (no
        peer still writes here) and after (no peer sends before everyone is clean)."""
        self._workspace("clean_low_latency_buffer", num_experts)
        synchronize(self.device)
        # The barriers' epochs come from the number of cleans, not of barriers: a clean that raised at its first
        # barrier on some ranks (a late peer) leaves them in step with the others all the same.
        self._num_cleans += 1
        # The un-masked ranks count again from this clean's barriers on, so that no rank's leftovers outlive it;
        # masked again if the clean fails (the host goes on refusing eager calls, and replays must skip them).
        unmasked = sorted(self._pending_unmask)
        for rank in unmasked:
            self.rank_mask[rank] = 0
        try:
            self._barrier(2 * self._num_cleans - 1)
            device_bytes_view(self.buffer_ptr, self.num_rdma_bytes).zero_()
            for workspace in self._workspaces.values():
                workspace.zero_()
            self._last_half.zero_()
            synchronize(self.device)
            self.error_record.reset()
            # Every rank restarts on half 0: a rank that skipped calls (masked, timed out) is back in step with the
            # others, whose next call would otherwise wait on the other half's signals.
            self.buffer_idx = 0
            self._barrier(2 * self._num_cleans)
        except BaseException:
            for rank in unmasked:
                self.rank_mask[rank] = 1
            raise
        self._pending_unmask.clear()

    def _barrier(self, epoch: int) -> None:
        """Collective: the device barrier over the unmasked ranks (csrc/low_latency/barrier.cu), then a device
        synchronize. A rank that does not arrive within the timeout is masked under mask_on_timeout (a host barrier
        would wait for a dead rank until the group's own timeout, then fail everyone); otherwise this raises
        DeepEPTimeoutError naming it."""
        # A wait that drains on an earlier timeout would leave this barrier at once; the clean discards the record
        # anyway.
        self.error_record.reset()
        self._C.low_latency_masked_barrier(
            sync_words_ptr=self.sync_words_ptr,
            epoch=epoch,
            rank_mask_ptr=self.rank_mask.data_ptr(),
            rank=self.rank,
            num_ranks=self.num_ranks,
            stream=current_stream(self.device).cuda_stream,
            error_record_ptr=self.error_record.device_ptr,
            timeout_s=config.timeout_s(),
            mask_on_timeout=self.mask_on_timeout,
            emulated_node_size=self.emulated_node_size,
        )
        synchronize(self.device)
        self.check_device_errors("clean_low_latency_buffer barrier")

    def update_mask(self, rank: int, mask: bool) -> None:
        """Mask (or unmask) a rank, which recovers from its timeouts: the kernels already queued have drained (the
        record's timed_out word stops them at once), and what they recorded is cleared with it, so the calls after
        this one wait again, for the ranks left. Un-masking a rank that was late needs clean_low_latency_buffer on
        every rank first: what it sent after its peers gave up on it may still sit in their buffers."""
        synchronize(self.device)
        self.error_record.reset()
        if mask:
            self._pending_unmask.discard(rank)
            self.rank_mask[rank] = 1
        elif int(self.rank_mask[rank]) != 0:
            self._pending_unmask.add(rank)  # the device word waits for the next clean (see __init__)

    def query_mask(self, mask_status: torch.Tensor) -> None:
        """The mask as the host set it: a rank un-masked since the last clean reads 0, though the kernels skip
        it until that clean."""
        # Every stream's kernels first: a hook's receive on another stream may still mask a rank (under capture
        # the copy is ordered on the capturing stream only).
        if not is_current_stream_capturing():
            synchronize(self.device)
        mask_status.copy_(self.rank_mask.to(mask_status.device))
        for rank in self._pending_unmask:
            mask_status[rank] = 0

    def clean_mask(self) -> None:
        synchronize(self.device)  # a receive still running may mask a rank
        self._pending_unmask.update(int(r) for r in torch.nonzero(self.rank_mask.cpu()).flatten())

    def destroy(self) -> None:
        """Collective: free the symmetric buffer (the NvshmemContext stays open)."""
        if self.buffer_ptr == 0:
            return
        synchronize(self.device)
        ptr, self.buffer_ptr = self.buffer_ptr, 0
        self.nvshmem_context.free(ptr)
        sync_ptr, self.sync_words_ptr = self.sync_words_ptr, 0
        self.nvshmem_context.free(sync_ptr)
        self._workspaces.clear()
