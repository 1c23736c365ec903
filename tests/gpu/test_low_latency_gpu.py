"""Low-latency kernels (csrc/low_latency, deep_ep_py/backends/low_latency.py) on N ranks sharing the GPU.

Every rank builds every rank's inputs from one seed, so each computes locally what it must receive (the
expectation); the main test also runs the reference backend on the same inputs. Dispatch is compared exactly
(per (local expert, source rank) block, rows sorted by (token, top-k slot): indices, bf16 payloads, fp8 bytes and
scale bits against deep_ep_py.fp8). Combine sums in float32 and rounds to bf16 once, as the reference; the order
of the sum differs, hence the tolerance COMBINE_TOL (absolute and relative, a few bf16 ulps).

Launches: the reference comparisons (every format and mode), the rank-mask test and the repeated-calls/CUDA-graph
test of one rank count run in one batch (deep_ep_py.testing.batch) on one NvshmemContext, each case on fresh
LowLatencyKernels (destroyed once every rank has left the case; the next case's buffer is allocated zeroed); the
missing-peer test needs DEEP_EP_PY_TIMEOUT_S=2 and a launch of its own.
"""

from __future__ import annotations

import os
import time

import pytest
from kernel_device import emulated_tier, on_kernel_device, tier_device

from deep_ep_py import _ext
from deep_ep_py import device as ep_device
from deep_ep_py.config import EMULATE_NETWORK_ENV, RANKS_PER_NODE_ENV
from deep_ep_py.testing.batch import BatchCase, run_case

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")

COMBINE_TOL = 2e-2
# Small shapes, each past the kernels' per-block strides so that their loops run more than once: tokens per rank
# (> the 16 blocks of a send grid), hidden (a multiple of 512 for ue8m0; 12 FP8 groups > 8 warps per block),
# top-k (> 8 warps per block; needs num_experts >= top-k for distinct experts), experts per rank.
MAX_TOKENS = 24
HIDDEN = 1536
NUM_TOPK = 9
EXPERTS_PER_RANK = 5
FORMATS = {  # name -> (use_fp8, round_scale, use_ue8m0)
    "bf16": (False, False, False),
    "fp8": (True, False, False),
    "fp8_round": (True, True, False),
    "fp8_ue8m0": (True, True, True),
}


def test_layout_matches_size_hint():
    """The kernels' buffer layout and config.low_latency_rdma_size_hint are one formula (needs _C, not a GPU)."""
    extension = _ext.load_extension()
    if extension is None:
        pytest.skip(_ext.kernels_unavailable_reason() or "no extension")
    from deep_ep_py.config import low_latency_rdma_size_hint

    for args in [(128, 7168, 8, 256), (8, 128, 2, 4), (3, 512, 4, 8), (1, 136, 2, 2), (64, 2048, 2, 32)]:
        assert extension.low_latency_buffer_bytes(*args) == low_latency_rdma_size_hint(*args), args


# ------------------------------------------------------------------------------------------------- inputs


def make_inputs(seed: int, num_ranks: int, num_experts: int, empty_rank: int | None = 0):
    """Every rank's (x bf16 [T_r, H], topk_idx int64 [T_r, K], topk_weights float32 [T_r, K]) on the CPU.
    Token counts vary (<= MAX_TOKENS, rank `empty_rank` has none); experts are distinct per token, ~15% are -1."""
    gen = torch.Generator().manual_seed(seed)
    inputs = []
    for rank in range(num_ranks):
        num_tokens = 0 if rank == empty_rank else int(torch.randint(1, MAX_TOKENS + 1, (1,), generator=gen))
        x = (torch.randn(num_tokens, HIDDEN, generator=gen) * 3).to(torch.bfloat16)
        x[:, :7] = 0  # exercise zero channels; one token with a tiny amax group below
        if num_tokens > 1:
            x[1, :128] = 1e-6
        topk = torch.rand(num_tokens, num_experts, generator=gen).argsort(dim=1)[:, :NUM_TOPK]
        topk = torch.where(torch.rand(num_tokens, NUM_TOPK, generator=gen) < 0.15, -1, topk)
        weights = torch.rand(num_tokens, NUM_TOPK, generator=gen)
        inputs.append((x, topk.to(torch.int64), weights))
    return inputs


def expected_rows(inputs, rank: int, experts_per_rank: int, masked: set[int]):
    """[local expert] -> [source rank] -> sorted list of (token, top-k slot) this rank must receive."""
    rows = [[[] for _ in inputs] for _ in range(experts_per_rank)]
    if rank in masked:
        return rows
    for src, (_, topk, _) in enumerate(inputs):
        if src in masked:
            continue
        for token, slot in (topk // experts_per_rank == rank).nonzero().tolist():
            if topk[token, slot] >= 0:
                rows[int(topk[token, slot]) % experts_per_rank][src].append((token, slot))
    return rows


def expert_output(x_row: torch.Tensor, slot: int) -> torch.Tensor:
    """What the 'expert' returns for a received row: a function of the token and its top-k slot only."""
    return (x_row.float() * (1.0 + slot / 8.0)).to(torch.bfloat16)


def expected_combine(x, topk, weights, masked: set[int], experts_per_rank: int) -> torch.Tensor:
    acc = torch.zeros(x.shape[0], HIDDEN, dtype=torch.float32)
    for token in range(x.shape[0]):
        for slot in range(topk.shape[1]):
            expert = int(topk[token, slot])
            if expert >= 0 and expert // experts_per_rank not in masked:
                acc[token] += weights[token, slot] * expert_output(x[token], slot).float()
    return acc.to(torch.bfloat16)


# ------------------------------------------------------------------------------------------------- checks


def check_dispatch(result, inputs, rank, experts_per_rank, fmt, masked=frozenset(), what=""):
    from deep_ep_py import fp8

    recv_x, recv_scales, recv_count, handle = (t.cpu() if torch.is_tensor(t) else t for t in result[:4])
    use_fp8, round_scale, use_ue8m0 = FORMATS[fmt]
    expected = expected_rows(inputs, rank, experts_per_rank, set(masked))
    cast = [fp8.per_token_cast_to_fp8(x.float(), round_scale, use_ue8m0) if use_fp8 else None for x, _, _ in inputs]
    src_info, src_slot, ranges = handle.src_info.cpu(), handle.src_topk_slot.cpu(), handle.layout_range.cpu()
    for expert in range(experts_per_rank):
        total = sum(len(r) for r in expected[expert])
        assert int(recv_count[expert]) == total, (
            f"{what} rank {rank} expert {expert}: {int(recv_count[expert])} != {total}"
        )
        offset = 0
        for src, rows in enumerate(expected[expert]):
            got_offset, got_count = int(ranges[expert, src]) >> 32, int(ranges[expert, src]) & 0xFFFFFFFF
            assert (got_offset, got_count) == (offset, len(rows)), (
                f"{what} rank {rank} e{expert} src {src}: {(got_offset, got_count)} != {(offset, len(rows))}"
            )
            block = range(offset, offset + len(rows))
            got = sorted((int(src_info[expert, p]), int(src_slot[expert, p]), p) for p in block)
            assert [(t, k) for t, k, _ in got] == rows, f"{what} rank {rank} e{expert} src {src}: rows {got} != {rows}"
            x_src = inputs[src][0]
            for token, _, p in got:
                if not use_fp8:
                    assert torch.equal(recv_x[expert, p], x_src[token]), (
                        f"{what} rank {rank} e{expert} row {p}: payload"
                    )
                    continue
                values, scales = cast[src]
                assert torch.equal(recv_x[expert, p].view(torch.uint8), values[token].view(torch.uint8)), (
                    f"{what} rank {rank} e{expert} row {p}: fp8 bytes differ from deep_ep_py.fp8"
                )
                got_scales = recv_scales[expert, p].contiguous()
                want = scales[token].contiguous()
                assert torch.equal(got_scales.view(torch.int32), want.view(torch.int32)), (
                    f"{what} rank {rank} e{expert} row {p}: scales {got_scales.tolist()} != {want.tolist()}"
                )
            offset += len(rows)


def expert_outputs_for(handle, inputs, experts_per_rank, num_ranks) -> torch.Tensor:
    """bf16 [L, R*M, H]: expert_output of each valid row (found through the handle), poison elsewhere."""
    out = torch.full((experts_per_rank, num_ranks * MAX_TOKENS, HIDDEN), float("nan"), dtype=torch.bfloat16)
    ranges = handle.layout_range.cpu()
    src_info, src_slot = handle.src_info.cpu(), handle.src_topk_slot.cpu()
    for expert in range(experts_per_rank):
        for src in range(num_ranks):
            offset, count = int(ranges[expert, src]) >> 32, int(ranges[expert, src]) & 0xFFFFFFFF
            for p in range(offset, offset + count):
                out[expert, p] = expert_output(inputs[src][0][int(src_info[expert, p])], int(src_slot[expert, p]))
    return out


# ------------------------------------------------------------------------------------------------- setup


def _open_nvshmem(ctx):
    """Batch setup: one NvshmemContext per launch, sized for the kernels' buffer."""
    from deep_ep_py.config import low_latency_rdma_size_hint
    from deep_ep_py.runtime import NvshmemContext

    num_ranks = ctx.num_ranks
    num_bytes = low_latency_rdma_size_hint(MAX_TOKENS, HIDDEN, num_ranks, EXPERTS_PER_RANK * num_ranks)
    return NvshmemContext(ctx.group, num_symmetric_bytes=num_bytes)


def _close_nvshmem(context) -> None:
    """Batch teardown: every case's kernels are destroyed by then (their cleanups). NVSHMEM itself ends here, in
    step on every rank, rather than at the process's exit."""
    from deep_ep_py.runtime import finalize_nvshmem

    context.finalize()
    finalize_nvshmem()


def _setup(ctx, num_experts: int, mask_on_timeout: bool = False):
    """(LowLatencyKernels, ReferenceBackend) over the case's group. The kernels use the batch's NvshmemContext
    (ctx.shared), or one of their own in a launch of their own; cleanups destroy the kernels first, then finalize a
    context of their own."""
    from deep_ep_py import _ext as ext_module
    from deep_ep_py.backends.low_latency import LowLatencyKernels
    from deep_ep_py.backends.reference import ReferenceBackend
    from deep_ep_py.config import low_latency_rdma_size_hint
    from deep_ep_py.runtime import NvshmemContext
    from deep_ep_py.topology import detect_topology

    num_bytes = low_latency_rdma_size_hint(MAX_TOKENS, HIDDEN, ctx.num_ranks, num_experts)
    context = ctx.shared
    if context is None:
        context = NvshmemContext(ctx.resource_group, num_symmetric_bytes=num_bytes)
        ctx.on_cleanup(context.finalize)
    topology = detect_topology(ctx.group, None)
    kernels = LowLatencyKernels(
        ctx.group, topology, num_bytes, ext_module.load_extension(), context, mask_on_timeout=mask_on_timeout
    )
    ctx.on_cleanup(kernels.destroy)  # cleanups run last registered first: before the context's finalize
    return kernels, ReferenceBackend(ctx.group, topology)


def _check_plain_call(ctx, kernels, inputs, what: str) -> None:
    """A bf16 dispatch of every rank's inputs is exact and records no error: the buffer works again (after a
    clean, an un-mask, a timeout)."""
    num_experts = EXPERTS_PER_RANK * ctx.num_ranks
    result = _dispatch(kernels, inputs, ctx.rank, num_experts, "bf16")
    check_dispatch(result, inputs, ctx.rank, EXPERTS_PER_RANK, "bf16", what=what)
    kernels.check_device_errors(what)


def _dispatch(backend, inputs, rank, num_experts, fmt, hook=False, stats=None, wait_stats=None):
    x, topk = (on_kernel_device(t) for t in inputs[rank][:2])
    use_fp8, round_scale, use_ue8m0 = FORMATS[fmt]
    result = backend.low_latency_dispatch(
        x, topk, MAX_TOKENS, num_experts, stats, wait_stats, use_fp8, round_scale, use_ue8m0, hook
    )
    if hook:
        result[4]()
    ep_device.synchronize()
    return result


# ------------------------------------------------------------------------------------------------- workers


def _against_reference_case(ctx, fmt: str, hook: bool, zero_copy: bool) -> None:
    rank, num_ranks = ctx.rank, ctx.num_ranks
    num_experts = EXPERTS_PER_RANK * num_ranks
    kernels, reference = _setup(ctx, num_experts)
    stats = torch.zeros(EXPERTS_PER_RANK, dtype=torch.int32, device=ep_device.kernel_device())
    wait_stats = torch.zeros(num_ranks, dtype=torch.int64, device=ep_device.kernel_device())
    expected_stats = [0] * EXPERTS_PER_RANK
    started_ns = time.monotonic_ns()
    for seed in range(3):
        inputs = make_inputs(100 + seed, num_ranks, num_experts, empty_rank=seed % num_ranks)
        waited_before = wait_stats.cpu()
        ours = _dispatch(kernels, inputs, rank, num_experts, fmt, hook=hook, stats=stats, wait_stats=wait_stats)
        theirs = _dispatch(reference, inputs, rank, num_experts, fmt)
        check_dispatch(ours, inputs, rank, EXPERTS_PER_RANK, fmt, what=f"kernels seed {seed}")
        for expert, per_src in enumerate(expected_rows(inputs, rank, EXPERTS_PER_RANK, set())):
            expected_stats[expert] += sum(len(rows) for rows in per_src)
        # Nanoseconds waited for each source's count, added up over the calls and (as in DeepEP) over the local
        # experts, each of which waits for it: never less than before, never more than the time passed per expert.
        waited = wait_stats.cpu()
        bound = (time.monotonic_ns() - started_ns) * EXPERTS_PER_RANK
        assert bool(((waited >= waited_before) & (waited <= bound)).all()), (waited.tolist(), bound)
        check_dispatch(theirs, inputs, rank, EXPERTS_PER_RANK, fmt, what=f"reference seed {seed}")
        assert torch.equal(ours[2].cpu(), theirs[2].cpu()) and torch.equal(
            ours[3].layout_range.cpu(), theirs[3].layout_range.cpu()
        )

        x, topk, weights = inputs[rank]
        want = expected_combine(x, topk, weights, set(), EXPERTS_PER_RANK)
        outs = []
        for backend, result in ((kernels, ours), (reference, theirs)):
            handle = result[3]
            expert_x = on_kernel_device(expert_outputs_for(handle, inputs, EXPERTS_PER_RANK, num_ranks))
            out = torch.full((x.shape[0], HIDDEN), float("nan"), dtype=torch.bfloat16, device=ep_device.kernel_device())
            use_zero_copy = zero_copy and backend is kernels
            if use_zero_copy:
                kernels.next_combine_buffer(handle, ep_device.kernel_device()).copy_(expert_x)
            combined, combine_hook = backend.low_latency_combine(
                expert_x, on_kernel_device(topk), on_kernel_device(weights), handle, use_zero_copy, hook, out, None
            )
            combine_hook()
            ep_device.synchronize()
            assert combined.data_ptr() == out.data_ptr()
            outs.append(combined.cpu())
        for name, got in zip(("kernels", "reference"), outs):
            torch.testing.assert_close(
                got.float(),
                want.float(),
                rtol=COMBINE_TOL,
                atol=COMBINE_TOL,
                msg=lambda m, name=name, seed=seed: f"{name} rank {rank} seed {seed}: {m}",
            )
    # cumulative_local_expert_recv_stats: each local expert's received rows, added up over the calls.
    assert stats.tolist() == expected_stats, (stats.tolist(), expected_stats)
    kernels.check_device_errors("test end")


def _hook_outlives_results_case(ctx) -> None:
    """A caller may drop a hooked call's results and keep only the hook (DeepEP's hook holds them): hook() must still
    write into those results' memory, not into tensors allocated since (bystanders, same sizes, poisoned)."""
    rank, num_ranks = ctx.rank, ctx.num_ranks
    num_experts = EXPERTS_PER_RANK * num_ranks
    kernels, _ = _setup(ctx, num_experts)
    device = ep_device.kernel_device()

    def check_bystanders_after(hook, sizes, what):
        bystanders = [torch.full((n,), 0x5A, dtype=torch.uint8, device=device) for n in sizes for _ in range(4)]
        hook()
        ep_device.synchronize()
        for bystander in bystanders:
            changed = int((bystander != 0x5A).sum())
            assert changed == 0, f"rank {rank} {what}: hook() wrote {changed} bytes of a tensor allocated after it"

    for seed, fmt in enumerate(("bf16", "fp8")):
        inputs = make_inputs(500 + seed, num_ranks, num_experts)
        x, topk, weights = (on_kernel_device(t) for t in inputs[rank])
        use_fp8, round_scale, use_ue8m0 = FORMATS[fmt]
        result = kernels.low_latency_dispatch(
            x, topk, MAX_TOKENS, num_experts, None, None, use_fp8, round_scale, use_ue8m0, True
        )
        hook = result[4]
        sizes = [t.numel() * t.element_size() for t in (result[0], result[1], result[2]) if t is not None]
        del result
        check_bystanders_after(hook, sizes, f"{fmt} dispatch")

        result = _dispatch(kernels, inputs, rank, num_experts, fmt)
        expert_x = on_kernel_device(expert_outputs_for(result[3], inputs, EXPERTS_PER_RANK, num_ranks))
        combined, hook = kernels.low_latency_combine(expert_x, topk, weights, result[3], False, True, None, None)
        sizes = [combined.numel() * combined.element_size()]
        del combined, result, expert_x
        check_bystanders_after(hook, sizes, f"{fmt} combine")
    kernels.check_device_errors("test end")


def _two_in_flight_case(ctx, fmt: str) -> None:
    """Two batches' calls outstanding at once, as SGLang's two-batch overlap and DeepEP's double buffer allow: both
    dispatches send before either receives, then both combines likewise; each call has a half of the buffer to
    itself, so every result must be exact. The hooks run in call order, then (second round) in reverse. Between the
    phases every rank waits for the others: a combine reuses its dispatch's half, and the contract is at most two
    calls pending on any rank, a slow peer's unreceived dispatches included."""
    rank, num_ranks = ctx.rank, ctx.num_ranks
    num_experts = EXPERTS_PER_RANK * num_ranks
    kernels, _ = _setup(ctx, num_experts)
    use_fp8, round_scale, use_ue8m0 = FORMATS[fmt]
    for round_idx, order in enumerate(((0, 1), (1, 0))):
        batches = [make_inputs(700 + 2 * round_idx + b, num_ranks, num_experts, empty_rank=b) for b in range(2)]
        on_device = [[on_kernel_device(t) for t in inputs[rank]] for inputs in batches]
        sent = [
            kernels.low_latency_dispatch(
                x, topk, MAX_TOKENS, num_experts, None, None, use_fp8, round_scale, use_ue8m0, True
            )
            for x, topk, _ in on_device
        ]
        for b in order:
            sent[b][4]()
        ep_device.synchronize()
        ctx.barrier()
        for b, inputs in enumerate(batches):
            check_dispatch(sent[b], inputs, rank, EXPERTS_PER_RANK, fmt, what=f"in flight, batch {b}, order {order}")
        combining = []
        for b, inputs in enumerate(batches):
            expert_x = on_kernel_device(expert_outputs_for(sent[b][3], inputs, EXPERTS_PER_RANK, num_ranks))
            _, topk, weights = on_device[b]
            combining.append(kernels.low_latency_combine(expert_x, topk, weights, sent[b][3], False, True, None, None))
        for b in order:
            combining[b][1]()
        ep_device.synchronize()
        ctx.barrier()
        for b, inputs in enumerate(batches):
            x, topk, weights = inputs[rank]
            want = expected_combine(x, topk, weights, set(), EXPERTS_PER_RANK)
            torch.testing.assert_close(
                combining[b][0].cpu().float(),
                want.float(),
                rtol=COMBINE_TOL,
                atol=COMBINE_TOL,
                msg=lambda m, b=b, order=order: f"rank {rank} in flight, combine of batch {b}, order {order}: {m}",
            )
    kernels.check_device_errors("two calls in flight")


# name -> (hidden, top-k, experts per rank, tokens per rank, format): the decode shape's hidden with top-k 16, and
# the smallest hidden each format allows; few tokens, so that the emulator gets through them.
SHAPES = {
    "h7168_top16_fp8": (7168, 16, 8, 6, "fp8"),
    "h7168_top16_bf16": (7168, 16, 8, 3, "bf16"),
    "h128_top1_fp8": (128, 1, 1, 5, "fp8"),
    "h512_top12_ue8m0": (512, 12, 6, 4, "fp8_ue8m0"),
}


def _shape_case(ctx, shape: str) -> None:
    """Sizes besides the module's: dispatch, then the received rows themselves (dequantised for fp8) combined back:
    combined[t] = x[t] as each format keeps it, times the sum of its kept weights."""
    from deep_ep_py import fp8
    from deep_ep_py.backends.low_latency import LowLatencyKernels
    from deep_ep_py.config import low_latency_rdma_size_hint
    from deep_ep_py.topology import detect_topology

    rank, num_ranks = ctx.rank, ctx.num_ranks
    hidden, num_topk, experts_per_rank, max_tokens, fmt = SHAPES[shape]
    num_experts = experts_per_rank * num_ranks
    use_fp8, round_scale, use_ue8m0 = FORMATS[fmt]
    num_bytes = low_latency_rdma_size_hint(max_tokens, hidden, num_ranks, num_experts)
    topology = detect_topology(ctx.group, None)
    from deep_ep_py import _ext as ext_module
    from deep_ep_py.runtime import NVSHMEM_DEFAULT_SYMMETRIC_BYTES, NvshmemContext

    # The batch's context when there is one (its heap is at least NVSHMEM's default, far more than these shapes).
    context = ctx.shared
    assert num_bytes < NVSHMEM_DEFAULT_SYMMETRIC_BYTES // 2, num_bytes
    if context is None:
        context = NvshmemContext(ctx.resource_group, num_symmetric_bytes=num_bytes)
        ctx.on_cleanup(context.finalize)
    kernels = LowLatencyKernels(ctx.group, topology, num_bytes, ext_module.load_extension(), context)
    ctx.on_cleanup(kernels.destroy)
    device = ep_device.kernel_device()
    gen = torch.Generator().manual_seed(900 + rank)
    for step in range(2):
        num_tokens = max_tokens if step == 0 else (rank * 3) % (max_tokens + 1)  # rank 0 then sends nothing
        x = (torch.randn(num_tokens, hidden, generator=gen) * 2).to(torch.bfloat16)
        topk = torch.rand(num_tokens, num_experts, generator=gen).argsort(dim=1)[:, :num_topk]
        topk = torch.where(torch.rand(num_tokens, num_topk, generator=gen) < 0.1, -1, topk)
        weights = torch.rand(num_tokens, num_topk, generator=gen)
        recv_x, recv_scales, recv_count, handle, _ = kernels.low_latency_dispatch(
            x.to(device), topk.to(device), max_tokens, num_experts, None, None, use_fp8, round_scale, use_ue8m0, False
        )
        ep_device.synchronize()
        want_counts = [int((topk == rank * experts_per_rank + e).sum()) for e in range(experts_per_rank)]
        assert recv_count.tolist() == [c for c in _all_ranks_counts(ctx, topk, rank, experts_per_rank)], (
            f"rank {rank} {shape} {fmt}: recv_count {recv_count.tolist()} (own tokens alone: {want_counts})"
        )
        if use_fp8:
            expert_x = torch.stack(
                [fp8.per_token_cast_back(recv_x[e], recv_scales[e]) for e in range(experts_per_rank)]
            ).to(torch.bfloat16)
            x_kept = fp8.per_token_cast_back(*fp8.per_token_cast_to_fp8(x.float(), round_scale, use_ue8m0))
        else:
            expert_x, x_kept = recv_x, x.float()
        combined, _ = kernels.low_latency_combine(
            expert_x.contiguous(), topk.to(device), weights.to(device), handle, False, False, None, None
        )
        ep_device.synchronize()
        want = (x_kept.to(torch.bfloat16).float() * (weights * (topk >= 0)).sum(1, keepdim=True)).to(torch.bfloat16)
        torch.testing.assert_close(
            combined.cpu().float(),
            want.float(),
            rtol=COMBINE_TOL,
            atol=COMBINE_TOL,
            msg=lambda m, step=step: f"rank {rank} {shape} {fmt} step {step}: {m}",
        )
    kernels.check_device_errors(f"{shape} {fmt}")


def _all_ranks_counts(ctx, topk: torch.Tensor, rank: int, experts_per_rank: int) -> list[int]:
    """Rows each local expert of `rank` receives: its ids in every rank's topk (collective, over the case's group)."""
    import torch.distributed as dist

    num_experts = experts_per_rank * ctx.num_ranks
    per_expert = torch.bincount(topk[topk >= 0].flatten(), minlength=num_experts)
    dist.all_reduce(per_expert, group=ctx.group)
    return per_expert[rank * experts_per_rank : (rank + 1) * experts_per_rank].tolist()


def _round_trip_check(x_gpu, topk_gpu, weights_gpu, combined, masked_ranks=()) -> None:
    """Identity experts (combine x = dispatch recv_x): combined[t] = x[t] * sum of its summed weights."""
    valid = topk_gpu >= 0
    for r in masked_ranks:
        valid &= topk_gpu // EXPERTS_PER_RANK != r
    want = (x_gpu.float() * (weights_gpu * valid).sum(1, keepdim=True)).to(torch.bfloat16)
    torch.testing.assert_close(combined.float(), want.float(), rtol=COMBINE_TOL, atol=COMBINE_TOL)


def _repeat_and_graph_case(ctx, num_iters: int, with_graph: bool = True) -> None:
    """num_iters eager round trips on fresh data, then (with_graph: GPU only, the emulator has no CUDA graphs) one
    round trip captured in a CUDA graph and replayed num_iters times with fresh data copied in."""
    rank, num_ranks = ctx.rank, ctx.num_ranks
    num_experts = EXPERTS_PER_RANK * num_ranks
    kernels, _ = _setup(ctx, num_experts)
    device = ep_device.kernel_device()
    gen = torch.Generator(device=device).manual_seed(rank)

    def fresh(num_tokens):
        x = torch.randn(num_tokens, HIDDEN, device=device, generator=gen).to(torch.bfloat16)
        topk = torch.rand(num_tokens, num_experts, device=device, generator=gen).argsort(dim=1)[:, :NUM_TOPK]
        topk = torch.where(torch.rand(num_tokens, NUM_TOPK, device=device, generator=gen) < 0.15, -1, topk)
        return x, topk.contiguous(), torch.rand(num_tokens, NUM_TOPK, device=device, generator=gen)

    def round_trip(x, topk, weights, out, hook):
        recv_x, _, _, handle, dispatch_hook = kernels.low_latency_dispatch(
            x, topk, MAX_TOKENS, num_experts, None, None, False, False, False, hook
        )
        dispatch_hook()
        combined, combine_hook = kernels.low_latency_combine(recv_x, topk, weights, handle, False, hook, out, None)
        combine_hook()
        return combined

    # Repeated calls, eager: fresh data and token counts each time, out poisoned first.
    for i in range(num_iters):
        x, topk, weights = fresh(int(torch.randint(0, MAX_TOKENS + 1, (1,))) if i % 7 else MAX_TOKENS)
        out = torch.full_like(x, float("nan"))
        combined = round_trip(x, topk, weights, out, hook=i % 2 == 1)
        _round_trip_check(x, topk, weights, combined)
    kernels.check_device_errors("eager repeats")
    if not with_graph:
        return

    # CUDA graphs: one round trip captured without hooks and one with them (the hooks' receives inside the graph),
    # on the same static tensors; replayed alternately with fresh data copied in, several replays back to back
    # before their outputs are checked (a clone of each on the stream, no host sync in between), and an eager round
    # trip now and then between replays (graph and eager calls keep the halves alternating).
    static_x, static_topk, static_weights = fresh(MAX_TOKENS)
    static_out = torch.empty_like(static_x)
    round_trip(static_x, static_topk, static_weights, static_out, hook=False)  # warm-up: workspace, pools
    ep_device.synchronize()
    graphs = []
    for hook in (False, True):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            round_trip(static_x, static_topk, static_weights, static_out, hook=hook)
        graphs.append(graph)
    pending = []
    for i in range(num_iters):
        x, topk, weights = fresh(MAX_TOKENS)
        static_x.copy_(x)
        static_topk.copy_(topk)
        static_weights.copy_(weights)
        static_out.fill_(float("nan"))
        graphs[i % 2].replay()
        pending.append((x, topk, weights, static_out.clone()))
        if i % 25 == 24:
            x, topk, weights = fresh(int(torch.randint(0, MAX_TOKENS + 1, (1,))))
            out = torch.full_like(x, float("nan"))
            _round_trip_check(x, topk, weights, round_trip(x, topk, weights, out, hook=i % 2 == 1))
        if len(pending) == 8 or i == num_iters - 1:
            for x, topk, weights, out in pending:
                _round_trip_check(x, topk, weights, out)
            pending.clear()
    ep_device.synchronize()
    kernels.check_device_errors("graph replays")
    del graphs


def _mask_case(ctx) -> None:
    """The last rank 'dies' (makes no low-latency call); the others mask it and keep working."""
    rank, num_ranks = ctx.rank, ctx.num_ranks
    num_experts = EXPERTS_PER_RANK * num_ranks
    kernels, _ = _setup(ctx, num_experts)
    victim = num_ranks - 1
    if rank != victim:
        kernels.update_mask(victim, True)
        status = torch.empty(num_ranks, dtype=torch.int32, device=ep_device.kernel_device())
        kernels.query_mask(status)
        assert status.tolist() == [int(r == victim) for r in range(num_ranks)], status.tolist()
        for seed in range(4):
            inputs = make_inputs(300 + seed, num_ranks, num_experts, empty_rank=None)
            result = _dispatch(kernels, inputs, rank, num_experts, "fp8", hook=bool(seed % 2))
            check_dispatch(result, inputs, rank, EXPERTS_PER_RANK, "fp8", masked={victim}, what=f"masked seed {seed}")
            x, topk, weights = inputs[rank]
            expert_x = on_kernel_device(expert_outputs_for(result[3], inputs, EXPERTS_PER_RANK, num_ranks))
            combined, _ = kernels.low_latency_combine(
                expert_x, on_kernel_device(topk), on_kernel_device(weights), result[3], False, False, None, None
            )
            ep_device.synchronize()
            want = expected_combine(x, topk, weights, {victim}, EXPERTS_PER_RANK)
            torch.testing.assert_close(combined.cpu().float(), want.float(), rtol=COMBINE_TOL, atol=COMBINE_TOL)
        kernels.check_device_errors("masked calls")
    ctx.barrier()
    # Everyone back: un-mask, then clean (its barrier waits for the unmasked ranks only, so the victim counts again
    # only once un-masked), then a normal call works. Until that clean the kernels still skip the victim (a CUDA
    # graph's replays, which the host does not refuse, must not read a signal it left while masked), while the
    # query shows the mask the host set.
    kernels.clean_mask()
    status = torch.full((num_ranks,), -1, dtype=torch.int32, device=ep_device.kernel_device())
    kernels.query_mask(status)
    assert status.tolist() == [0] * num_ranks, f"rank {rank}: mask after clean_mask {status.tolist()}"
    want_device = [int(rank != victim and r == victim) for r in range(num_ranks)]
    assert kernels.rank_mask.tolist() == want_device, f"rank {rank}: device mask {kernels.rank_mask.tolist()}"
    kernels.clean_low_latency_buffer(num_experts)
    assert kernels.rank_mask.tolist() == [0] * num_ranks, f"rank {rank}: device mask after the clean"
    _check_plain_call(ctx, kernels, make_inputs(400, num_ranks, num_experts), "after unmask")


def _expert_id_out_of_range_case(ctx) -> None:
    """Expert ids outside [-1, E) that reach the kernels unchecked (Buffer checks them on the host, except under
    CUDA-graph capture or DEEP_EP_PY_SKIP_VALUE_CHECKS): the kernels skip the choice as if it were -1, instead of
    indexing past their arrays and the peers, and record it for a DeepEPError naming the id, the token and the rank
    at the next check. Every other row and sum is exact, and the buffer stays in step for the next call."""
    from deep_ep_py.errors import DeepEPError, DeepEPTimeoutError

    rank, num_ranks = ctx.rank, ctx.num_ranks
    num_experts = EXPERTS_PER_RANK * num_ranks
    kernels, _ = _setup(ctx, num_experts)
    clean = make_inputs(500, num_ranks, num_experts, empty_rank=None)
    bad_dispatch_id, bad_combine_id = num_experts + 3, -7
    # Rank 0's token 0 picks an expert past the last one at dispatch (slot 0); what every rank must see is a -1.
    x, topk, weights = clean[0]
    sent_topk, seen_topk = topk.clone(), topk.clone()
    sent_topk[0, 0], seen_topk[0, 0] = bad_dispatch_id, -1
    clean[0] = (x, seen_topk, weights)
    inputs = [(x, sent_topk, weights), *clean[1:]]

    def expect_record(what: str, site: str, bad_id: int) -> None:
        try:
            kernels.check_device_errors(what)
        except DeepEPTimeoutError:
            raise
        except DeepEPError as exc:
            message = str(exc)
        else:
            message = ""
        if rank != 0:
            assert message == "", f"rank {rank} {what}: unexpected device error {message!r}"
            return
        want = f"{site}: expected expert ids in [-1, {num_experts}) (-1 = none), got {bad_id} (token 0, on rank 0"
        assert want in message, f"rank 0 {what}: expected {want!r}, got {message!r}"

    result = _dispatch(kernels, inputs, rank, num_experts, "bf16")
    expect_record("the dispatch", "topk_idx of low_latency_dispatch", bad_dispatch_id)
    check_dispatch(result, clean, rank, EXPERTS_PER_RANK, "bf16", what="past the last expert")

    # The combine's own topk_idx: token 0's slot 0 (not dispatched) as -7, out of range the other way.
    x, topk, weights = clean[rank]
    combine_topk = topk.clone()
    if rank == 0:
        combine_topk[0, 0] = bad_combine_id
    expert_x = on_kernel_device(expert_outputs_for(result[3], clean, EXPERTS_PER_RANK, num_ranks))
    combined, _ = kernels.low_latency_combine(
        expert_x, on_kernel_device(combine_topk), on_kernel_device(weights), result[3], False, False, None, None
    )
    ep_device.synchronize()
    expect_record("the combine", "topk_idx of low_latency_combine", bad_combine_id)
    want = expected_combine(x, topk, weights, set(), EXPERTS_PER_RANK)
    torch.testing.assert_close(combined.cpu().float(), want.float(), rtol=COMBINE_TOL, atol=COMBINE_TOL)

    # The next call, with ids in range, on every rank: nothing was left out of step.
    again = make_inputs(501, num_ranks, num_experts)
    check_dispatch(_dispatch(kernels, again, rank, num_experts, "fp8"), again, rank, EXPERTS_PER_RANK, "fp8")
    kernels.check_device_errors("the call after")


def _same_half_twice_case(ctx) -> None:
    """Two calls in a row on one buffer half, as replays of a CUDA graph that captured an odd number of calls make
    (here by setting the host's half back, with every rank in step so that nothing races): the kernels record it and
    the next check raises DeepEPError saying what to capture, on every rank. After clean_low_latency_buffer the
    calls start over on half 0 without a report."""
    from deep_ep_py.errors import DeepEPError

    rank, num_ranks = ctx.rank, ctx.num_ranks
    num_experts = EXPERTS_PER_RANK * num_ranks
    kernels, _ = _setup(ctx, num_experts)
    inputs = make_inputs(600, num_ranks, num_experts)
    for call in range(2):
        half = kernels.buffer_idx
        result = _dispatch(kernels, inputs, rank, num_experts, "bf16")
        check_dispatch(result, inputs, rank, EXPERTS_PER_RANK, "bf16", what=f"call {call} on half {half}")
        ctx.barrier()
        kernels.buffer_idx = half  # the next call on the same half
    try:
        kernels.check_device_errors("the second call on half 0")
    except DeepEPError as exc:
        want = f"two low-latency calls in a row used buffer half 0 on rank {rank}: a CUDA graph replays"
        assert want in str(exc), f"rank {rank}: expected {want!r}, got {exc}"
    else:
        raise AssertionError(f"rank {rank}: two calls in a row on half 0 went unreported")
    kernels.clean_low_latency_buffer(num_experts)
    for fmt in ("fp8", "bf16"):
        check_dispatch(_dispatch(kernels, inputs, rank, num_experts, fmt), inputs, rank, EXPERTS_PER_RANK, fmt)
    kernels.check_device_errors("the calls after the clean")


def _host_refusals_case(ctx) -> None:
    """What the host refuses leaves the buffer as it was, on every rank:
    - a combine whose `out` it refuses (misaligned) takes no buffer half: the calls after it alternate as before,
      with no same-half report and exact results;
    - the first call with a new num_experts cannot be captured in a CUDA graph (the graph would hold, not run, the
      zero-fill of its counters): refused, naming clean_low_latency_buffer, which makes them;
    - a hook called after destroy() raises instead of launching on the freed buffer."""
    from deep_ep_py.backends import low_latency as low_latency_module
    from deep_ep_py.errors import DeepEPError

    rank, num_ranks = ctx.rank, ctx.num_ranks
    num_experts = EXPERTS_PER_RANK * num_ranks
    kernels, _ = _setup(ctx, num_experts)
    inputs = make_inputs(700, num_ranks, num_experts, empty_rank=None)  # every rank has an `out` to refuse
    x, topk, weights = (on_kernel_device(t) for t in inputs[rank])
    for call in range(2):
        result = _dispatch(kernels, inputs, rank, num_experts, "bf16")
        check_dispatch(result, inputs, rank, EXPERTS_PER_RANK, "bf16", what=f"dispatch {call}")
        recv_x, handle = result[0], result[3]
        if call == 0:
            half = kernels.buffer_idx
            storage = torch.empty(topk.shape[0] * HIDDEN + 1, dtype=torch.bfloat16, device=recv_x.device)
            misaligned = storage[1:].view(topk.shape[0], HIDDEN)
            try:
                kernels.low_latency_combine(recv_x, topk, weights, handle, False, False, misaligned, None)
            except ValueError as exc:
                assert "out: expected a 16-byte aligned tensor" in str(exc), str(exc)
            else:
                raise AssertionError(f"rank {rank}: a misaligned out was taken")
            assert kernels.buffer_idx == half, f"rank {rank}: the refused combine took buffer half {half}"
        combined, _ = kernels.low_latency_combine(recv_x, topk, weights, handle, False, False, None, None)
        ep_device.synchronize()
        _round_trip_check(x, topk, weights, combined)
        kernels.check_device_errors(f"round trip {call}")

    def capturing() -> bool:
        return True

    real_capturing = low_latency_module.is_current_stream_capturing
    low_latency_module.is_current_stream_capturing = capturing
    try:
        kernels._workspace("low_latency_dispatch", num_experts)  # made by the calls above: capturable
        try:
            kernels._workspace("low_latency_dispatch", 2 * num_experts)
        except DeepEPError as exc:
            assert f"clean_low_latency_buffer(M, H, {2 * num_experts}), before the capture" in str(exc), str(exc)
        else:
            raise AssertionError(f"rank {rank}: the first call with a new num_experts was let into a capture")
    finally:
        low_latency_module.is_current_stream_capturing = real_capturing
    kernels.clean_low_latency_buffer(2 * num_experts)
    low_latency_module.is_current_stream_capturing = capturing
    try:
        kernels._workspace("low_latency_dispatch", 2 * num_experts)
    finally:
        low_latency_module.is_current_stream_capturing = real_capturing

    hook = kernels.low_latency_dispatch(x, topk, MAX_TOKENS, num_experts, None, None, False, False, False, True)[4]
    ep_device.synchronize()
    ctx.barrier()  # every rank's sends have landed before any rank frees its buffer
    kernels.destroy()
    try:
        hook()
    except DeepEPError as exc:
        assert "the Buffer was destroyed before hook() ran" in str(exc), str(exc)
    else:
        raise AssertionError(f"rank {rank}: a hook ran on a destroyed buffer")


def _shape_mismatch_case(ctx) -> None:
    """Ranks whose calls differ in M or in format lay rows out differently: each signal carries its sender's shape,
    so every rank that gets one of another shape drops that peer's rows, and the next check raises DeepEPError on
    every rank, naming the peer (the last rank's: every other rank receives from it). clean_low_latency_buffer then
    starts over."""
    from deep_ep_py.errors import DeepEPError

    rank, num_ranks = ctx.rank, ctx.num_ranks
    num_experts = EXPERTS_PER_RANK * num_ranks
    odd = num_ranks - 1
    kernels, _ = _setup(ctx, num_experts)
    inputs = make_inputs(800, num_ranks, num_experts, empty_rank=None)
    x, topk, _ = (on_kernel_device(t) for t in inputs[rank])
    half_max = MAX_TOKENS // 2
    x, topk = x[:half_max], topk[:half_max]
    for differs in ("M", "format"):
        max_tokens = half_max if differs == "M" and rank == odd else MAX_TOKENS
        use_fp8 = differs == "format" and rank == odd
        kernels.low_latency_dispatch(x, topk, max_tokens, num_experts, None, None, use_fp8, False, False, False)
        ep_device.synchronize()
        message = ""
        try:
            kernels.check_device_errors(f"the call where {differs} differs")
        except DeepEPError as exc:
            message = str(exc)
        assert "sent with another num_max_dispatch_tokens_per_rank, hidden, num_experts or FP8 format" in message, (
            f"rank {rank}, {differs} differs on rank {odd}: {message!r}"
        )
        if rank != odd:
            assert f"rank {odd} sent with another" in message, message
        ctx.barrier()
        kernels.clean_low_latency_buffer(num_experts)
    _check_plain_call(ctx, kernels, inputs, "after the clean")


def _timeout_case(ctx) -> str:
    from deep_ep_py.errors import DeepEPTimeoutError

    rank, num_ranks = ctx.rank, ctx.num_ranks
    num_experts = EXPERTS_PER_RANK * num_ranks
    kernels, _ = _setup(ctx, num_experts)
    missing = num_ranks - 1
    message = ""
    if rank != missing:
        inputs = make_inputs(500, num_ranks, num_experts)
        x, topk, _ = inputs[rank]
        kernels.low_latency_dispatch(
            on_kernel_device(x), on_kernel_device(topk), MAX_TOKENS, num_experts, None, None, True, False, False, False
        )
        ep_device.synchronize()  # the receive kernel gives up after DEEP_EP_PY_TIMEOUT_S
        message = _recorded_timeout(kernels, rank, missing, "low-latency dispatch receiver")
        # The host raised, but the record's timed_out word stays: the next call (the peer still missing), as any
        # kernel queued behind the one that timed out, gives up at once instead of waiting out the limit again,
        # and says so at the check after it.
        started = time.monotonic()
        kernels.low_latency_dispatch(
            on_kernel_device(x), on_kernel_device(topk), MAX_TOKENS, num_experts, None, None, True, False, False, False
        )
        ep_device.synchronize()
        elapsed = time.monotonic() - started
        # Whichever wait gave up first is named (a live peer's signal may not have come yet either).
        drained = ""
        try:
            kernels.check_device_errors("the call after the timeout")
        except DeepEPTimeoutError as exc:
            drained = str(exc)
        assert f"device wait on rank {rank}, channel " in drained, drained
        assert "gave up at once: an earlier device wait of this rank timed out" in drained, drained
        assert elapsed < 1.0, f"rank {rank}: the call after a timeout waited {elapsed:.2f} s (the limit is 2 s)"
    ctx.barrier()
    kernels.clean_low_latency_buffer(num_experts)
    if rank != missing:
        kernels.check_device_errors("after clean_low_latency_buffer")  # the clean cleared timed_out too
    return message


def _recorded_timeout(kernels, rank: int, missing: int, wait: str) -> str:
    """The DeepEPTimeoutError the kernels recorded, which must name this rank, the missing one as the channel, and
    the wait (csrc/runtime/error_record.cu: "device wait timed out on rank R, channel C, waiting for <site> ...")."""
    from deep_ep_py.errors import DeepEPTimeoutError

    message = ""
    try:
        kernels.check_device_errors("test")
    except DeepEPTimeoutError as exc:
        message = str(exc)
    assert f"on rank {rank}, channel {missing}," in message and wait in message, message
    return message


def _combine_timeout_case(ctx) -> str:
    """Every rank dispatches; the last never combines: the others' combine receive gives up after
    DEEP_EP_PY_TIMEOUT_S, naming the waiting rank and, as the channel, the expert rank whose rows never came."""
    rank, num_ranks = ctx.rank, ctx.num_ranks
    num_experts = EXPERTS_PER_RANK * num_ranks
    kernels, _ = _setup(ctx, num_experts)
    missing = num_ranks - 1
    # The first seed from 510 whose routing sends every other rank's tokens to the missing rank somewhere (every rank
    # draws all ranks' inputs, so all pick the same seed): each of them then waits for rows that never come.
    seed = 510
    while True:
        inputs = make_inputs(seed, num_ranks, num_experts, empty_rank=None)
        if all(bool((topk // EXPERTS_PER_RANK == missing).any()) for _, topk, _ in inputs[:missing]):
            break
        seed += 1
    result = _dispatch(kernels, inputs, rank, num_experts, "bf16")
    ctx.barrier()
    message = ""
    if rank != missing:
        _, topk, weights = (on_kernel_device(t) for t in inputs[rank])
        kernels.low_latency_combine(result[0], topk, weights, result[3], False, False, None, None)
        ep_device.synchronize()
        message = _recorded_timeout(kernels, rank, missing, "low-latency combine receiver")
    ctx.barrier()
    kernels.clean_low_latency_buffer(num_experts)
    return message


def _shrink_case(ctx) -> list[int]:
    """enable_shrink, as DeepEP's shrink test: ranks 'die' (make no more low-latency calls) at their first
    dispatch, combine or clean. The others' waits for a dead rank time out (DEEP_EP_PY_TIMEOUT_S=2) and mask it
    instead of raising; their results then equal those of a call with that rank masked beforehand, and the clean's
    barrier waits only for the ranks left. Returns this rank's mask at the end ([] on the dead)."""
    rank, num_ranks = ctx.rank, ctx.num_ranks
    num_experts = EXPERTS_PER_RANK * num_ranks
    kernels, _ = _setup(ctx, num_experts, mask_on_timeout=True)
    # The last rank dies at dispatch; with 4 ranks, rank 1 at combine and rank 2 at clean.
    dies_at = {num_ranks - 1: "dispatch"}
    if num_ranks >= 4:
        dies_at.update({1: "combine", 2: "clean"})
    dead: set[int] = set()
    status = torch.empty(num_ranks, dtype=torch.int32, device=ep_device.kernel_device())

    def mask_now() -> set[int]:
        kernels.query_mask(status)
        return {r for r, m in enumerate(status.tolist()) if m}

    for step, api in enumerate(("dispatch", "combine", "clean", "dispatch", "combine")):
        # Ranks that die at this api drop out before making it: the others must find out on their own.
        dead |= {r for r, at in dies_at.items() if at == api}
        if rank in dead:
            break
        if api == "dispatch":
            inputs = make_inputs(700 + step, num_ranks, num_experts, empty_rank=None)
            result = _dispatch(kernels, inputs, rank, num_experts, "fp8")
            check_dispatch(result, inputs, rank, EXPERTS_PER_RANK, "fp8", masked=dead, what=f"step {step}")
        elif api == "combine":
            x, topk, weights = inputs[rank]
            expert_x = on_kernel_device(expert_outputs_for(result[3], inputs, EXPERTS_PER_RANK, num_ranks))
            out = torch.full((x.shape[0], HIDDEN), float("nan"), dtype=torch.bfloat16, device=expert_x.device)
            combined, _ = kernels.low_latency_combine(
                expert_x, on_kernel_device(topk), on_kernel_device(weights), result[3], False, False, out, None
            )
            ep_device.synchronize()
            want = expected_combine(x, topk, weights, dead, EXPERTS_PER_RANK)
            torch.testing.assert_close(combined.cpu().float(), want.float(), rtol=COMBINE_TOL, atol=COMBINE_TOL)
        else:
            kernels.clean_low_latency_buffer(num_experts)
        # Masked by the waits that timed out, not by hand; and no error to raise.
        assert mask_now() == dead, f"rank {rank} after {api} (step {step}): mask {sorted(mask_now())} != {sorted(dead)}"
        kernels.check_device_errors(f"shrink step {step}")
    if rank in dead:
        # Alive after all: it waits (on the host, with gloo's long timeout) for the others, since freeing the
        # buffers is collective and NVSHMEM's barrier there has DEEP_EP_PY_TIMEOUT_S.
        ctx.barrier()
        return []
    # A masked rank costs no more waiting: the next round trip takes well under the 2 s timeout.
    inputs = make_inputs(790, num_ranks, num_experts, empty_rank=None)
    started = time.monotonic()
    result = _dispatch(kernels, inputs, rank, num_experts, "bf16")
    elapsed = time.monotonic() - started
    check_dispatch(result, inputs, rank, EXPERTS_PER_RANK, "bf16", masked=dead, what="after the deaths")
    assert elapsed < 1.5, f"rank {rank}: a dispatch with every dead rank masked took {elapsed:.2f} s"
    kernels.check_device_errors("after the deaths")
    final_mask = sorted(mask_now())
    ctx.barrier()
    return final_mask


def _clean_timeout_case(ctx) -> str:
    """The last rank comes late to clean_low_latency_buffer: without enable_shrink the others' clean raises
    DeepEPTimeoutError after DEEP_EP_PY_TIMEOUT_S naming it, instead of waiting at a host barrier for the group's
    own timeout (30 minutes by default); the late rank's clean then raises too, and a retry on every rank works."""
    from deep_ep_py.errors import DeepEPTimeoutError

    rank, num_ranks = ctx.rank, ctx.num_ranks
    num_experts = EXPERTS_PER_RANK * num_ranks
    kernels, _ = _setup(ctx, num_experts)
    missing = num_ranks - 1
    message = ""
    if rank != missing:
        started = time.monotonic()
        try:
            kernels.clean_low_latency_buffer(num_experts)
        except DeepEPTimeoutError as exc:
            message = str(exc)
        elapsed = time.monotonic() - started
        assert f"on rank {rank}, channel {missing}," in message and "clean barrier" in message, message
        assert elapsed < 30, f"rank {rank}: the clean took {elapsed:.1f} s to give up (the limit is 2 s)"
    ctx.barrier()
    if rank == missing:
        # Late: its first barrier finds the others' announcements, its second finds nobody.
        try:
            kernels.clean_low_latency_buffer(num_experts)
        except DeepEPTimeoutError as exc:
            assert "clean barrier" in str(exc), str(exc)
        else:
            raise AssertionError(f"rank {rank}: a clean that its peers had left returned")
    ctx.barrier()
    # A retry on every rank: the barriers' epochs follow the cleans, so the ranks are in step again (numbered by
    # barriers, the late rank's would run one ahead and the others would pass on its stale words).
    kernels.clean_low_latency_buffer(num_experts)
    _check_plain_call(ctx, kernels, make_inputs(520, num_ranks, num_experts), "after the retried clean")
    return message


# ------------------------------------------------------------------------------------------------- tests

MODES = ["plain", "hook", "zero_copy"]


def _num_iters() -> int:
    return int(os.environ.get("DEEP_EP_PY_LL_TEST_ITERS", "1000"))


# How the kernels reach a peer: "p2p" (stores through nvshmem_ptr, as over NVLink or on one GPU) or "puts" (NVSHMEM
# puts and signals, as over a NIC). On a GPU, "puts" has every rank play a node of its own with the network emulated
# (the kernels then put and signal to every peer, though nvshmem_ptr maps it); on the CPU emulator, every peer is
# outside this PE's P2P domain (DEEP_EP_PY_EMULATE_P2P_PES=1), whose puts land late, as a NIC's may.
REACHES = ("p2p", "puts")


def _reach_env(reach: str) -> dict:
    if reach == "p2p":
        return {}
    if emulated_tier():
        return {"DEEP_EP_PY_EMULATE_P2P_PES": "1"}
    return {EMULATE_NETWORK_ENV: "1", RANKS_PER_NODE_ENV: "1"}


def _batch(gpu_batch, num_ranks: int, reach: str = "p2p"):
    """Every selected case of this module at num_ranks and reach, in one launch on one NvshmemContext."""

    def make_cases(selected):
        cases = [
            BatchCase(
                f"against_reference_{fmt}_{mode}", _against_reference_case, (fmt, mode == "hook", mode == "zero_copy")
            )
            for mode in MODES
            for fmt in selected("test_against_reference", "fmt", num_ranks=num_ranks, mode=mode, reach=reach)
        ]
        if reach != "p2p":
            return cases
        if selected("test_rank_mask", "num_ranks", num_ranks=num_ranks):
            cases.append(BatchCase("rank_mask", _mask_case))
        if selected("test_hook_outlives_results", "num_ranks", num_ranks=num_ranks):
            cases.append(BatchCase("hook_outlives_results", _hook_outlives_results_case))
        for shape in selected("test_shapes", "shape", num_ranks=num_ranks):
            cases.append(BatchCase(f"shape_{shape}", _shape_case, (shape,)))
        for fmt in selected("test_two_calls_in_flight", "fmt", num_ranks=num_ranks):
            cases.append(BatchCase(f"two_in_flight_{fmt}", _two_in_flight_case, (fmt,)))
        if selected("test_expert_id_out_of_range", "num_ranks", num_ranks=num_ranks):
            cases.append(BatchCase("expert_id_out_of_range", _expert_id_out_of_range_case))
        if selected("test_two_calls_on_one_half_are_reported", "num_ranks", num_ranks=num_ranks):
            cases.append(BatchCase("same_half_twice", _same_half_twice_case))
        if selected("test_host_refusals_leave_the_buffer_as_it_was", "num_ranks", num_ranks=num_ranks):
            cases.append(BatchCase("host_refusals", _host_refusals_case))
        if selected("test_ranks_with_other_shapes_are_reported", "num_ranks", num_ranks=num_ranks):
            cases.append(BatchCase("shape_mismatch", _shape_mismatch_case))
        if selected("test_repeated_calls_and_cuda_graph", "num_ranks", num_ranks=num_ranks):
            # Last: the CUDA graph. On a GPU 2 x num_iters round trips of a few ms: a budget of 0.05 s an iteration
            # keeps it (110 s at 1000) under the GPU script's 240 s step limit, so that a hang there is reported by
            # the batch, with every rank's stack, rather than cut off with the step. On the CPU emulator the repeated
            # calls alone (no CUDA graphs there), at about 0.03-0.1 s each on 2 cores.
            num_iters, with_graph = _num_iters(), not emulated_tier()
            seconds_per_iter = 0.2 if emulated_tier() else 0.05
            cases.append(
                BatchCase(
                    "repeat_and_cuda_graph",
                    _repeat_and_graph_case,
                    (num_iters, with_graph),
                    60 + seconds_per_iter * num_iters,
                )
            )
        return cases

    env = _reach_env(reach) or None
    return gpu_batch(
        ("low_latency", num_ranks, reach),
        make_cases,
        num_ranks,
        env=env,
        setup=_open_nvshmem,
        teardown=_close_nvshmem,
    )


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reach", REACHES)
def test_against_reference(require_gpu, gpu_batch, num_ranks, fmt, mode, reach):
    _batch(gpu_batch, num_ranks, reach)[f"against_reference_{fmt}_{mode}"].assert_passed()


def test_repeated_calls_and_cuda_graph(require_gpu, gpu_batch, num_ranks):
    _batch(gpu_batch, num_ranks)["repeat_and_cuda_graph"].assert_passed()
    if emulated_tier():
        pytest.skip("the repeated calls passed; CUDA graphs: not in the CPU emulator of the kernels")


def test_rank_mask(require_gpu, gpu_batch, num_ranks):
    _batch(gpu_batch, num_ranks)["rank_mask"].assert_passed()


def test_hook_outlives_results(require_gpu, gpu_batch, num_ranks):
    _batch(gpu_batch, num_ranks)["hook_outlives_results"].assert_passed()


@pytest.mark.parametrize("shape", list(SHAPES))
def test_shapes(require_gpu, gpu_batch, num_ranks, shape):
    _batch(gpu_batch, num_ranks)[f"shape_{shape}"].assert_passed()


@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
def test_two_calls_in_flight(require_gpu, gpu_batch, num_ranks, fmt):
    _batch(gpu_batch, num_ranks)[f"two_in_flight_{fmt}"].assert_passed()


def test_expert_id_out_of_range(require_gpu, gpu_batch, num_ranks):
    _batch(gpu_batch, num_ranks)["expert_id_out_of_range"].assert_passed()


def test_two_calls_on_one_half_are_reported(require_gpu, gpu_batch, num_ranks):
    _batch(gpu_batch, num_ranks)["same_half_twice"].assert_passed()


def test_host_refusals_leave_the_buffer_as_it_was(require_gpu, gpu_batch, num_ranks):
    _batch(gpu_batch, num_ranks)["host_refusals"].assert_passed()


def test_ranks_with_other_shapes_are_reported(require_gpu, gpu_batch, num_ranks):
    _batch(gpu_batch, num_ranks)["shape_mismatch"].assert_passed()


@pytest.mark.parametrize("call", ["dispatch", "combine", "clean"])
def test_timeout_names_missing_peer(require_gpu, num_ranks, launch_timeout_s, call):
    """A launch of its own: DEEP_EP_PY_TIMEOUT_S=2, a rank that never makes `call`, and an NvshmemContext of its
    own."""
    from deep_ep_py.testing import launch

    if num_ranks < 2:
        pytest.skip("needs a peer")
    messages = launch(
        run_case,
        num_ranks,
        {"dispatch": _timeout_case, "combine": _combine_timeout_case, "clean": _clean_timeout_case}[call],
        device=tier_device(),
        env={"DEEP_EP_PY_TIMEOUT_S": "2"},
        timeout_s=launch_timeout_s,
    )
    assert messages[-1] == "" and all(f"channel {num_ranks - 1}," in m for m in messages[:-1]), messages


@pytest.mark.parametrize("reach", REACHES)
def test_shrink_masks_dead_ranks(require_gpu, num_ranks, launch_timeout_s, reach):
    """A launch of its own (DEEP_EP_PY_TIMEOUT_S=2): under enable_shrink, ranks that stop calling are masked by
    the waits for them, at dispatch, combine and clean, and the others go on with correct results."""
    from deep_ep_py.testing import launch

    if num_ranks < 2:
        pytest.skip("needs a peer")
    env = {"DEEP_EP_PY_TIMEOUT_S": "2", **_reach_env(reach)}
    masks = launch(run_case, num_ranks, _shrink_case, device=tier_device(), env=env, timeout_s=launch_timeout_s)
    want_dead = [1, 2, 3] if num_ranks >= 4 else [num_ranks - 1]
    survivors = [r for r in range(num_ranks) if r not in want_dead]
    assert all(masks[r] == want_dead for r in survivors), masks
