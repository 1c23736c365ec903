"""Buffer on the cuda backend, end to end: the same calls through Buffer(backend="cuda") and
Buffer(backend="reference") on the same inputs give the same results. With DEEP_EP_PY_UNVERIFIED_KERNELS=1 this
exercises the intranode and low-latency kernels through the wiring in backends/cuda.py; without it, the layout
kernel and the reference fallback on GPU tensors."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from kernel_device import tier_device
from result_streams import check_results_allocated_on_the_callers_stream

from deep_ep_py import device as ep_device
from deep_ep_py.runtime import finalize_nvshmem
from deep_ep_py.testing import launch

pytestmark = pytest.mark.gpu

NUM_TOKENS, HIDDEN, NUM_TOPK, EXPERTS_PER_RANK, MAX_TOKENS = 96, 256, 4, 4, 128
COMBINE_TOLERANCE = 1e-2  # bf16 rounding of float32 sums that may be added in another order


def _inputs(rank: int, num_experts: int, device: torch.device, seed: int = 1000):
    gen = torch.Generator().manual_seed(seed + rank)
    x = torch.randn(NUM_TOKENS, HIDDEN, generator=gen).to(torch.bfloat16)
    topk_idx = torch.randn(NUM_TOKENS, num_experts, generator=gen).topk(NUM_TOPK).indices
    topk_idx[torch.rand(NUM_TOKENS, NUM_TOPK, generator=gen) < 0.1] = -1
    weights = torch.rand(NUM_TOKENS, NUM_TOPK, generator=gen)
    return x.to(device), topk_idx.to(device), weights.to(device)


def _normal(buffer, x, topk_idx, weights, num_experts):
    per_rank, per_rdma, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
    recv_x, recv_idx, recv_w, per_expert_list, handle, _ = buffer.dispatch(
        x,
        num_tokens_per_rank=per_rank,
        num_tokens_per_rdma_rank=per_rdma,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        topk_idx=topk_idx,
        topk_weights=weights,
        expert_alignment=4,
    )
    combined, combined_w, _ = buffer.combine(recv_x * 2, handle, topk_weights=recv_w)
    ep_device.synchronize()
    _check_kernels_took(buffer, "intranode", handle)
    return [per_rank, per_expert, in_rank, recv_x, recv_idx, recv_w, handle[0]], per_expert_list, combined, combined_w


def _assert_normal_matches(got, want, rank: int) -> None:
    """_normal's results of the kernels against the reference's: exact but for the combine's float32 sums."""
    (got_outputs, got_list, got_combined, got_w), (want_outputs, want_list, want_combined, want_w) = got, want
    for i, (g, w) in enumerate(zip(got_outputs, want_outputs)):
        assert torch.equal(g.cpu(), w.cpu()), f"rank {rank}: normal-mode output {i} differs"
    assert got_list == want_list, f"rank {rank}: per-expert counts {got_list} != {want_list}"
    torch.testing.assert_close(got_combined.float(), want_combined.float(), rtol=COMBINE_TOLERANCE, atol=COMBINE_TOLERANCE)
    torch.testing.assert_close(got_w, want_w, rtol=0, atol=1e-6)


def _assert_low_latency_matches(got, want, where: str) -> None:
    """(rows per expert, recv_count, combined) of the kernels against the reference's."""
    (got_rows, got_count, got_out), (want_rows, want_count, want_out) = got, want
    assert torch.equal(got_count.cpu(), want_count.cpu()), f"{where}: recv_count differs"
    for e, (g, w) in enumerate(zip(got_rows, want_rows)):
        assert torch.equal(g.cpu(), w.cpu()), f"{where}: rows of local expert {e} differ"
    torch.testing.assert_close(got_out.float(), want_out.float(), rtol=COMBINE_TOLERANCE, atol=COMBINE_TOLERANCE)


def _check_kernels_took(buffer, module: str, handle) -> None:
    """With the kernels on, the call went by them (their module owns its handle), not the reference fallback: a
    wiring slip in backends/cuda.py would otherwise pass as a match with the reference."""
    from deep_ep_py.backends.cuda import unverified_kernels_enabled

    if buffer.backend != "cuda" or not unverified_kernels_enabled():
        return
    kernels = getattr(buffer._backend, module)
    assert kernels is not None, f"Buffer(backend='cuda') built no {module} kernels with the kernels on"
    assert kernels.owns(handle), f"the {module} kernels did not make this handle: the call took the reference"


def _low_latency(buffer, x, topk_idx, weights, num_experts):
    recv_x, recv_count, handle, _, hook = buffer.low_latency_dispatch(
        x, topk_idx, MAX_TOKENS, num_experts, use_fp8=False, return_recv_hook=True
    )
    hook()
    rows = _rows_per_expert(recv_x, recv_count)
    out, _, _ = buffer.low_latency_combine(recv_x, topk_idx, weights, handle)
    ep_device.synchronize()
    _check_kernels_took(buffer, "low_latency", handle)
    return rows, recv_count, out


def _rows_per_expert(recv_x, recv_count) -> list[torch.Tensor]:
    """Each local expert's received rows, sorted: the row order within an expert is the implementation's."""
    return [recv_x[e, : int(recv_count[e])].float().sort(dim=0).values for e in range(recv_x.shape[0])]


def _buffer_bytes(num_ranks: int, num_experts: int) -> tuple[int, int]:
    """(num_nvl_bytes, num_rdma_bytes) of a Buffer for both modes at this file's sizes."""
    import deep_ep_py

    configs = (deep_ep_py.Buffer.get_dispatch_config(num_ranks), deep_ep_py.Buffer.get_combine_config(num_ranks))
    nvl = max(config.get_nvl_buffer_size_hint(HIDDEN * 2, num_ranks) for config in configs)
    return nvl, deep_ep_py.Buffer.get_low_latency_rdma_size_hint(MAX_TOKENS, HIDDEN, num_ranks, num_experts)


def _compare(rank: int, num_ranks: int) -> None:
    import deep_ep_py

    device = ep_device.kernel_device()
    num_experts = EXPERTS_PER_RANK * num_ranks
    group = dist.group.WORLD
    nvl, rdma = _buffer_bytes(num_ranks, num_experts)
    buffers = {
        name: deep_ep_py.Buffer(group, nvl, rdma, low_latency_mode=True, explicitly_destroy=True, backend=name)
        for name in ("cuda", "reference")
    }
    assert buffers["cuda"].backend == "cuda"
    x, topk_idx, weights = _inputs(rank, num_experts, device)
    for _ in range(3):  # repeated calls: no stale state between them
        got = _normal(buffers["cuda"], x, topk_idx, weights, num_experts)
        _assert_normal_matches(got, _normal(buffers["reference"], x, topk_idx, weights, num_experts), rank)
        want_low_latency = _low_latency(buffers["reference"], x, topk_idx, weights, num_experts)
        got = _low_latency(buffers["cuda"], x, topk_idx, weights, num_experts)
        _assert_low_latency_matches(got, want_low_latency, f"rank {rank}")
    for buffer in buffers.values():
        buffer.destroy()

    # A Buffer built after the first was destroyed, as a framework rebuilding its communicator does: it joins the
    # NVSHMEM the first one started (NVSHMEM cannot start twice in one process; the emulator refuses it). With
    # enable_shrink, as vLLM builds it: the low-latency waits mask a late peer, and the cleans below take the masked
    # barrier (csrc/low_latency/barrier.cu) with every rank present.
    rebuilt = deep_ep_py.Buffer(
        group, nvl, rdma, low_latency_mode=True, explicitly_destroy=True, enable_shrink=True, backend="cuda"
    )
    if rebuilt._backend.low_latency is not None:  # None where the kernels are off (the reference serves)
        assert rebuilt._backend.low_latency.mask_on_timeout, "enable_shrink did not reach the low-latency kernels"
    got = _low_latency(rebuilt, x, topk_idx, weights, num_experts)
    _assert_low_latency_matches(got, want_low_latency, f"rank {rank} after the rebuild")
    _check_unchecked_id_raises_next_layout(rebuilt, topk_idx, num_experts, rank)
    _check_hooks_run_on_the_call_stream(rebuilt, x, topk_idx, weights, num_experts, want_low_latency)
    _check_async_combine_keeps_the_handle(rebuilt, x, topk_idx, weights, num_experts, want_low_latency[2])
    check_results_allocated_on_the_callers_stream(rebuilt, x, topk_idx, weights, num_experts, MAX_TOKENS)
    _check_low_latency_id_raises_next_call(rebuilt, x, topk_idx, num_experts, rank)
    _check_local_buffer_tensor(rebuilt, x, topk_idx, weights, num_experts, rank, want_low_latency[2])
    _check_graph_through_buffer(rebuilt, num_experts, rank)
    _check_experts_switch_needs_clean(rebuilt, x, weights, num_experts, rank)
    rebuilt.destroy()
    finalize_nvshmem()


def _check_unchecked_id_raises_next_layout(buffer, topk_idx, num_experts: int, rank: int) -> None:
    """Where the layout kernel runs, the host does not read the ids (a device sync per layer; nor can it under
    CUDA-graph capture): an id past the last expert reaches the layout kernel, which skips that choice, and the
    Buffer's next get_dispatch_layout raises DeepEPError naming it; the one after is clean again. The dispatch after
    a layout of the same tensor does not read the ids either."""
    from deep_ep_py import _validate
    from deep_ep_py.errors import DeepEPError

    if not buffer._backend.checks_expert_ids_on_device("get_dispatch_layout", topk_idx):
        return  # the reference layout on GPU tensors, which indexes with the ids: the host check is its guard
    bad = topk_idx.clone()
    bad[0, 0] = num_experts + 1
    buffer.get_dispatch_layout(bad, num_experts)
    ep_device.synchronize()
    last = _validate._last_passed
    assert last is not None and last[0]() is bad, "the dispatch after a kernel layout would read the ids again"
    want = f"expected expert ids in [-1, {num_experts}) (-1 = none), got {num_experts + 1} (token 0, on rank {rank}"
    try:
        buffer.get_dispatch_layout(topk_idx, num_experts)
    except DeepEPError as exc:
        assert want in str(exc), f"rank {rank}: expected {want!r}, got {exc}"
    else:
        raise AssertionError(f"rank {rank}: the id {num_experts + 1} past the last expert went unreported")
    buffer.get_dispatch_layout(topk_idx, num_experts)


def _check_hooks_run_on_the_call_stream(buffer, x, topk_idx, weights, num_experts: int, want) -> None:
    """vLLM's and SGLang's micro-batch overlap call one batch's hook from the other batch's stream: the receive
    still runs on the stream of the call (as DeepEP's), so the results read there are complete."""
    call_stream, other_stream = ep_device.new_stream(), ep_device.new_stream()
    call_stream.wait_stream(ep_device.current_stream())
    with ep_device.stream(call_stream):
        recv_x, recv_count, handle, event, hook = buffer.low_latency_dispatch(
            x, topk_idx, MAX_TOKENS, num_experts, use_fp8=False, return_recv_hook=True
        )
        assert event.event is None, "a hook call returned an event"
    with ep_device.stream(other_stream):
        hook()
    with ep_device.stream(call_stream):
        count = recv_count.clone()
        rows = _rows_per_expert(recv_x, count)
        out, _, hook = buffer.low_latency_combine(recv_x, topk_idx, weights, handle, return_recv_hook=True)
    with ep_device.stream(other_stream):
        hook()
    with ep_device.stream(call_stream):
        out = out.clone()
    call_stream.synchronize()
    _assert_low_latency_matches((rows, count, out), want, "with the hooks run from another stream")


def _check_async_combine_keeps_the_handle(buffer, x, topk_idx, weights, num_experts: int, want_out) -> None:
    """An async low-latency combine after a hook-mode dispatch (whose handle the caller's stream allocated) keeps the
    handle's tensors alive until its event: the caller may drop the handle at once, and the memory its allocator
    hands out next (written here with garbage) must not be what the combine's send still reads on the
    communication stream. On a GPU the send is held back behind a sleep so that the garbage lands first."""
    recv_x, _, handle, _, hook = buffer.low_latency_dispatch(
        x, topk_idx, MAX_TOKENS, num_experts, use_fp8=False, return_recv_hook=True
    )
    hook()
    expert_out = recv_x.clone()
    if expert_out.is_cuda:
        buffer.get_comm_stream().wait_stream(ep_device.current_stream())
        with torch.cuda.stream(buffer.get_comm_stream()):
            torch.cuda._sleep(50_000_000)  # ~25 ms at 2 GHz: the combine's kernels queue behind it
    out, event, _ = buffer.low_latency_combine(expert_out, topk_idx, weights, handle, async_finish=True)
    kept = {id(t) for t in event.extra_tensors}
    for name in ("src_info", "layout_range", "src_topk_slot", "recv_count"):
        assert id(getattr(handle, name)) in kept, f"the async combine's event does not hold handle.{name}"
    shapes = [(t.shape, t.dtype) for t in (handle.src_info, handle.layout_range, handle.src_topk_slot)]
    del handle, recv_x, hook
    garbage = [torch.full(shape, -7, dtype=dtype, device=x.device) for shape, dtype in shapes]
    event.current_stream_wait()
    ep_device.synchronize()
    del garbage
    torch.testing.assert_close(out.float(), want_out.float(), rtol=COMBINE_TOLERANCE, atol=COMBINE_TOLERANCE)


def _check_low_latency_id_raises_next_call(buffer, x, topk_idx, num_experts: int, rank: int) -> None:
    """Where the low-latency kernels run, the host does not read the ids (a device sync per decode step): an id past
    the last expert on every rank is skipped by the kernels, the next call raises DeepEPError naming it on every
    rank (before it launches, so the ranks stay in step), and the call after is clean."""
    from deep_ep_py.errors import DeepEPError

    if not buffer._backend.checks_expert_ids_on_device("low_latency_dispatch", x):
        return  # the reference on GPU tensors: the host check is its guard
    bad = topk_idx.clone()
    bad[0, 0] = num_experts + 1
    buffer.low_latency_dispatch(x, bad, MAX_TOKENS, num_experts, use_fp8=False)
    ep_device.synchronize()
    try:
        buffer.low_latency_dispatch(x, topk_idx, MAX_TOKENS, num_experts, use_fp8=False)
    except DeepEPError as exc:
        want = f"expected expert ids in [-1, {num_experts}) (-1 = none), got {num_experts + 1} (token 0, on rank {rank}"
        assert want in str(exc), f"rank {rank}: expected {want!r}, got {exc}"
    else:
        raise AssertionError(f"rank {rank}: the low-latency id {num_experts + 1} past the last expert went unreported")
    buffer.low_latency_dispatch(x, topk_idx, MAX_TOKENS, num_experts, use_fp8=False)
    ep_device.synchronize()


def _check_local_buffer_tensor(buffer, x, topk_idx, weights, num_experts: int, rank: int, want_out) -> None:
    """get_local_buffer_tensor is the kernels' own memory where they hold it, as in DeepEP: what a rank writes there
    its peers read through their mappings, and a zero-copy combine sends what was written there. Where no kernel
    holds the buffer it is a zero tensor of the buffer's size."""
    from deep_ep_py.backends.cuda import unverified_kernels_enabled
    from deep_ep_py.runtime import device_bytes_view

    nvl = buffer.get_local_buffer_tensor(torch.uint8)
    rdma = buffer.get_local_buffer_tensor(torch.uint8, use_rdma_buffer=True)
    sizes = (nvl.numel(), rdma.numel())
    assert sizes == (buffer.num_nvl_bytes, buffer.num_rdma_bytes), f"rank {rank}: local buffers of {sizes} bytes"
    backend = buffer._backend
    if backend.intranode is None:
        assert not unverified_kernels_enabled(), f"rank {rank}: the kernels are on but hold no NVLink buffer"
        nonzero = (nvl.count_nonzero().item(), rdma.count_nonzero().item())
        assert nonzero == (0, 0), f"rank {rank}: the stand-in local buffers hold {nonzero} non-zero bytes"
        return
    intranode, low_latency = backend.intranode, backend.low_latency
    assert nvl.data_ptr() == intranode.buffer.local_ptr, f"rank {rank}: the NVLink view is not the kernels' buffer"
    assert rdma.data_ptr() == low_latency.buffer_ptr, f"rank {rank}: the RDMA view is not the kernels' buffer"

    # Written here, read by every peer through its IPC mapping. The staging area: kernels rewrite it each call.
    offset, num_ints = intranode._constants["staging_offset"], 1000

    def pattern(of_rank: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(7000 + of_rank)
        return torch.randint(-(2**31), 2**31 - 1, (num_ints,), generator=gen, dtype=torch.int32)

    buffer.get_local_buffer_tensor(torch.int32, (num_ints,), offset=offset).copy_(pattern(rank))
    ep_device.synchronize()
    dist.barrier()
    for peer, peer_ptr in enumerate(intranode.peer_ptrs):
        seen = device_bytes_view(peer_ptr + offset, num_ints * 4).view(torch.int32).cpu()
        assert torch.equal(seen, pattern(peer)), f"rank {rank}: rank {peer}'s local buffer tensor is not its buffer"
    dist.barrier()

    # A zero-copy combine sends what was written through the RDMA view: twice the received rows (exact in bf16),
    # so twice the reference's combined output.
    recv_x, _, handle, _, _ = buffer.low_latency_dispatch(x, topk_idx, MAX_TOKENS, num_experts, use_fp8=False)
    send_area = buffer.get_next_low_latency_combine_buffer(handle)
    send_offset = send_area.data_ptr() - rdma.data_ptr()
    written = buffer.get_local_buffer_tensor(
        torch.bfloat16, tuple(send_area.shape), offset=send_offset, use_rdma_buffer=True
    )
    written.copy_(recv_x * 2)
    out, _, _ = buffer.low_latency_combine(recv_x, topk_idx, weights, handle, zero_copy=True)
    ep_device.synchronize()
    torch.testing.assert_close(out.float(), 2 * want_out.float(), rtol=COMBINE_TOLERANCE, atol=2 * COMBINE_TOLERANCE)


def _check_graph_through_buffer(buffer, num_experts: int, rank: int) -> None:
    """vLLM's decode graph, through Buffer: a hook-mode low-latency dispatch and combine (out=) captured in a CUDA
    graph (begun on half 0; one begun on half 1 is refused), replayed with fresh tokens, routing and weights copied
    in; each replay's combine of the dispatched rows unchanged is each token times the sum of its valid weights.
    With the kernels off, captures raise DeepEPError naming the reason before any host copy. GPU only."""
    from deep_ep_py.backends.cuda import unverified_kernels_enabled
    from deep_ep_py.errors import DeepEPError

    if ep_device.emulated():
        return  # no CUDA graphs on the emulator
    buffer.clean_low_latency_buffer(MAX_TOKENS, HIDDEN, num_experts)
    static = list(_inputs(rank + 10, num_experts, ep_device.kernel_device()))
    static_out = torch.empty_like(static[0])

    def round_trip() -> None:
        x, topk_idx, weights = static
        recv_x, _, handle, _, hook = buffer.low_latency_dispatch(
            x, topk_idx, MAX_TOKENS, num_experts, use_fp8=False, return_recv_hook=True
        )
        hook()
        _, _, hook = buffer.low_latency_combine(
            recv_x, topk_idx, weights, handle, return_recv_hook=True, out=static_out
        )
        hook()

    def capture_raises(work, message: str) -> None:
        """The capture of work raises our DeepEPError itself (not CUDA's from capture_end, over it: a call on the
        communication stream must join it back to the capture before it raises), and CUDA stays usable."""
        try:
            with torch.cuda.graph(torch.cuda.CUDAGraph()):
                work()
        except DeepEPError as exc:
            assert message in str(exc), str(exc)
        else:
            raise AssertionError(f"the capture did not raise DeepEPError ({message})")
        torch.cuda.synchronize()

    x, topk_idx, weights = static
    if buffer._backend.low_latency is None or not unverified_kernels_enabled():
        capture_raises(round_trip, "expected no CUDA-graph capture")
        # Calls on the communication stream: no hook, and the layout.
        capture_raises(
            lambda: buffer.low_latency_dispatch(x, topk_idx, MAX_TOKENS, num_experts, use_fp8=False),
            "expected no CUDA-graph capture",
        )
        capture_raises(lambda: buffer.get_dispatch_layout(topk_idx, num_experts), "expected no CUDA-graph capture")
        dist.barrier()
        return
    round_trip()  # warm-up
    torch.cuda.synchronize()
    # A capture begun on half 1 is refused, also for a call on the communication stream.
    recv_x, _, handle, _, _ = buffer.low_latency_dispatch(x, topk_idx, MAX_TOKENS, num_experts, use_fp8=False)
    capture_raises(
        lambda: buffer.low_latency_dispatch(x, topk_idx, MAX_TOKENS, num_experts, use_fp8=False),
        "expected a CUDA-graph capture to begin on low-latency buffer half 0",
    )
    buffer.low_latency_combine(recv_x, topk_idx, weights, handle)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        round_trip()
    for replay in range(4):
        fresh = _inputs(rank + 20 + 7 * replay, num_experts, static[0].device)
        for captured, new in zip(static, fresh):
            captured.copy_(new)
        static_out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        x, topk_idx, weights = fresh
        want = x.float() * (weights * (topk_idx >= 0)).sum(dim=1, keepdim=True)
        torch.testing.assert_close(static_out.float(), want, rtol=COMBINE_TOLERANCE, atol=COMBINE_TOLERANCE)
    buffer._backend.low_latency.check_device_errors("graph replays through Buffer")
    del graph


def _check_experts_switch_needs_clean(buffer, x, weights, num_experts: int, rank: int) -> None:
    """A low-latency call with another num_experts than the calls before it raises before it launches (on every rank,
    so none is left waiting); after clean_low_latency_buffer with the new E the kernels take it: combining the
    dispatched rows unchanged gives each token times the sum of its valid weights."""
    new_experts = num_experts // 2
    gen = torch.Generator().manual_seed(3000 + rank)
    topk_idx = torch.rand(NUM_TOKENS, new_experts, generator=gen).topk(NUM_TOPK).indices
    topk_idx[torch.rand(NUM_TOKENS, NUM_TOPK, generator=gen) < 0.1] = -1
    topk_idx = topk_idx.to(x.device)
    try:
        buffer.low_latency_dispatch(x, topk_idx, MAX_TOKENS, new_experts, use_fp8=False)
    except ValueError as exc:
        assert f"num_experts: expected {num_experts}" in str(exc), f"rank {rank}: {exc}"
    else:
        raise AssertionError(f"rank {rank}: a low-latency call with num_experts {new_experts} was not refused")
    buffer.clean_low_latency_buffer(MAX_TOKENS, HIDDEN, new_experts)
    for _ in range(2):
        recv_x, _, handle, _, _ = buffer.low_latency_dispatch(x, topk_idx, MAX_TOKENS, new_experts, use_fp8=False)
        out, _, _ = buffer.low_latency_combine(recv_x, topk_idx, weights, handle)
        ep_device.synchronize()
        want = x.float() * (weights * (topk_idx >= 0)).sum(dim=1, keepdim=True)
        torch.testing.assert_close(out.float(), want, rtol=COMBINE_TOLERANCE, atol=COMBINE_TOLERANCE)


@pytest.mark.parametrize("unverified_kernels", ["0", "1"])
def test_buffer_cuda_matches_reference(
    require_gpu, num_ranks: int, unverified_kernels: str, launch_timeout_s: float
) -> None:
    env = {"DEEP_EP_PY_UNVERIFIED_KERNELS": unverified_kernels, "DEEP_EP_PY_TIMEOUT_S": "30"}
    launch(_compare, num_ranks, timeout_s=launch_timeout_s, device=tier_device(), env=env)


def _two_buffers_at_once(rank: int, num_ranks: int) -> None:
    """Two cuda Buffers alive in one process with their calls interleaved: vLLM's dual-batch overlap keeps a
    low-latency Buffer per micro-batch, and SGLang's auto mode makes normal-mode calls on a Buffer that also serves
    low latency. Both batches are sent before either is received (the second first), and the second Buffer runs a
    normal-mode dispatch and combine in between: each Buffer's symmetric memory, signals, buffer halves, IPC
    buffer and error record are its own, so every result is the reference Buffer's for the same batch."""
    import deep_ep_py

    device = ep_device.kernel_device()
    num_experts = EXPERTS_PER_RANK * num_ranks
    group = dist.group.WORLD
    nvl, rdma = _buffer_bytes(num_ranks, num_experts)
    options = {"low_latency_mode": True, "explicitly_destroy": True}
    buffers = [
        deep_ep_py.Buffer(group, 0, rdma, backend="cuda", **options),
        deep_ep_py.Buffer(group, nvl, rdma, backend="cuda", **options),
    ]
    reference = deep_ep_py.Buffer(group, nvl, rdma, backend="reference", **options)
    batches = [_inputs(rank, num_experts, device, seed) for seed in (1000, 2000)]
    want_low_latency = [_low_latency(reference, *batch, num_experts) for batch in batches]
    want_normal = _normal(reference, *batches[0], num_experts)
    for step in range(3):  # each Buffer alternates its halves: both halves of both, and back to the first
        sends = [
            buffer.low_latency_dispatch(x, topk_idx, MAX_TOKENS, num_experts, use_fp8=False, return_recv_hook=True)
            for buffer, (x, topk_idx, _) in zip(buffers, batches)
        ]
        _assert_normal_matches(_normal(buffers[1], *batches[0], num_experts), want_normal, rank)
        for *_, hook in reversed(sends):
            hook()
        rows = [_rows_per_expert(recv_x, recv_count) for recv_x, recv_count, *_ in sends]
        combines = [
            buffer.low_latency_combine(recv_x, topk_idx, weights, handle, return_recv_hook=True)
            for buffer, (recv_x, _, handle, _, _), (_, topk_idx, weights) in zip(buffers, sends, batches)
        ]
        for *_, hook in combines:
            hook()
        ep_device.synchronize()
        for i, buffer in enumerate(buffers):
            _check_kernels_took(buffer, "low_latency", sends[i][2])
            got = (rows[i], sends[i][1], combines[i][0])
            _assert_low_latency_matches(got, want_low_latency[i], f"rank {rank} step {step} Buffer {i}")
    for buffer in (*buffers, reference):
        buffer.destroy()
    finalize_nvshmem()


def test_two_buffers_alive_at_once(require_gpu, num_ranks: int, launch_timeout_s: float) -> None:
    env = {"DEEP_EP_PY_UNVERIFIED_KERNELS": "1", "DEEP_EP_PY_TIMEOUT_S": "30"}
    launch(_two_buffers_at_once, num_ranks, timeout_s=launch_timeout_s, device=tier_device(), env=env)


def _shrink_through_buffer(rank: int, num_ranks: int) -> None:
    """Buffer(enable_shrink=True) on the kernels, as vLLM builds it: the last rank makes no low-latency call; the
    others' dispatch masks it once its wait passes DEEP_EP_PY_TIMEOUT_S, low_latency_query_mask_buffer says so,
    combining the dispatched rows unchanged gives each token times the weights of its choices on live ranks, and
    clean_low_latency_buffer does not wait for the dead rank."""
    import deep_ep_py

    device = ep_device.kernel_device()
    num_experts = EXPERTS_PER_RANK * num_ranks
    rdma = deep_ep_py.Buffer.get_low_latency_rdma_size_hint(MAX_TOKENS, HIDDEN, num_ranks, num_experts)
    buffer = deep_ep_py.Buffer(
        dist.group.WORLD, 0, rdma, low_latency_mode=True, explicitly_destroy=True, enable_shrink=True, backend="cuda"
    )
    dead = num_ranks - 1
    want_mask = [int(r == dead) for r in range(num_ranks)]
    if rank != dead:
        x, topk_idx, weights = _inputs(rank, num_experts, device)
        for call in range(2):  # the second call finds the rank masked already
            recv_x, _, handle, _, _ = buffer.low_latency_dispatch(x, topk_idx, MAX_TOKENS, num_experts, use_fp8=False)
            out = torch.full_like(x, float("nan"))
            buffer.low_latency_combine(recv_x, topk_idx, weights, handle, out=out)
            ep_device.synchronize()
            _check_kernels_took(buffer, "low_latency", handle)
            status = torch.full((num_ranks,), -1, dtype=torch.int32, device=device)
            buffer.low_latency_query_mask_buffer(status)
            assert status.tolist() == want_mask, f"rank {rank} call {call}: mask {status.tolist()} != {want_mask}"
            live = (topk_idx >= 0) & (topk_idx // EXPERTS_PER_RANK != dead)
            want = x.float() * (weights * live).sum(dim=1, keepdim=True)
            torch.testing.assert_close(out.float(), want, rtol=COMBINE_TOLERANCE, atol=COMBINE_TOLERANCE)
        buffer.clean_low_latency_buffer(MAX_TOKENS, HIDDEN, num_experts)
        status = torch.full((num_ranks,), -1, dtype=torch.int32, device=device)
        buffer.low_latency_query_mask_buffer(status)
        assert status.tolist() == want_mask, f"rank {rank} after the clean: mask {status.tolist()} != {want_mask}"
    # The dead rank was alive all along: freeing NVSHMEM memory is collective, so it waits here for the others.
    dist.barrier()
    buffer.destroy()
    finalize_nvshmem()


def test_buffer_shrink_masks_a_dead_rank(require_gpu, num_ranks: int, launch_timeout_s: float) -> None:
    if num_ranks < 2:
        pytest.skip("needs a peer")
    # The kernels only: the reference masks by hand (its gloo collectives wait for every rank).
    env = {"DEEP_EP_PY_UNVERIFIED_KERNELS": "1", "DEEP_EP_PY_TIMEOUT_S": "2"}
    launch(_shrink_through_buffer, num_ranks, timeout_s=launch_timeout_s, device=tier_device(), env=env)


def _drop_without_destroy(rank: int, num_ranks: int) -> None:
    """A Buffer dropped without destroy() (explicitly_destroy=False, DeepEP's default) while its last dispatch is
    still queued: its IPC mappings and memory go only after this process's kernels are drained, so the queued
    rounds neither store through closed mappings nor leave the peers waiting for rows that never come; every rank's
    results are the reference's, and CUDA stays usable. On a GPU rank 0's kernels are held back behind a sleep, so
    the drop comes while they are queued."""
    import gc

    import deep_ep_py

    device = ep_device.kernel_device()
    num_experts = EXPERTS_PER_RANK * num_ranks
    group = dist.group.WORLD
    config = deep_ep_py.Buffer.get_dispatch_config(num_ranks)
    nvl = config.get_nvl_buffer_size_hint(HIDDEN * 2, num_ranks)
    x, topk_idx, weights = _inputs(rank, num_experts, device)
    reference = deep_ep_py.Buffer(group, nvl, 0, explicitly_destroy=True, backend="reference")
    want = _normal(reference, x, topk_idx, weights, num_experts)[0]
    want_x, want_idx = want[3], want[4]
    buffer = deep_ep_py.Buffer(group, nvl, 0, backend="cuda")
    assert buffer._backend.intranode is not None, "Buffer(backend='cuda') built no intranode kernels"
    layout = buffer.get_dispatch_layout(topk_idx, num_experts)
    if x.is_cuda and rank == 0:
        buffer.get_comm_stream().wait_stream(ep_device.current_stream())
        with torch.cuda.stream(buffer.get_comm_stream()):
            torch.cuda._sleep(100_000_000)  # ~50 ms at 2 GHz
    recv_x, recv_idx, recv_weights, got_list, _, event = buffer.dispatch(
        x,
        num_tokens_per_rank=layout[0],
        is_token_in_rank=layout[3],
        num_tokens_per_expert=layout[2],
        topk_idx=topk_idx,
        topk_weights=weights,
        num_worst_tokens=NUM_TOKENS * num_ranks,  # no host sync: the call returns with its kernels queued
        async_finish=True,
    )
    del buffer, layout
    gc.collect()
    event.current_stream_wait()
    ep_device.synchronize()
    num_rows = want_x.shape[0]
    assert got_list == [] and recv_x.shape[0] == NUM_TOKENS * num_ranks, (got_list, recv_x.shape)
    assert torch.equal(recv_x[:num_rows].cpu(), want_x.cpu()), f"rank {rank}: recv_x differs after the drop"
    assert torch.equal(recv_idx[:num_rows].cpu(), want_idx.cpu()), f"rank {rank}: recv_topk_idx differs"
    assert bool((recv_idx[num_rows:] == -1).all()), f"rank {rank}: rows past the real count have top-k ids"
    torch.zeros(1, device=device).add_(1)  # CUDA is still usable
    ep_device.synchronize()
    dist.barrier()
    reference.destroy()


def test_buffer_dropped_without_destroy_drains_first(require_gpu, num_ranks: int, launch_timeout_s: float) -> None:
    if num_ranks < 2:
        pytest.skip("needs a peer")
    env = {"DEEP_EP_PY_UNVERIFIED_KERNELS": "1", "DEEP_EP_PY_TIMEOUT_S": "30"}
    launch(_drop_without_destroy, num_ranks, timeout_s=launch_timeout_s, device=tier_device(), env=env)
