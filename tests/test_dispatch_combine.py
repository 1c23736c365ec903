"""Normal-mode dispatch and combine against brute force, at 2 and 4 ranks (and in sub-groups of a 4-rank world).

Dispatch is a copy, so everything it returns is compared bit for bit: received rows in (source rank, source
token) order, recv_topk_idx / recv_topk_weights, num_recv_tokens_per_expert_list, rank_prefix_matrix.

Combine sums in float32 and rounds to bf16 once, so combined_x is compared with rtol = atol = 1e-2 (bf16 keeps
8 significant bits: the one final rounding is <= 2^-9 relative; the slack covers any float32 summation order).
combined_topk_weights is exact: each top-k slot gets a non-zero from the one rank that owns its expert.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
from brute_force import (
    align_up,
    check,
    check_close,
    check_equal,
    expected_dispatch,
    fp8_cast,
    fp8_dequant,
    gather_rows,
    make_rank_inputs,
)

from deep_ep_py.testing import launch

COMBINE_RTOL = 1e-2
COMBINE_ATOL = 1e-2


@dataclasses.dataclass(frozen=True)
class Case:
    seed: int
    tokens: tuple[int, ...]  # tokens per rank, indexed by group rank (cycled)
    hidden: int
    num_topk: int
    experts_per_rank: int
    drop_prob: float = 0.0
    excluded_ranks: tuple[int, ...] = ()  # ranks no token routes to (they receive nothing)
    fp8: bool = False
    alignment: int = 1
    worst: bool = False  # dispatch with num_worst_tokens = all tokens of the group
    num_biases: int = 0


CASES = [
    Case(1, (24, 24, 24, 24), 256, 4, 2),
    Case(2, (31, 5, 0, 17), 256, 3, 3, drop_prob=0.25, alignment=128, num_biases=1),  # uneven, T=0, -1
    Case(3, (12, 9, 14, 6), 200, 2, 2, num_biases=2),  # hidden not a multiple of 128
    Case(4, (10, 4, 7, 3), 8, 1, 1, excluded_ranks=(1,)),  # tiny hidden, top-1, rank 1 receives nothing
    Case(5, (20, 13, 8, 16), 256, 4, 2, drop_prob=0.1, fp8=True, alignment=128),  # fp8, column-major scales
    Case(6, (15, 0, 22, 9), 128, 2, 2, drop_prob=0.2, worst=True, num_biases=1),  # num_worst_tokens
    Case(7, (11, 6, 3, 8), 384, 3, 2, fp8=True, worst=True),  # fp8 + num_worst_tokens
    Case(8, (6, 6, 6, 6), 64, 2, 2, drop_prob=1.0),  # every entry -1: nothing moves anywhere
]


def _split_x(x_in):
    """(bf16 rows for the combine step, comparable parts) of a dispatch input or output."""
    if isinstance(x_in, tuple):
        return x_in
    return (x_in,)


def _check_case(
    buffer, group, case: Case, my_rank: int, num_ranks: int, seed_offset: int, internode_entry: bool = False
) -> str:
    """internode_entry: call internode_dispatch / internode_combine directly instead of dispatch / combine."""
    import deep_ep_py

    dispatch = buffer.internode_dispatch if internode_entry else buffer.dispatch
    combine = buffer.internode_combine if internode_entry else buffer.combine

    num_experts = case.experts_per_rank * num_ranks
    allowed = [e for e in range(num_experts) if e // case.experts_per_rank not in case.excluded_ranks]
    inputs = [
        make_rank_inputs(
            case.seed + seed_offset,
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
    mine = inputs[my_rank]
    num_tokens = mine.x.shape[0]
    where = f"{case} rank {my_rank}/{num_ranks}"

    # Inputs as clients pass them: bf16, or (fp8, float32 scales) with column-major scales.
    def as_input(x_bf16):
        if not case.fp8:
            return x_bf16
        values, scales = fp8_cast(x_bf16)
        scales_cm = torch.empty((scales.shape[1], scales.shape[0]), dtype=torch.float32).T
        scales_cm.copy_(scales)
        return values, scales_cm

    x_in = as_input(mine.x)
    if case.fp8 and num_tokens > 1:
        check(x_in[1].stride() == (1, num_tokens), f"{where}: test bug, scales not column-major")

    num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, _ = (
        buffer.get_dispatch_layout(mine.topk_idx, num_experts)
    )
    expected = expected_dispatch(inputs, my_rank, num_experts)
    num_recv = len(expected.rows)
    num_worst = sum(inp.x.shape[0] for inp in inputs) + 3 if case.worst else 0

    recv_x, recv_topk_idx, recv_topk_weights, num_recv_list, handle, event = dispatch(
        x_in,
        num_tokens_per_rank=num_tokens_per_rank,
        num_tokens_per_rdma_rank=num_tokens_per_rdma_rank,
        is_token_in_rank=is_token_in_rank,
        num_tokens_per_expert=num_tokens_per_expert,
        topk_idx=mine.topk_idx,
        topk_weights=mine.topk_weights,
        expert_alignment=case.alignment,
        num_worst_tokens=num_worst,
    )
    check(isinstance(event, deep_ep_py.EventOverlap), f"{where}: event is {type(event).__name__}")

    # Received rows: bitwise copies in (source rank, source token) order.
    rows_expected_parts = [
        gather_rows(expected.rows, [_split_x(as_input(inp.x))[i] for inp in inputs], part.shape[1], part.dtype)
        for i, part in enumerate(_split_x(x_in))
    ]
    recv_parts = _split_x(recv_x)
    check(
        isinstance(recv_x, tuple) == case.fp8,
        f"{where}: recv_x should {'be' if case.fp8 else 'not be'} a tuple, got {type(recv_x).__name__}",
    )
    num_rows = num_worst if case.worst else num_recv
    for i, (got, want) in enumerate(zip(recv_parts, rows_expected_parts)):
        name = ["recv_x", "recv_x scales"][i]
        check(got.shape[0] == num_rows, f"{where}: {name} has {got.shape[0]} rows, expected {num_rows}")
        check_equal(f"{where} {name}", got[:num_recv].contiguous(), want)
    check_equal(f"{where} recv_topk_idx", recv_topk_idx[:num_recv], expected.recv_topk_idx)
    check_equal(f"{where} recv_topk_weights", recv_topk_weights[:num_recv], expected.recv_topk_weights)
    if case.worst:
        check(recv_topk_idx.shape[0] == num_worst, f"{where}: recv_topk_idx rows {recv_topk_idx.shape[0]}")
        check(bool((recv_topk_idx[num_recv:] == -1).all()), f"{where}: padding rows' topk_idx must be -1")
        check_equal(f"{where} num_recv_tokens_per_expert_list (worst)", num_recv_list, [])
    else:
        want_list = [align_up(c, case.alignment) for c in expected.num_recv_per_expert]
        check(isinstance(num_recv_list, list), f"{where}: list is {type(num_recv_list).__name__}")
        check_equal(f"{where} num_recv_tokens_per_expert_list", num_recv_list, want_list)
    check(isinstance(handle, tuple), f"{where}: handle is {type(handle).__name__}, expected a tuple")
    check_equal(f"{where} handle[0] rank_prefix_matrix", handle[0], expected.rank_prefix_matrix)

    # Cached dispatch: the same layout, new data.
    if not case.worst:
        new_inputs = [
            make_rank_inputs(case.seed + seed_offset + 1000, r, inp.x.shape[0], case.hidden, 1, num_experts)
            for r, inp in enumerate(inputs)
        ]
        cached = dispatch(as_input(new_inputs[my_rank].x), handle=handle)
        check(len(cached) == 6, f"{where}: cached dispatch returned {len(cached)} values")
        check(
            all(v is None for v in cached[1:5]), f"{where}: cached dispatch elements 1..4 must be None: {cached[1:5]}"
        )
        for i, got in enumerate(_split_x(cached[0])):
            want = gather_rows(
                expected.rows, [_split_x(as_input(inp.x))[i] for inp in new_inputs], got.shape[1], got.dtype
            )
            check_equal(f"{where} cached recv_x part {i}", got.contiguous(), want)

    # Combine: send back recv rows scaled by (my_rank + 1); the source sums them (float32) plus the biases.
    recv_bf16 = fp8_dequant(*recv_x).to(torch.bfloat16) if case.fp8 else recv_x
    send_back = (recv_bf16.float() * (my_rank + 1)).to(torch.bfloat16)
    if case.worst:
        send_back[num_recv:] = 1000.0  # padding rows must not reach anyone
    send_weights = recv_topk_weights * (my_rank + 1)
    bias_gen = torch.Generator().manual_seed(case.seed * 31 + my_rank)
    biases = [
        torch.randn((num_tokens, case.hidden), generator=bias_gen).to(torch.bfloat16) for _ in range(case.num_biases)
    ]
    bias_arg = None if not biases else (biases[0] if len(biases) == 1 else tuple(biases))
    combined_x, combined_w, event = combine(send_back, handle, topk_weights=send_weights, bias=bias_arg)

    want_x = torch.zeros((num_tokens, case.hidden), dtype=torch.float32)
    want_w = torch.zeros((num_tokens, case.num_topk), dtype=torch.float32)
    x_bf16_mine = fp8_dequant(*as_input(mine.x)).to(torch.bfloat16) if case.fp8 else mine.x
    for t in range(num_tokens):
        for dst in range(num_ranks):
            if bool(is_token_in_rank[t, dst]):
                want_x[t] += (x_bf16_mine[t].float() * (dst + 1)).to(torch.bfloat16).float()
        for k in range(case.num_topk):
            e = int(mine.topk_idx[t, k])
            if e >= 0:
                want_w[t, k] = mine.topk_weights[t, k] * (e // case.experts_per_rank + 1)
    for b in biases:
        want_x += b.float()
    check(combined_x.dtype == torch.bfloat16, f"{where}: combined_x dtype {combined_x.dtype}")
    check_close(f"{where} combined_x", combined_x, want_x, COMBINE_RTOL, COMBINE_ATOL)
    check(combined_w is not None, f"{where}: combined_topk_weights is None although topk_weights were given")
    check_equal(f"{where} combined_topk_weights", combined_w, want_w)

    # Without topk_weights: no combined weights, same sum.
    combined_x2, combined_w2, _ = combine(send_back, handle)
    check(combined_w2 is None, f"{where}: combined_topk_weights should be None without topk_weights")
    want_x2 = want_x - sum((b.float() for b in biases), torch.zeros_like(want_x))
    check_close(f"{where} combined_x (no bias)", combined_x2, want_x2, COMBINE_RTOL, COMBINE_ATOL)
    return f"{case.seed}:{num_recv}"


def _run_cases(rank: int, num_ranks: int, backend: str, cases, subgroup_size: int, internode_entry: bool = False):
    from harness import normal_buffer

    if subgroup_size == num_ranks:
        group, my_rank, group_size, group_idx = dist.group.WORLD, rank, num_ranks, 0
    else:
        groups = [
            dist.new_group(list(range(start, start + subgroup_size))) for start in range(0, num_ranks, subgroup_size)
        ]
        group_idx = rank // subgroup_size
        group, my_rank, group_size = groups[group_idx], rank % subgroup_size, subgroup_size
    max_hidden = max(case.hidden for case in cases)
    buffer = normal_buffer(group, max_hidden, backend)
    check(buffer.rank == my_rank, f"buffer.rank {buffer.rank}, expected the group rank {my_rank}")
    check(buffer.group_size == group_size, f"buffer.group_size {buffer.group_size}, expected {group_size}")
    # With internode_entry, every other case calls internode_dispatch / internode_combine directly.
    done = [
        _check_case(buffer, group, case, my_rank, group_size, 500 * group_idx, internode_entry and i % 2 == 1)
        for i, case in enumerate(cases)
    ]
    return done


@pytest.mark.parametrize("num_ranks", [2, 4])
def test_dispatch_combine(num_ranks, backend, launch_timeout_s):
    results = launch(_run_cases, num_ranks, backend, CASES, num_ranks, timeout_s=launch_timeout_s)
    assert len(results) == num_ranks
    assert all(len(r) == len(CASES) for r in results)
    # Some rank received something in every case but the all -1 one.
    for i, case in enumerate(CASES):
        total = sum(int(r[i].split(":")[1]) for r in results)
        assert (total == 0) == (case.drop_prob == 1.0), (case, total)


def test_dispatch_combine_in_subgroups(backend, launch_timeout_s):
    """4 ranks in two groups of 2 made with dist.new_group: group ranks, not world ranks, address the data."""
    cases = [CASES[1], CASES[4]]
    results = launch(_run_cases, 4, backend, cases, 2, timeout_s=launch_timeout_s)
    assert all(len(r) == len(cases) for r in results)


def test_dispatch_combine_two_nodes(backend, launch_timeout_s):
    """4 ranks as 2 nodes x 2 (DEEP_EP_PY_RANKS_PER_NODE=2): the internode path gives the same results, through
    dispatch / combine and through internode_dispatch / internode_combine called directly."""
    cases = [CASES[1], CASES[2], CASES[4], CASES[5]]
    results = launch(
        _run_cases, 4, backend, cases, 4, True, env={"DEEP_EP_PY_RANKS_PER_NODE": "2"}, timeout_s=launch_timeout_s
    )
    assert all(len(r) == len(cases) for r in results)
