"""Low-latency dispatch / combine against brute force, at 2 and 4 ranks.

Dispatch: for each local expert, rows [0, recv_count[e]) must be exactly the multiset of tokens routed to it
from all ranks (their order is the implementation's), compared bit for bit: bf16 rows, or fp8 values together
with their scale row (float32, power-of-two with round_scale, packed ue8m0 int32 with use_ue8m0) computed here
from the contract's FP8 formula.

Combine: each expert output row is (dequantized) received row * (global expert id + 1), rounded to bf16, so
combined_x[t] = sum_k w[t,k] * bf16((e_k + 1) * x_t) over valid k, computed here in float32 and compared with
rtol = atol = 1e-2 (one bf16 rounding of the float32 sum is <= 2^-9 relative).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
from brute_force import (
    FP8_GROUP,
    check,
    check_close,
    check_equal,
    fp8_cast,
    fp8_dequant,
    make_rank_inputs,
    multiset,
    row_key,
    ue8m0_pack,
    ue8m0_unpack,
)

from deep_ep_py.errors import DeepEPError
from deep_ep_py.testing import launch

COMBINE_RTOL = 1e-2
COMBINE_ATOL = 1e-2


@dataclasses.dataclass(frozen=True)
class LLCase:
    seed: int
    max_tokens: int  # M, the same on every rank
    tokens: tuple[int, ...]  # T per rank (cycled), each <= M
    hidden: int
    num_topk: int
    experts_per_rank: int
    drop_prob: float = 0.0
    use_fp8: bool = False
    round_scale: bool = False
    use_ue8m0: bool = False
    recv_hook: bool = False
    excluded_ranks: tuple[int, ...] = ()


LL_CASES = [
    LLCase(1, 16, (16, 16, 16, 16), 256, 4, 2),  # bf16, T = M
    LLCase(2, 24, (7, 0, 24, 3), 256, 3, 3, drop_prob=0.2, recv_hook=True),  # T < M, T = 0, -1, hook
    LLCase(3, 16, (12, 5, 0, 16), 512, 2, 2, drop_prob=0.1, use_fp8=True),  # fp8, float32 scales
    LLCase(4, 12, (9, 12, 4, 1), 256, 4, 2, use_fp8=True, round_scale=True, recv_hook=True),  # pow2 scales
    LLCase(5, 8, (8, 3, 6, 0), 512, 3, 2, drop_prob=0.2, use_fp8=True, round_scale=True, use_ue8m0=True),
    LLCase(6, 8, (5, 8, 2, 7), 128, 2, 1, excluded_ranks=(0,)),  # rank 0's experts receive nothing
]

COMBINE_MODES = ("plain", "out", "zero_copy")


def _expected_per_expert(inputs, num_experts, global_expert, masked_sources=()):
    """(source rank, token) pairs routed to global_expert, skipping masked source ranks."""
    pairs = []
    for src, inp in enumerate(inputs):
        if src in masked_sources:
            continue
        for t in range(inp.topk_idx.shape[0]):
            if global_expert in inp.topk_idx[t].tolist():
                pairs.append((src, t))
    return pairs


def _dispatch_and_check(buffer, case: LLCase, rank, num_ranks, inputs, stats, masked=()):
    """One low_latency_dispatch, checked; returns (recv_x, recv_count, handle, bf16 view of the received rows)."""
    import deep_ep_py

    num_experts = case.experts_per_rank * num_ranks
    num_local = case.experts_per_rank
    mine = inputs[rank]
    capacity = num_ranks * case.max_tokens
    where = f"{case} rank {rank}/{num_ranks}"

    result = buffer.low_latency_dispatch(
        mine.x,
        mine.topk_idx,
        case.max_tokens,
        num_experts,
        cumulative_local_expert_recv_stats=stats,
        use_fp8=case.use_fp8,
        round_scale=case.round_scale,
        use_ue8m0=case.use_ue8m0,
        async_finish=False,
        return_recv_hook=case.recv_hook,
    )
    check(len(result) == 5, f"{where}: low_latency_dispatch returned {len(result)} values, expected 5")
    recv_x, recv_count, handle, event, hook = result
    check(isinstance(event, deep_ep_py.EventOverlap), f"{where}: event is {type(event).__name__}")
    check(callable(hook), f"{where}: hook is not callable: {hook!r}")
    if case.recv_hook:
        hook()

    check(recv_count.dtype == torch.int32, f"{where}: recv_count dtype {recv_count.dtype}")
    check(tuple(recv_count.shape) == (num_local,), f"{where}: recv_count shape {tuple(recv_count.shape)}")
    if case.use_fp8:
        check(isinstance(recv_x, tuple) and len(recv_x) == 2, f"{where}: fp8 recv_x must be a (values, scales) tuple")
        values, scales = recv_x
        check(values.dtype == torch.float8_e4m3fn, f"{where}: values dtype {values.dtype}")
        check(
            tuple(values.shape) == (num_local, capacity, case.hidden),
            f"{where}: values shape {tuple(values.shape)}, expected {(num_local, capacity, case.hidden)}",
        )
        num_scale_cols = case.hidden // (FP8_GROUP * 4) if case.use_ue8m0 else case.hidden // FP8_GROUP
        scale_dtype = torch.int32 if case.use_ue8m0 else torch.float32
        check(scales.dtype == scale_dtype, f"{where}: scales dtype {scales.dtype}, expected {scale_dtype}")
        check(
            tuple(scales.shape) == (num_local, capacity, num_scale_cols),
            f"{where}: scales shape {tuple(scales.shape)}, expected {(num_local, capacity, num_scale_cols)}",
        )
        check(
            scales.stride()[1:] == (1, capacity),
            f"{where}: scales must be column-major in the last two dims (strides (.., 1, {capacity})), "
            f"got strides {scales.stride()}",
        )
    else:
        check(isinstance(recv_x, torch.Tensor), f"{where}: bf16 recv_x must be a tensor, got {type(recv_x).__name__}")
        check(recv_x.dtype == torch.bfloat16, f"{where}: recv_x dtype {recv_x.dtype}")
        check(
            tuple(recv_x.shape) == (num_local, capacity, case.hidden),
            f"{where}: recv_x shape {tuple(recv_x.shape)}, expected {(num_local, capacity, case.hidden)}",
        )

    recv_bf16 = torch.zeros((num_local, capacity, case.hidden), dtype=torch.bfloat16)
    for le in range(num_local):
        ge = rank * num_local + le
        pairs = _expected_per_expert(inputs, num_experts, ge, masked)
        count = int(recv_count[le])
        check(count == len(pairs), f"{where}: recv_count[{le}] = {count}, expected {len(pairs)} (expert {ge})")
        if case.use_fp8:
            got_keys = [row_key(values[le, i], scales[le, i]) for i in range(count)]
            want_keys = []
            for src, t in pairs:
                v, s = fp8_cast(inputs[src].x[t : t + 1], round_scale=case.round_scale)
                if case.use_ue8m0:
                    s = ue8m0_pack(s)
                want_keys.append(row_key(v[0], s[0]))
            row_scales = scales[le, :count].contiguous()
            if case.use_ue8m0:
                row_scales = ue8m0_unpack(row_scales)
            recv_bf16[le, :count] = fp8_dequant(values[le, :count], row_scales).to(torch.bfloat16)
        else:
            got_keys = [row_key(recv_x[le, i]) for i in range(count)]
            want_keys = [row_key(inputs[src].x[t]) for src, t in pairs]
            recv_bf16[le, :count] = recv_x[le, :count]
        if multiset(got_keys) != multiset(want_keys):
            missing = sum((multiset(want_keys).get(k, 0) - multiset(got_keys).get(k, 0)) > 0 for k in want_keys)
            raise AssertionError(
                f"{where}: expert {ge}: the {count} received rows are not the tokens routed to it "
                f"({missing} expected rows missing or altered; fp8={case.use_fp8}, round_scale={case.round_scale}, "
                f"ue8m0={case.use_ue8m0})"
            )
    return recv_x, recv_count, handle, recv_bf16


def _expected_combine(case: LLCase, mine, num_experts, rank_of_expert, masked=()):
    """sum_k w[t,k] * bf16((e_k + 1) * x_t) in float32, x_t being what the expert saw (fp8 round trip or bf16)."""
    x_seen = mine.x
    if case.use_fp8 and mine.x.shape[0] > 0:
        v, s = fp8_cast(mine.x, round_scale=case.round_scale)
        x_seen = fp8_dequant(v, s).to(torch.bfloat16)
    want = torch.zeros((mine.x.shape[0], case.hidden), dtype=torch.float32)
    for t in range(mine.x.shape[0]):
        for k in range(case.num_topk):
            e = int(mine.topk_idx[t, k])
            if e < 0 or rank_of_expert(e) in masked:
                continue
            want[t] += mine.topk_weights[t, k] * (x_seen[t].float() * (e + 1)).to(torch.bfloat16).float()
    return want


def _combine_and_check(buffer, case, rank, num_ranks, inputs, handle, recv_count, recv_bf16, mode, masked=()):
    import deep_ep_py

    num_local = case.experts_per_rank
    num_experts = num_local * num_ranks
    mine = inputs[rank]
    where = f"{case} rank {rank}/{num_ranks} combine {mode}"

    expert_out = torch.full_like(recv_bf16, float("nan"))  # rows past recv_count must never be read
    for le in range(num_local):
        count = int(recv_count[le])
        expert_out[le, :count] = (recv_bf16[le, :count].float() * (rank * num_local + le + 1)).to(torch.bfloat16)

    kwargs = dict(async_finish=False, return_recv_hook=case.recv_hook)
    out = None
    if mode == "out":
        out = torch.full((mine.x.shape[0], case.hidden), 7.0, dtype=torch.bfloat16)
        kwargs["out"] = out
    x_arg = expert_out
    if mode == "zero_copy":
        combine_buffer = buffer.get_next_low_latency_combine_buffer(handle)
        check(
            tuple(combine_buffer.shape) == tuple(expert_out.shape) and combine_buffer.dtype == torch.bfloat16,
            f"{where}: combine buffer is {combine_buffer.dtype} {tuple(combine_buffer.shape)}, "
            f"expected bf16 {tuple(expert_out.shape)}",
        )
        combine_buffer[:, :, :] = expert_out
        x_arg = combine_buffer
        kwargs["zero_copy"] = True
    result = buffer.low_latency_combine(x_arg, mine.topk_idx, mine.topk_weights, handle, **kwargs)
    check(len(result) == 3, f"{where}: low_latency_combine returned {len(result)} values, expected 3")
    combined_x, event, hook = result
    check(isinstance(event, deep_ep_py.EventOverlap), f"{where}: event is {type(event).__name__}")
    check(callable(hook), f"{where}: hook is not callable")
    if case.recv_hook:
        hook()
    if rank in masked:
        return
    check(combined_x.dtype == torch.bfloat16, f"{where}: combined_x dtype {combined_x.dtype}")
    want = _expected_combine(case, mine, num_experts, lambda e: e // num_local, masked)
    check_close(f"{where} combined_x", combined_x, want, COMBINE_RTOL, COMBINE_ATOL)
    if out is not None:
        check(combined_x.data_ptr() == out.data_ptr() or out.numel() == 0, f"{where}: result is not the out= tensor")
        check_close(f"{where} out", out, want, COMBINE_RTOL, COMBINE_ATOL)


def _make_inputs(case: LLCase, num_ranks: int):
    num_experts = case.experts_per_rank * num_ranks
    allowed = [e for e in range(num_experts) if e // case.experts_per_rank not in case.excluded_ranks]
    return [
        make_rank_inputs(
            case.seed,
            r,
            case.tokens[r % len(case.tokens)],
            case.hidden,
            case.num_topk,
            num_experts,
            allowed,
            case.drop_prob,
        )
        for r in range(num_ranks)
    ]


def _run_ll_cases(rank: int, num_ranks: int, backend: str, cases):
    from harness import low_latency_buffer

    max_m = max(c.max_tokens for c in cases)
    max_h = max(c.hidden for c in cases)
    max_e = max(c.experts_per_rank for c in cases) * num_ranks
    buffer = low_latency_buffer(dist.group.WORLD, max_m, max_h, max_e, backend)
    check(buffer.low_latency_mode is True, f"buffer.low_latency_mode = {buffer.low_latency_mode!r}")
    received = []
    for case in cases:
        inputs = _make_inputs(case, num_ranks)
        initial = torch.arange(case.experts_per_rank, dtype=torch.int32) * 3 + 5
        stats = initial.clone()
        total = torch.zeros(case.experts_per_rank, dtype=torch.int32)
        for mode in COMBINE_MODES:
            _, recv_count, handle, recv_bf16 = _dispatch_and_check(buffer, case, rank, num_ranks, inputs, stats)
            total += recv_count
            _combine_and_check(buffer, case, rank, num_ranks, inputs, handle, recv_count, recv_bf16, mode)
        check_equal(f"{case} rank {rank}: cumulative_local_expert_recv_stats", stats, initial + total)
        buffer.clean_low_latency_buffer(case.max_tokens, case.hidden, case.experts_per_rank * num_ranks)
        received.append(int(total.sum()))
    return received


@pytest.mark.parametrize("num_ranks", [2, 4])
def test_low_latency(num_ranks, backend, launch_timeout_s):
    results = launch(_run_ll_cases, num_ranks, backend, LL_CASES, timeout_s=launch_timeout_s)
    assert len(results) == num_ranks
    for i, case in enumerate(LL_CASES):
        per_rank = [r[i] for r in results]
        assert sum(per_rank) > 0, (case, per_rank)
        for excluded in case.excluded_ranks:
            assert per_rank[excluded] == 0, (case, per_rank)


def _run_masking(rank: int, num_ranks: int, backend: str, masked_rank: int):
    from harness import low_latency_buffer

    case = LLCase(11, 8, (8, 5, 6, 7), 256, 3, 2, drop_prob=0.1)
    num_experts = case.experts_per_rank * num_ranks
    buffer = low_latency_buffer(
        dist.group.WORLD, case.max_tokens, case.hidden, num_experts, backend, enable_shrink=True
    )
    inputs = _make_inputs(case, num_ranks)
    status = torch.full((num_ranks,), 9, dtype=torch.int32)

    buffer.low_latency_query_mask_buffer(status)
    check_equal(f"rank {rank}: mask status before masking", status, torch.zeros(num_ranks, dtype=torch.int32))

    buffer.low_latency_update_mask_buffer(masked_rank, True)
    buffer.low_latency_query_mask_buffer(status)
    want_status = torch.zeros(num_ranks, dtype=torch.int32)
    want_status[masked_rank] = 1
    check_equal(f"rank {rank}: mask status with rank {masked_rank} masked", status, want_status)

    masked = (masked_rank,)
    if rank != masked_rank:
        stats = torch.zeros(case.experts_per_rank, dtype=torch.int32)
        _, recv_count, handle, recv_bf16 = _dispatch_and_check(buffer, case, rank, num_ranks, inputs, stats, masked)
    else:
        # The masked rank plays along (it stands for a dead rank); its own results are not specified.
        _, recv_count, handle, _, _ = buffer.low_latency_dispatch(
            inputs[rank].x, inputs[rank].topk_idx, case.max_tokens, num_experts, use_fp8=False
        )
        recv_bf16 = torch.zeros((case.experts_per_rank, num_ranks * case.max_tokens, case.hidden), dtype=torch.bfloat16)
        recv_count = torch.zeros_like(recv_count)
    _combine_and_check(buffer, case, rank, num_ranks, inputs, handle, recv_count, recv_bf16, "plain", masked)

    # Unmasking by update(rank=..., mask=False), the contract's keywords, then clean: everything flows again.
    buffer.low_latency_update_mask_buffer(rank=masked_rank, mask=False)
    buffer.low_latency_query_mask_buffer(status)
    check_equal(f"rank {rank}: mask status after unmask", status, torch.zeros(num_ranks, dtype=torch.int32))
    buffer.low_latency_update_mask_buffer(masked_rank, True)
    buffer.low_latency_clean_mask_buffer()
    buffer.low_latency_query_mask_buffer(status)
    check_equal(f"rank {rank}: mask status after clean", status, torch.zeros(num_ranks, dtype=torch.int32))
    # What the masked rank sent meanwhile may still sit in its peers' buffers: refused until a clean, on every rank.
    try:
        buffer.low_latency_dispatch(inputs[rank].x, inputs[rank].topk_idx, case.max_tokens, num_experts, use_fp8=False)
    except DeepEPError as exc:
        for want in (f"rank {masked_rank} un-masked", f"clean_low_latency_buffer({case.max_tokens}, {case.hidden}, "):
            check(want in str(exc), f"rank {rank}: expected {want!r} in {exc}")
    else:
        raise AssertionError(f"rank {rank}: a low-latency call after un-masking, before a clean, was not refused")
    buffer.clean_low_latency_buffer(case.max_tokens, case.hidden, num_experts)
    stats = torch.zeros(case.experts_per_rank, dtype=torch.int32)
    _, recv_count, handle, recv_bf16 = _dispatch_and_check(buffer, case, rank, num_ranks, inputs, stats)
    _combine_and_check(buffer, case, rank, num_ranks, inputs, handle, recv_count, recv_bf16, "plain")
    return int(recv_count.sum())


@pytest.mark.parametrize("num_ranks,masked_rank", [(2, 1), (4, 2)])
def test_rank_masking(num_ranks, masked_rank, backend, launch_timeout_s):
    results = launch(_run_masking, num_ranks, backend, masked_rank, timeout_s=launch_timeout_s)
    assert sum(results) > 0


def _run_experts_switch(rank: int, num_ranks: int, backend: str):
    from harness import low_latency_buffer

    first = LLCase(21, 8, (8, 5, 6, 7), 256, 3, 2, drop_prob=0.1)
    second = dataclasses.replace(first, seed=22, experts_per_rank=4)
    buffer = low_latency_buffer(
        dist.group.WORLD, first.max_tokens, first.hidden, second.experts_per_rank * num_ranks, backend
    )
    received = []
    first_handle = None
    for case in (first, second):
        inputs = _make_inputs(case, num_ranks)
        if case is second:
            # Another E on the same buffer before a clean: refused before any launch, on every rank alike.
            mine = inputs[rank]
            try:
                buffer.low_latency_dispatch(mine.x, mine.topk_idx, case.max_tokens, 4 * num_ranks, use_fp8=False)
            except ValueError as exc:
                for want in (f"num_experts: expected {2 * num_ranks}", f"got {4 * num_ranks}", "clean_low_latency"):
                    check(want in str(exc), f"rank {rank}: expected {want!r} in {exc}")
            else:
                raise AssertionError(f"rank {rank}: a low-latency call with another num_experts was not refused")
            buffer.clean_low_latency_buffer(case.max_tokens, case.hidden, 4 * num_ranks)
        stats = torch.zeros(case.experts_per_rank, dtype=torch.int32)
        _, recv_count, handle, recv_bf16 = _dispatch_and_check(buffer, case, rank, num_ranks, inputs, stats)
        _combine_and_check(buffer, case, rank, num_ranks, inputs, handle, recv_count, recv_bf16, "plain")
        received.append(int(recv_count.sum()))
        if case is first:
            first_handle, first_inputs = handle, inputs
    # A combine on a handle from before the clean, whose E is no longer the buffer's: refused the same way.
    mine = first_inputs[rank]
    expert_x = torch.zeros(
        first.experts_per_rank, num_ranks * first.max_tokens, first.hidden, dtype=torch.bfloat16, device=mine.x.device
    )
    try:
        buffer.low_latency_combine(expert_x, mine.topk_idx, mine.topk_weights, first_handle)
    except ValueError as exc:
        for want in (f"handle.num_experts: expected {4 * num_ranks}", f"got {2 * num_ranks}", "clean_low_latency"):
            check(want in str(exc), f"rank {rank}: expected {want!r} in {exc}")
    else:
        raise AssertionError(f"rank {rank}: a combine on a handle of another num_experts was not refused")
    return received


@pytest.mark.parametrize("num_ranks", [2, 4])
def test_switching_num_experts_needs_clean(num_ranks, backend, launch_timeout_s):
    """The signal words of a low-latency call sit at offsets that depend on num_experts: a call with another E on
    the same buffer raises ValueError naming the fix, and after clean_low_latency_buffer with the new E it works."""
    results = launch(_run_experts_switch, num_ranks, backend, timeout_s=launch_timeout_s)
    assert all(len(r) == 2 for r in results) and sum(r[1] for r in results) > 0, results
