"""Which pool of torch's caching allocator a Buffer's results come from (DeepEP's allocate_on_comm_stream), for the
GPU tier's end-to-end Buffer tests."""

from __future__ import annotations

import torch

from deep_ep_py import device as ep_device


def check_results_allocated_on_the_callers_stream(
    buffer, x, topk_idx, weights, num_experts: int, low_latency_tokens: int | None
) -> None:
    """DeepEP's allocate_on_comm_stream: without it, results come from the caller's stream's pool of torch's caching
    allocator (which takes the pool of the stream current at torch.empty); with it, or after previous_event alone
    (the caller's stream may still read memory its allocator would hand out), from the communication stream's.
    Handle state stays on the communication stream, where later calls read it. low_latency_tokens: the
    num_max_dispatch_tokens_per_rank of a low-latency dispatch and combine checked too (None: normal mode only)."""
    from deep_ep_py.backends.cuda import unverified_kernels_enabled

    if not unverified_kernels_enabled():
        return  # the reference fallback's torch ops allocate on the stream they run on
    if getattr(buffer, "num_recv_arena_bytes", 0):
        return  # dispatch results come from the receive arena, not from either pool
    compute, comm = ep_device.current_stream(), buffer.get_comm_stream()
    allocated_on: dict[int, str] = {}
    real_empty = torch.empty

    def recording_empty(*args, **kwargs):
        tensor = real_empty(*args, **kwargs)
        stream = ep_device.current_stream()
        allocated_on[tensor.data_ptr()] = "caller" if stream == compute else "comm" if stream == comm else "other"
        return tensor

    def streams_of(tensors: dict) -> dict:
        # Empty tensors all have data_ptr 0 and hold no memory of either pool.
        return {
            name: allocated_on.get(tensor.data_ptr(), "not by torch.empty")
            for name, tensor in tensors.items()
            if tensor.numel() > 0
        }

    def normal(**kwargs) -> tuple[dict, dict]:
        per_rank, per_rdma, per_expert, in_rank, event = buffer.get_dispatch_layout(topk_idx, num_experts, **kwargs)
        event.current_stream_wait()
        recv_x, recv_idx, recv_w, _, handle, event = buffer.dispatch(
            x,
            num_tokens_per_rank=per_rank,
            num_tokens_per_rdma_rank=per_rdma,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            topk_idx=topk_idx,
            topk_weights=weights,
            **kwargs,
        )
        event.current_stream_wait()
        combined_x, combined_w, event = buffer.combine(recv_x, handle, topk_weights=recv_w, **kwargs)
        event.current_stream_wait()
        results = dict(per_rank=per_rank, per_expert=per_expert, in_rank=in_rank, recv_x=recv_x, recv_idx=recv_idx)
        results.update(recv_w=recv_w, combined_x=combined_x, combined_w=combined_w)
        if per_rdma is not None:
            results["per_rdma"] = per_rdma
        handle_state = {"recv_src_idx": handle.recv_src_idx, "rank_prefix_matrix": handle.rank_prefix_matrix}
        return streams_of(results), streams_of(handle_state)

    torch.empty = recording_empty
    try:
        got = {
            "default": normal(),
            "async_finish": normal(async_finish=True),
            "allocate_on_comm_stream": normal(
                async_finish=True, allocate_on_comm_stream=True, previous_event=buffer.capture()
            ),
            "previous_event": normal(async_finish=True, previous_event=buffer.capture()),
        }
        low_latency = {}
        if low_latency_tokens is not None:
            recv_x, recv_count, handle, _, _ = buffer.low_latency_dispatch(
                x, topk_idx, low_latency_tokens, num_experts, use_fp8=False
            )
            combined, _, _ = buffer.low_latency_combine(recv_x, topk_idx, weights, handle)
            low_latency = streams_of({"recv_x": recv_x, "recv_count": recv_count, "combined": combined})
    finally:
        torch.empty = real_empty
    ep_device.synchronize()
    wants = {"default": "caller", "async_finish": "caller", "allocate_on_comm_stream": "comm", "previous_event": "comm"}
    for call, want in wants.items():
        results, handle_state = got[call]
        assert results == dict.fromkeys(results, want), f"{call}: results allocated on {results}, expected {want}"
        assert handle_state == dict.fromkeys(handle_state, "comm"), f"{call}: handle state allocated on {handle_state}"
    assert low_latency == dict.fromkeys(low_latency, "caller"), f"low-latency results allocated on {low_latency}"

