"""A call that would run on the reference implementation while its stream is being captured into a CUDA graph raises
a DeepEPError saying why it took that path, before it changes any state (the low-latency buffer half, above all),
instead of CUDA's "operation not permitted when stream is capturing" from the middle of a host copy. The capture
is simulated (the CPU has no CUDA graphs): the check reads deep_ep_py.device.is_current_stream_capturing."""

from __future__ import annotations

import torch

from deep_ep_py.testing import launch

NUM_TOKENS, HIDDEN, NUM_TOPK, EXPERTS_PER_RANK, MAX_TOKENS = 16, 128, 2, 2, 32


def _inputs(rank: int, num_ranks: int):
    """(E, x, topk_idx, weights, num_rdma_bytes) of this rank."""
    import deep_ep_py

    num_experts = EXPERTS_PER_RANK * num_ranks
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(NUM_TOKENS, HIDDEN, generator=gen).to(torch.bfloat16)
    topk_idx = torch.randn(NUM_TOKENS, num_experts, generator=gen).topk(NUM_TOPK).indices
    weights = torch.rand(NUM_TOKENS, NUM_TOPK, generator=gen)
    rdma = deep_ep_py.Buffer.get_low_latency_rdma_size_hint(MAX_TOKENS, HIDDEN, num_ranks, num_experts)
    return num_experts, x, topk_idx, weights, rdma


def _capture_refused(rank: int, num_ranks: int) -> None:
    import pytest

    import deep_ep_py
    from deep_ep_py import device as ep_device
    from deep_ep_py.errors import DeepEPError

    num_experts, x, topk_idx, weights, rdma = _inputs(rank, num_ranks)
    buffer = deep_ep_py.Buffer(
        torch.distributed.group.WORLD, 1 << 23, rdma, low_latency_mode=True, explicitly_destroy=True
    )
    assert buffer.backend == "reference", buffer.backend

    def round_trip():
        per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
        dispatched = buffer.dispatch(
            x,
            num_tokens_per_rank=per_rank,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            topk_idx=topk_idx,
            topk_weights=weights,
        )
        combined, _, _ = buffer.combine(dispatched[0], dispatched[4], topk_weights=dispatched[2])
        recv_x, _, ll_handle, _, _ = buffer.low_latency_dispatch(x, topk_idx, MAX_TOKENS, num_experts, use_fp8=False)
        ll_out, _, _ = buffer.low_latency_combine(recv_x, topk_idx, weights, ll_handle)
        return (per_rank, per_expert, in_rank), dispatched, combined, (recv_x, ll_handle), ll_out

    layout, dispatched, combined, (recv_x, ll_handle), ll_out = round_trip()
    half = buffer._backend.low_latency_buffer_idx
    calls = {
        "get_dispatch_layout": lambda: buffer.get_dispatch_layout(topk_idx, num_experts),
        "dispatch": lambda: buffer.dispatch(
            x,
            num_tokens_per_rank=layout[0],
            is_token_in_rank=layout[2],
            num_tokens_per_expert=layout[1],
            topk_idx=topk_idx,
            topk_weights=weights,
            num_worst_tokens=NUM_TOKENS * num_ranks,
        ),
        "combine": lambda: buffer.combine(dispatched[0], dispatched[4], topk_weights=dispatched[2]),
        "low_latency_dispatch": lambda: buffer.low_latency_dispatch(
            x, topk_idx, MAX_TOKENS, num_experts, use_fp8=False
        ),
        "low_latency_combine": lambda: buffer.low_latency_combine(recv_x, topk_idx, weights, ll_handle),
    }
    real = ep_device.is_current_stream_capturing
    ep_device.is_current_stream_capturing = lambda: True
    try:
        for name, call in calls.items():
            with pytest.raises(DeepEPError, match=rf"^{name}: expected no CUDA-graph capture") as info:
                call()
            assert "backend is 'reference'" in str(info.value), str(info.value)
            assert buffer._backend.low_latency_buffer_idx == half, f"{name} moved the low-latency half"
    finally:
        ep_device.is_current_stream_capturing = real
    # Nothing was left half done: the same calls, uncaptured, give the same results on every rank.
    again = round_trip()
    assert torch.equal(again[2], combined) and torch.equal(again[4], ll_out), f"rank {rank}: results changed"
    buffer.destroy()


def test_reference_refuses_graph_capture_before_changing_state() -> None:
    launch(_capture_refused, 2, timeout_s=120.0)


def _capture_begins_on_half_zero(rank: int, num_ranks: int) -> None:
    """On the low-latency kernels (their CPU emulator): a capture whose first call finds buffer half 1 is refused,
    with nothing taken, also when it follows another capture with no eager call between; one that begins on half 0
    runs, and its results are the eager calls'. The capture is simulated through the kernels' capture id."""
    import pytest

    import deep_ep_py
    from deep_ep_py.errors import DeepEPError

    num_experts, x, topk_idx, weights, rdma = _inputs(rank, num_ranks)
    buffer = deep_ep_py.Buffer(
        torch.distributed.group.WORLD, 0, rdma, low_latency_mode=True, explicitly_destroy=True, backend="cuda"
    )
    kernels = buffer._backend.low_latency
    assert kernels is not None, "Buffer(backend='cuda') built no low-latency kernels"

    def dispatch():
        return buffer.low_latency_dispatch(x, topk_idx, MAX_TOKENS, num_experts, use_fp8=False)

    def refused(capture_id: int) -> None:
        half = kernels.buffer_idx
        kernels._current_capture_id = lambda: capture_id
        with pytest.raises(DeepEPError, match="expected a CUDA-graph capture to begin on low-latency buffer half 0"):
            dispatch()
        assert kernels.buffer_idx == half, "the refused call took a half"

    recv_x, _, handle, _, _ = dispatch()
    assert kernels.buffer_idx == 1
    refused(17)
    del kernels._current_capture_id  # eager again
    want, _, _ = buffer.low_latency_combine(recv_x, topk_idx, weights, handle)
    assert kernels.buffer_idx == 0
    kernels._current_capture_id = lambda: 18
    captured_x, _, captured_handle, _, _ = dispatch()
    got, _, _ = buffer.low_latency_combine(captured_x, topk_idx, weights, captured_handle)
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)
    kernels._current_capture_id = lambda: 19  # a second capture straight after: one call, from half 0
    dispatch()
    refused(20)  # a third, straight after the second: it would begin on half 1
    del kernels._current_capture_id
    dispatch()  # eager, on half 1: back to 0 for the next call
    assert kernels.buffer_idx == 0
    buffer.destroy()


def test_low_latency_capture_begins_on_half_zero() -> None:
    import pytest

    from deep_ep_py import _ext

    if not _ext.emulator_available():
        pytest.skip(f"the CPU emulator of the kernels is not built: {_ext.emulator_unavailable_reason()}")
    env = {"DEEP_EP_PY_UNVERIFIED_KERNELS": "1"}
    launch(_capture_begins_on_half_zero, 2, timeout_s=120.0, device="emulated", env=env)
