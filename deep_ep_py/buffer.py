"""deep_ep_py.Buffer: DeepEP V1's deep_ep.Buffer, argument for argument.

Buffer checks every argument (raising ValueError/TypeError that name the argument, the expected and the actual
value) before any work, allocates nothing it does not need, runs the work on the communication stream with
DeepEP's event semantics, and hands the rest to a backend: "cuda" (the kernels of deep_ep_py._C) or
"reference" (torch.distributed, any device, any process-group backend).

Shapes: T tokens on this rank, H hidden, K top-k, R ranks in the group, E experts, L = E / R local experts,
M = num_max_dispatch_tokens_per_rank, N tokens received by this rank. Expert e lives on rank e // L.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable, Union

import torch
import torch.distributed as dist

from . import _validate as check
from . import buffer_checks as checks
from . import config as ep_config
from . import device as ep_device
from .backends import BufferSizes, select_backend
from .backends.reference import DispatchHandle, LowLatencyHandle
from .config import (
    Config,
    default_combine_config,
    default_dispatch_config,
    low_latency_rdma_size_hint,
    recv_arena_size_hint,
)
from .errors import DeepEPError
from .events import CpuStream, EventHandle, EventOverlap
from .topology import detect_topology

DispatchInput = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]
Hook = Callable[[], None]


class Buffer:
    """Communication buffers and the dispatch/combine calls of one expert-parallel group.

    Args (DeepEP V1's, in its order):
        group: a torch.distributed process group of any backend (gloo included).
        num_nvl_bytes: bytes of intranode (NVLink) buffer per rank for the normal kernels.
        num_rdma_bytes: bytes of NVSHMEM buffer per rank (internode normal kernels, low-latency kernels).
        low_latency_mode: enable the low-latency calls.
        num_qps_per_rank, allow_nvlink_for_low_latency_mode, allow_mnnvl, use_fabric: transport hints, kept
            for compatibility (NVSHMEM picks the transport).
        explicitly_destroy: the caller will call destroy(); otherwise resources go with the object: its CUDA IPC
            buffers once this process's kernels are drained (no collective, so peers may still be running theirs:
            destroy() is the safe way), while its NVSHMEM memory, whose free is a collective, only goes with
            destroy() or the process.
        enable_shrink: enable rank masking (low_latency_update/query/clean_mask_buffer); on the low-latency
            kernels, as DeepEP's shrink mode, a peer a call waits for past DEEP_EP_PY_TIMEOUT_S is then masked
            (the call completes without it, and low_latency_query_mask_buffer shows it) instead of the call
            raising DeepEPTimeoutError, and clean_low_latency_buffer waits only for the unmasked ranks.
        comm: DeepEP's optional mpi4py communicator; deep_ep_py needs only `group`.
    Keyword-only extensions:
        backend: "cuda", "reference" or None (DEEP_EP_PY_BACKEND, else kernels where built and a GPU exists).
        num_ranks_per_node: ranks that form one node (NVLink domain); overrides DEEP_EP_PY_RANKS_PER_NODE and
            the hosts the ranks run on, so one machine can play several nodes.
        num_recv_arena_bytes: bytes per rank (the same on every rank) of IPC-mapped memory that intranode dispatch
            results are allocated from, so that peers write rows straight into them: one copy instead of two.
            Results keep their block until they (and the handle) die; a dispatch whose results do not fit moves
            its rows twice, as without an arena. Overrides DEEP_EP_PY_RECV_ARENA_BYTES; default 0 (no arena).
            A freed block is reused only after the work queued before the free on the current, compute and
            communication streams; torch's Tensor.record_stream does not reach arena memory, so keep a result
            alive while another stream still reads it.
    """

    num_sms: int = 20

    def __init__(
        self,
        group: dist.ProcessGroup | None,
        num_nvl_bytes: int = 0,
        num_rdma_bytes: int = 0,
        low_latency_mode: bool = False,
        num_qps_per_rank: int = 24,
        allow_nvlink_for_low_latency_mode: bool = True,
        allow_mnnvl: bool = False,
        use_fabric: bool = False,
        explicitly_destroy: bool = False,
        enable_shrink: bool = False,
        comm: Any = None,
        *,
        backend: str | None = None,
        num_ranks_per_node: int | None = None,
        num_recv_arena_bytes: int | None = None,
    ) -> None:
        if group is None:
            raise ValueError(
                "group: expected a torch.distributed process group, got None"
                + (" (an mpi4py comm alone is not supported; pass a torch.distributed group)" if comm else "")
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.group_size = dist.get_world_size(group)
        # What this rank rejects goes to every rank through the first collective (detect_topology), so that all
        # raise instead of the others waiting for this one in a later collective.
        local_error = None
        try:
            self.num_nvl_bytes = check.check_int("num_nvl_bytes", num_nvl_bytes, minimum=0)
            self.num_rdma_bytes = check.check_int("num_rdma_bytes", num_rdma_bytes, minimum=0)
            self.low_latency_mode = check.check_bool("low_latency_mode", low_latency_mode)
            self.num_qps_per_rank = check.check_int("num_qps_per_rank", num_qps_per_rank, minimum=1)
            self.allow_nvlink_for_low_latency_mode = check.check_bool(
                "allow_nvlink_for_low_latency_mode", allow_nvlink_for_low_latency_mode
            )
            self.allow_mnnvl = check.check_bool("allow_mnnvl", allow_mnnvl)
            self.use_fabric = check.check_bool("use_fabric", use_fabric)
            self.explicitly_destroy = check.check_bool("explicitly_destroy", explicitly_destroy)
            self.enable_shrink = check.check_bool("enable_shrink", enable_shrink)
            self.num_recv_arena_bytes = ep_config.recv_arena_bytes(num_recv_arena_bytes)
            ep_config.timeout_s()  # read again by every wait; a bad value fails here, on every rank
            ep_config.trap_policy()  # read again by every launch, likewise
        except (TypeError, ValueError) as exc:
            local_error = exc
        self.topology = detect_topology(group, num_ranks_per_node, local_error)
        sizes = BufferSizes(
            self.num_nvl_bytes,
            self.num_rdma_bytes,
            self.low_latency_mode,
            self.enable_shrink,
            self.num_recv_arena_bytes,
        )
        self._backend = select_backend(backend, group, self.topology, sizes)
        self.backend = self._backend.name
        # Made now where the kernels may run: on the device their buffers were allocated on (the current one), and
        # not first inside a CUDA-graph capture.
        self._comm_stream: Any = ep_device.new_stream() if self.backend == "cuda" and ep_device.available() else None
        self._local_buffers: dict[bool, torch.Tensor] = {}
        # num_experts of the low-latency calls since the buffer was made or cleaned (None: none yet). The kernels'
        # signal words sit at offsets that depend on it (as DeepEP's), so calls with another E would poll bytes
        # that earlier calls' rows left there; both backends refuse it alike.
        self._low_latency_num_experts: int | None = None
        # Ranks un-masked since the last clean_low_latency_buffer: what they sent while masked may still sit in this
        # rank's buffer as a later call's signals, so low-latency calls wait for that clean.
        self._low_latency_unmasked: set[int] = set()
        self._destroyed = False

    # ------------------------------------------------------------------------------------------- static API

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        """Set the SMs the normal kernels use (even: a send and a receive SM per channel)."""
        check.check_int("new_num_sms", new_num_sms, minimum=2, even=True)
        Buffer.num_sms = new_num_sms

    @staticmethod
    def capture() -> EventOverlap:
        """An EventOverlap recorded on the current stream."""
        return EventOverlap(EventHandle())

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        """The default normal-mode dispatch Config for a group of num_ranks, with Buffer.num_sms SMs."""
        return default_dispatch_config(num_ranks, Buffer.num_sms)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        """The default normal-mode combine Config for a group of num_ranks, with Buffer.num_sms SMs."""
        return default_combine_config(num_ranks, Buffer.num_sms)

    @staticmethod
    def get_low_latency_rdma_size_hint(
        num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int
    ) -> int:
        """Bytes of num_rdma_bytes the low-latency calls need for these sizes."""
        return low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)

    @staticmethod
    def get_recv_arena_size_hint(
        num_max_tokens_per_rank: int, hidden: int, num_ranks: int, num_topk: int, num_results: int = 2
    ) -> int:
        """Bytes of num_recv_arena_bytes (keyword-only extension) that hold num_results intranode dispatch results
        alive at once, each as large as routing can make it (every token of every rank to one rank)."""
        return recv_arena_size_hint(num_max_tokens_per_rank, hidden, num_ranks, num_topk, num_results)

    @staticmethod
    def is_sm90_compiled() -> bool:
        """Whether the kernels were built for SM90 (Hopper)."""
        from ._ext import load_extension

        ext = load_extension()
        if ext is None:
            return False
        archs = str(ext.build_info().get("cuda_archs", ""))
        return "90" in archs

    # ------------------------------------------------------------------------------------- streams, buffers

    def get_comm_stream(self) -> Any:
        """The stream the communication runs on: a torch.cuda.Stream, or a no-op stand-in without CUDA (and under the
        CPU emulator of the kernels, whose launches are synchronous)."""
        if self._comm_stream is None:
            self._comm_stream = ep_device.new_stream() if ep_device.available() else CpuStream()
        return self._comm_stream

    def get_local_buffer_tensor(
        self,
        dtype: torch.dtype,
        size: torch.Size | Sequence[int] | None = None,
        offset: int = 0,
        use_rdma_buffer: bool = False,
    ) -> torch.Tensor:
        """A view of this rank's NVLink buffer (or RDMA buffer) from byte `offset`, as `dtype`, shaped `size`
        (default: all that fits).

        Where the kernels hold that buffer (intranode kernels: the NVLink buffer; low-latency or internode kernels:
        the RDMA buffer), this is their memory, as in DeepEP: peers read what is written here, the next call
        overwrites it, and it must not be used after destroy(). Elsewhere (the reference backend, the internode
        kernels' NVLink side) it is a zero-filled tensor of that size that this Buffer keeps."""
        self._check_alive()
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype: expected a torch.dtype, got {type(dtype).__name__}")
        total = self.num_rdma_bytes if use_rdma_buffer else self.num_nvl_bytes
        name = "num_rdma_bytes" if use_rdma_buffer else "num_nvl_bytes"
        element_size = torch.empty(0, dtype=dtype).element_size()
        check.check_int("offset", offset, minimum=0)
        if offset % element_size != 0:
            raise ValueError(f"offset: expected a multiple of the {dtype} element size {element_size}, got {offset}")
        available = (total - offset) // element_size if offset <= total else -1
        if available < 0:
            raise ValueError(f"offset: expected at most {name} ({total}), got {offset}")
        numel = available
        if size is not None:
            numel = 1
            for extent in size:
                numel *= check.check_int("size", extent, minimum=0)
            if numel > available:
                raise ValueError(
                    f"size: expected at most {available} elements of {dtype} after offset {offset} in {name} "
                    f"({total} bytes), got {tuple(size)} ({numel} elements)"
                )
        if use_rdma_buffer not in self._local_buffers:
            memory = self._backend.local_buffer_bytes(use_rdma_buffer)
            if memory is None:
                device = ep_device.kernel_device() if ep_device.available() else "cpu"
                memory = torch.zeros(total, dtype=torch.uint8, device=device)
            self._local_buffers[use_rdma_buffer] = memory
        raw = self._local_buffers[use_rdma_buffer][offset : offset + numel * element_size]
        view = raw.view(dtype)
        return view.view(tuple(size)) if size is not None else view

    def destroy(self) -> None:
        """Release the buffers now (collective); the object is unusable afterwards. NVSHMEM, where this Buffer
        started it, stays up for the process's next Buffer over the same ranks: NVSHMEM cannot start twice in one
        process (deep_ep_py.runtime.finalize_nvshmem() ends it; the process's exit releases it)."""
        if self._destroyed:
            return
        self._backend.barrier()
        self._backend.destroy()
        self._local_buffers.clear()
        self._backend = None  # type: ignore[assignment]
        self._destroyed = True

    def _check_alive(self) -> None:
        if self._destroyed:
            raise RuntimeError("Buffer: this buffer was destroyed; create a new one")

    def _run(
        self,
        on_kernel_device: bool,
        work: Callable[[], Any],
        previous_event: EventOverlap | None,
        async_finish: bool,
        allocate_on_comm_stream: bool,
        inputs: Sequence[torch.Tensor | None] = (),
        on_comm_stream: bool = True,
    ) -> tuple[Any, EventOverlap]:
        """Run `work` with DeepEP's stream semantics: on the communication stream after previous_event (else
        after the current stream); the current stream waits for it unless async_finish, in which case the
        returned EventOverlap carries the event. on_comm_stream=False (low-latency calls with a hook, no
        async_finish): on the current stream, as DeepEP's hook mode."""
        if previous_event is not None and not isinstance(previous_event, EventOverlap):
            raise TypeError(f"previous_event: expected EventOverlap or None, got {type(previous_event).__name__}")
        check.check_bool("async_finish", async_finish)
        check.check_bool("allocate_on_comm_stream", allocate_on_comm_stream)
        if allocate_on_comm_stream and not async_finish:
            raise ValueError("allocate_on_comm_stream: expected async_finish=True with it, got async_finish=False")
        if not on_kernel_device or not on_comm_stream:
            result = work()
            return result, EventOverlap(EventHandle() if async_finish else None)
        compute = ep_device.current_stream()
        comm = self.get_comm_stream()
        after_previous_event = previous_event is not None and previous_event.event is not None
        if after_previous_event:
            previous_event.event.stream_wait(comm)
        else:
            comm.wait_stream(compute)
        # The results come from the caller's stream's pool, as DeepEP's do without allocate_on_comm_stream, only
        # where the communication stream waits for all of the caller's work: after previous_event alone, memory
        # the caller's stream freed may still be read there by kernels queued after that event, and the allocator
        # would hand it out at once. Handle state and scratch always live on the communication stream.
        results_on_caller_stream = not allocate_on_comm_stream and not after_previous_event
        with ep_device.stream(comm), ep_device.outputs_allocated_on(compute if results_on_caller_stream else None):
            try:
                result = work()
            except BaseException:
                # The comm stream joined the caller's (a capture, if one runs, took it in): join it back, so that
                # a capture ends cleanly and the caller sees this error, not CUDA's "unjoined" one from capture_end.
                compute.wait_stream(comm)
                raise
            done = EventHandle.recorded_on(comm)
        # What came from the communication stream's pool will be used on the caller's.
        results = _tensors_in(result)
        for tensor in results:
            self._backend.record_stream(tensor, compute)
        if async_finish:
            # The caller may free inputs, and results from its own pool, before the communication stream is done.
            for tensor in (*inputs, *results) if results_on_caller_stream else inputs:
                if tensor is not None and ep_device.is_kernel_tensor(tensor):
                    self._backend.record_stream(tensor, comm)
            return result, EventOverlap(done, extra_tensors=[t for t in inputs if t is not None])
        done.current_stream_wait()
        return result, EventOverlap(None)

    # ---------------------------------------------------------------------------------------- normal mode

    def get_dispatch_layout(
        self,
        topk_idx: torch.Tensor,
        num_experts: int,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, EventOverlap]:
        """Count what each rank and expert will receive from this rank.

        Args:
            topk_idx: int64 [T, K] global expert ids, -1 for none.
            num_experts: E, a multiple of the group size.
        Returns:
            num_tokens_per_rank int32 [R] (a token counts once per rank), num_tokens_per_rdma_rank int32
            [R / ranks_per_node] or None within one node, num_tokens_per_expert int32 [E], is_token_in_rank
            bool [T, R], and the EventOverlap.
        """
        self._check_alive()
        check.check_tensor("topk_idx", topk_idx, dtype=torch.int64, shape=(None, None), contiguous=True)
        checks.num_experts(self, num_experts)
        if self._backend.checks_expert_ids_on_device("get_dispatch_layout", topk_idx):
            # The layout kernel skips an id out of range and records it, and the next layout raises: the dispatch
            # after this one need not read the ids either (a device sync per layer otherwise).
            check.note_expert_ids_checked(topk_idx, num_experts)
        else:
            check.check_expert_ids("topk_idx", topk_idx, num_experts)
        return self._with_event(
            self._run(
                ep_device.is_kernel_tensor(topk_idx),
                lambda: self._backend.get_dispatch_layout(topk_idx, num_experts),
                previous_event,
                async_finish,
                allocate_on_comm_stream,
                inputs=(topk_idx,),
            )
        )

    def dispatch(
        self,
        x: DispatchInput,
        handle: DispatchHandle | None = None,
        num_tokens_per_rank: torch.Tensor | None = None,
        num_tokens_per_rdma_rank: torch.Tensor | None = None,
        is_token_in_rank: torch.Tensor | None = None,
        num_tokens_per_expert: torch.Tensor | None = None,
        topk_idx: torch.Tensor | None = None,
        topk_weights: torch.Tensor | None = None,
        expert_alignment: int = 1,
        num_worst_tokens: int = 0,
        config: Config | None = None,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> tuple[
        DispatchInput,
        torch.Tensor | None,
        torch.Tensor | None,
        list[int] | None,
        DispatchHandle | None,
        EventOverlap,
    ]:
        """Send each token to every rank that holds one of its experts.

        Args:
            x: bf16 [T, H] (H a multiple of 8), or (float8_e4m3fn [T, H], float32 scales [T, H / 128]) with H a
                multiple of 128; the scales may have any strides (column-major included).
            handle: from an earlier dispatch (cached mode): same layout, new data; then topk_idx and
                topk_weights must be None and the layout arguments are ignored.
            num_tokens_per_rank int32 [R], num_tokens_per_rdma_rank int32 [nodes] (needed across nodes),
            is_token_in_rank bool [T, R], num_tokens_per_expert int32 [E]: from get_dispatch_layout.
            topk_idx int64 [T, K] and topk_weights float32 [T, K]: both or neither.
            expert_alignment: each per-expert count is rounded up to a multiple of it.
            num_worst_tokens: > 0 pads the received tensors to exactly that many rows with no host sync. Every
                rank passes the same value, and no rank receives more rows: otherwise every rank raises DeepEPError
                at its next call, naming the rank at fault (the device finds it after this call has returned).
        Returns:
            recv_x (same form as x) [N, H], recv_topk_idx int64 [N, K] (local expert ids, -1 elsewhere),
            recv_topk_weights float32 [N, K] (0 where not local), num_recv_tokens_per_expert_list (L ints,
            aligned; empty with num_worst_tokens), handle, EventOverlap. Rows are ordered by (source rank,
            source token index). In cached mode: (recv_x, None, None, None, None, event).
        """
        self._check_alive()
        values, scales = checks.dispatch_x(x)
        num_tokens, hidden = values.shape
        check.check_int("expert_alignment", expert_alignment, minimum=1)
        check.check_int("num_worst_tokens", num_worst_tokens, minimum=0)
        if handle is not None:
            checks.cached_dispatch(handle, num_tokens, topk_idx, topk_weights)
        else:
            checks.layout_dispatch(
                self,
                num_tokens,
                num_tokens_per_rank,
                num_tokens_per_rdma_rank,
                is_token_in_rank,
                num_tokens_per_expert,
                topk_idx,
                topk_weights,
            )
        hidden_bytes = hidden * max(values.element_size(), 2)
        config = checks.config_fits(self, config, self.get_dispatch_config(self.group_size), hidden_bytes)
        result, event = self._run(
            ep_device.is_kernel_tensor(values),
            lambda: self._backend.dispatch(
                values,
                scales,
                handle,
                is_token_in_rank,
                num_tokens_per_rank,
                num_tokens_per_expert,
                topk_idx,
                topk_weights,
                expert_alignment,
                num_worst_tokens,
                config=config,
            ),
            previous_event,
            async_finish,
            allocate_on_comm_stream,
            # A cached dispatch reads the handle's tensors too, and is_token_in_rank in it came from the caller's pool.
            inputs=(values, scales, is_token_in_rank, topk_idx, topk_weights, *_tensors_in(handle)),
        )
        recv_x, recv_scales, recv_topk_idx, recv_topk_weights, per_expert, new_handle = result
        recv = (recv_x, recv_scales) if scales is not None else recv_x
        if handle is not None:
            return recv, None, None, None, None, event
        return recv, recv_topk_idx, recv_topk_weights, per_expert, new_handle, event

    def combine(
        self,
        x: torch.Tensor,
        handle: DispatchHandle,
        topk_weights: torch.Tensor | None = None,
        bias: torch.Tensor | tuple[torch.Tensor, ...] | list[torch.Tensor] | None = None,
        config: Config | None = None,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, EventOverlap]:
        """Send each received row back to its source and sum there (float32, then bf16).

        Args:
            x: bf16 [N, H], the rows in the order dispatch returned them (N = received count, or the
                num_worst_tokens the dispatch padded to).
            handle: the handle of that dispatch.
            topk_weights: float32 [N, K] or None; summed the same way.
            bias: None, one or two bf16 [T, H] tensors added to the sum.
        Returns:
            combined_x bf16 [T, H], combined_topk_weights float32 [T, K] or None, EventOverlap.
        """
        self._check_alive()
        rows, biases = checks.combine(handle, x, topk_weights, bias)
        config = checks.config_fits(self, config, self.get_combine_config(self.group_size), x.shape[1] * 2)
        (combined_x, combined_weights), event = self._run(
            ep_device.is_kernel_tensor(x),
            lambda: self._backend.combine(
                x[:rows], handle, topk_weights[:rows] if topk_weights is not None else None, biases, config=config
            ),
            previous_event,
            async_finish,
            allocate_on_comm_stream,
            inputs=(x, topk_weights, *biases, *_tensors_in(handle)),
        )
        return combined_x, combined_weights, event

    # What dispatch/combine route to when the group spans several nodes (they route there themselves);
    # the same methods, so the same arguments and results.
    internode_dispatch = dispatch
    internode_combine = combine

    # ------------------------------------------------------------------------------------------ low latency

    def low_latency_dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        num_max_dispatch_tokens_per_rank: int,
        num_experts: int,
        cumulative_local_expert_recv_stats: torch.Tensor | None = None,
        dispatch_wait_recv_cost_stats: torch.Tensor | None = None,
        use_fp8: bool = True,
        round_scale: bool = False,
        use_ue8m0: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
    ) -> tuple[DispatchInput, torch.Tensor, LowLatencyHandle, EventOverlap, Hook]:
        """Send each (token, expert) pair straight to the expert's rank, into a packed per-expert layout.

        Args:
            x: bf16 [T, H], T <= M; every rank passes the same M (num_max_dispatch_tokens_per_rank).
            topk_idx: int64 [T, K] global expert ids, -1 for none.
            cumulative_local_expert_recv_stats: int32 [L] or None; this call's recv_count is added to it.
            dispatch_wait_recv_cost_stats: int64 [R] or None; time spent waiting for each source is added.
            use_fp8 / round_scale / use_ue8m0: the FP8 format (H a multiple of 128; 512 with ue8m0, which
                needs round_scale).
            return_recv_hook: send only; hook() completes the receive. Both run on the calling stream (not the
                communication stream), hook() whichever stream is current when it is called; needs
                async_finish=False.
        Returns:
            recv_x: bf16 [L, R*M, H], or (float8_e4m3fn [L, R*M, H], scales float32 [L, R*M, H/128] or with
            ue8m0 int32 [L, R*M, H/512], column-major in the last two dims); recv_count int32 [L] (rows
            [0, recv_count[e]) of expert e are valid); handle; EventOverlap; hook.
        """
        self._check_alive()
        checks.low_latency_dispatch(
            self,
            x,
            topk_idx,
            num_max_dispatch_tokens_per_rank,
            num_experts,
            cumulative_local_expert_recv_stats,
            dispatch_wait_recv_cost_stats,
            use_fp8,
            round_scale,
            use_ue8m0,
        )
        checks.hook_flags(async_finish, return_recv_hook)
        self._check_not_unmasked("low_latency_dispatch", num_max_dispatch_tokens_per_rank, x.shape[1], num_experts)
        self._record_low_latency_experts(num_experts, num_max_dispatch_tokens_per_rank, x.shape[1], "num_experts")
        (recv_x, recv_scales, recv_count, handle, hook), event = self._run(
            ep_device.is_kernel_tensor(x),
            lambda: self._backend.low_latency_dispatch(
                x,
                topk_idx,
                num_max_dispatch_tokens_per_rank,
                num_experts,
                cumulative_local_expert_recv_stats,
                dispatch_wait_recv_cost_stats,
                use_fp8,
                round_scale,
                use_ue8m0,
                return_recv_hook,
            ),
            None,
            async_finish,
            False,
            inputs=(x, topk_idx, cumulative_local_expert_recv_stats, dispatch_wait_recv_cost_stats),
            on_comm_stream=not return_recv_hook,
        )
        recv = (recv_x, recv_scales) if use_fp8 else recv_x
        return recv, recv_count, handle, event, hook

    def low_latency_combine(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        handle: LowLatencyHandle,
        use_logfmt: bool = False,
        zero_copy: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
        out: torch.Tensor | None = None,
        combine_wait_recv_cost_stats: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, EventOverlap, Hook]:
        """Send expert outputs back and reduce: combined_x[t] = sum over k with topk_idx[t, k] >= 0 of
        topk_weights[t, k] * x[row of (t, k)], accumulated in float32.

        Args:
            x: bf16 [L, R*M, H], rows in the layout low_latency_dispatch returned.
            topk_idx: int64 [T, K] and topk_weights float32 [T, K]: as passed to that dispatch.
            handle: that dispatch's handle.
            use_logfmt: accepted for compatibility; this backend sends bf16 (no compression loss).
            zero_copy: x already sits in get_next_low_latency_combine_buffer(handle).
            return_recv_hook: send only; hook() completes the receive and the sum, on the calling stream as in
                low_latency_dispatch.
            out: bf16 [T, H] to write into instead of a new tensor.
            combine_wait_recv_cost_stats: int64 [R] or None; time spent waiting for each source is added.
        Returns:
            combined_x bf16 [T, H], EventOverlap, hook.
        """
        self._check_alive()
        checks.low_latency_combine(self, x, topk_idx, topk_weights, handle, out, combine_wait_recv_cost_stats)
        checks.flags(use_logfmt=use_logfmt, zero_copy=zero_copy)
        checks.hook_flags(async_finish, return_recv_hook)
        self._check_not_unmasked(
            "low_latency_combine", handle.num_max_dispatch_tokens_per_rank, handle.hidden, handle.num_experts
        )
        # A handle from before a clean and a dispatch with another E would poll that E's signal offsets.
        self._record_low_latency_experts(
            handle.num_experts, handle.num_max_dispatch_tokens_per_rank, handle.hidden, "handle.num_experts"
        )
        (combined, hook), event = self._run(
            ep_device.is_kernel_tensor(x),
            lambda: self._backend.low_latency_combine(
                x, topk_idx, topk_weights, handle, zero_copy, return_recv_hook, out, combine_wait_recv_cost_stats
            ),
            None,
            async_finish,
            False,
            # The handle's tensors too: the send reads them on the communication stream, and a hook-mode dispatch
            # made them on the caller's, whose allocator could hand them out again while that send runs.
            inputs=(x, topk_idx, topk_weights, out, combine_wait_recv_cost_stats, *_tensors_in(handle)),
            on_comm_stream=not return_recv_hook,
        )
        return combined, event, hook

    def get_next_low_latency_combine_buffer(self, handle: LowLatencyHandle) -> torch.Tensor:
        """The bf16 [L, R*M, H] buffer the next low_latency_combine reads with zero_copy=True."""
        self._check_alive()
        if not isinstance(handle, LowLatencyHandle):
            raise TypeError(f"handle: expected the handle low_latency_dispatch returned, got {type(handle).__name__}")
        return self._backend.next_combine_buffer(handle, handle.src_info.device)

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Zero the low-latency buffers (before switching from normal to low-latency calls); collective."""
        self._check_alive()
        checks.low_latency_mode(self, "clean_low_latency_buffer")
        check.check_int("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank, minimum=1)
        check.check_int("hidden", hidden, minimum=1)
        checks.num_experts(self, num_experts)
        checks.rdma_bytes_fit(self, num_max_dispatch_tokens_per_rank, hidden, num_experts)
        self._backend.clean_low_latency_buffer(num_experts)
        self._low_latency_num_experts = None  # the whole buffer is zero: any E may come next
        self._low_latency_unmasked.clear()

    def low_latency_update_mask_buffer(
        self, rank_to_mask: int | None = None, mask: bool = False, *, rank: int | None = None
    ) -> None:
        """Mask (mask=True) or unmask a rank: low-latency calls stop sending to and waiting for it. After un-masking
        a masked rank, low-latency calls raise DeepEPError until clean_low_latency_buffer (collective) has run.

        The rank goes first, positionally or as rank_to_mask= (DeepEP V1's name) or rank= (the name in
        api-contract.md), so callers written against either work."""
        if (rank_to_mask is None) == (rank is None):
            raise TypeError(
                "low_latency_update_mask_buffer: expected the rank to mask once, positionally or as rank_to_mask= "
                f"or rank=, got rank_to_mask={rank_to_mask!r} and rank={rank!r}"
            )
        if rank_to_mask is None:
            rank_to_mask = rank
        self._check_shrink("low_latency_update_mask_buffer")
        check.check_int("rank_to_mask", rank_to_mask, minimum=0)
        if rank_to_mask >= self.group_size:
            raise ValueError(f"rank_to_mask: expected a rank in [0, {self.group_size}), got {rank_to_mask}")
        check.check_bool("mask", mask)
        if not mask:
            self._note_unmasked([rank_to_mask])
        self._backend.update_mask(rank_to_mask, mask)

    def low_latency_query_mask_buffer(self, mask_status: torch.Tensor) -> None:
        """Write 1 for each masked rank and 0 for the others into mask_status, int32 [R]."""
        self._check_shrink("low_latency_query_mask_buffer")
        check.check_tensor("mask_status", mask_status, dtype=torch.int32, shape=(self.group_size,))
        self._backend.query_mask(mask_status)

    def low_latency_clean_mask_buffer(self) -> None:
        """Unmask every rank (then, where one was masked, clean_low_latency_buffer before the next call)."""
        self._check_shrink("low_latency_clean_mask_buffer")
        self._note_unmasked(range(self.group_size))
        self._backend.clean_mask()

    # -------------------------------------------------------------------------------------------- checks

    def _note_unmasked(self, ranks: Sequence[int]) -> None:
        """Before un-masking ranks: note those masked now (on the kernels a wait may have masked one, so this reads
        the device mask, a sync; masking calls are rare)."""
        status = torch.zeros(self.group_size, dtype=torch.int32)
        self._backend.query_mask(status)
        self._low_latency_unmasked.update(r for r in ranks if status[r] != 0)

    def _check_not_unmasked(self, call: str, max_tokens: int, hidden: int, num_experts: int) -> None:
        if self._low_latency_unmasked:
            ranks = sorted(self._low_latency_unmasked)
            names = f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"
            raise DeepEPError(
                f"{call}: {names} un-masked since the last clean_low_latency_buffer: what a "
                "masked rank sent may still sit in this rank's buffer and be read as this call's signals; call "
                f"clean_low_latency_buffer({max_tokens}, {hidden}, {num_experts}) on every rank first"
            )

    def _record_low_latency_experts(self, num_experts: int, max_tokens: int, hidden: int, name: str) -> None:
        """Refuse a low-latency call with another E than the calls since the Buffer was made or cleaned, else
        remember its E (before the launch: a call that fails after it may have written at E's offsets)."""
        checks.low_latency_experts_unchanged(self._low_latency_num_experts, num_experts, max_tokens, hidden, name)
        self._low_latency_num_experts = num_experts

    def _check_shrink(self, call: str) -> None:
        self._check_alive()
        checks.shrink(self, call)

    @staticmethod
    def _with_event(result_and_event: tuple[tuple, EventOverlap]) -> tuple:
        result, event = result_and_event
        return (*result, event)


def _tensors_in(result: Any, device_type: str | None = None) -> list[torch.Tensor]:
    """Every tensor on the kernels' device (CUDA) in a (nested) result tuple, for record_stream. device_type: the
    kernels' (ep_device.kernel_device_type()), looked up once per call rather than once per tensor."""
    if device_type is None:
        device_type = ep_device.kernel_device_type()
    if isinstance(result, torch.Tensor):
        return [result] if result.device.type == device_type else []
    if isinstance(result, (tuple, list)):
        return [t for item in result for t in _tensors_in(item, device_type)]
    return []
