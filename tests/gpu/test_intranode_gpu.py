"""Intranode normal kernels (deep_ep_py/backends/intranode.py, csrc/intranode) against the reference backend on the same
inputs, on N ranks sharing the GPU (DEEP_EP_PY_GPU_TEST_RANKS) under MPS.

Dispatch is a copy: received rows, scales, source indices, recv_topk_idx / recv_topk_weights, the per-expert list and
rank_prefix_matrix are compared bit for bit. Combine sums in float32 and rounds to bf16 once: combined_x is compared
with rtol = atol = 1e-2 (bf16 keeps 8 significant bits, so the final rounding is <= 2^-9 relative; the slack covers a
different float32 summation order when the combine runs in several rounds). combined_topk_weights is exact: each
top-k slot is non-zero on at most one rank, so every sum adds zeros to one value.

Fresh outputs are poisoned (IntranodeKernels.debug_poison_byte) and so is the staging area before each call, so a
row the kernels forget to write cannot pass by holding last call's value.

Launches: the table cases, the back-to-back test and the CUDA-graph test of one rank count run in one batch
(deep_ep_py.testing.batch), each case on fresh kernels (IntranodeKernels over the case's resource group, destroyed
after every rank has left the case) and groups of its own; the absent-peer test needs DEEP_EP_PY_TIMEOUT_S=3 and a
launch of its own.
"""

from __future__ import annotations

import dataclasses

import pytest

from deep_ep_py import _ext
from deep_ep_py.testing import launch
from deep_ep_py.testing.batch import BatchCase, run_case

torch = pytest.importorskip("torch")

COMBINE_RTOL = 1e-2
COMBINE_ATOL = 1e-2
POISON_BYTE = 0xA5
TIMEOUT_ENV_S = "3"


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    tokens: tuple[int, ...]  # tokens per rank, cycled over the ranks
    hidden: int = 256
    num_topk: int = 4
    experts_per_rank: int = 4
    drop_prob: float = 0.0
    allowed_ranks: str = "all"  # "all", "not_rank_1" (rank 1 receives nothing), "only_rank_0" (all to one rank)
    fp8: bool = False
    alignment: int = 1
    worst: bool = False
    num_biases: int = 0
    rows_per_round: int = 0  # > 0: size the buffer so that only this many rows fit per round (several rounds)
    num_steps: int = 1  # calls with fresh data
    cached: bool = False  # also a cached dispatch with new x


CASES = [
    Case("random", (64, 33, 0, 47), drop_prob=0.2, num_biases=1),
    Case("multi_round", (40, 29, 17, 35), drop_prob=0.1, alignment=8, num_biases=2, rows_per_round=3),
    Case("rank1_receives_nothing", (24, 0, 19, 8), allowed_ranks="not_rank_1", num_topk=3),
    Case("all_to_one_rank", (30, 12, 25, 7), allowed_ranks="only_rank_0", num_topk=2, rows_per_round=5),
    Case("fp8", (20, 13, 8, 16), hidden=512, drop_prob=0.1, fp8=True, alignment=128),
    Case("fp8_multi_round", (20, 13, 8, 16), hidden=384, fp8=True, rows_per_round=4),
    Case("top1_hidden8", (10, 4, 7, 3), hidden=8, num_topk=1, experts_per_rank=1),
    Case(
        "top16_hidden8",
        (13, 0, 6, 21),
        hidden=8,
        num_topk=16,
        experts_per_rank=8,
        drop_prob=0.3,
        num_biases=2,
        rows_per_round=2,
    ),
    Case(
        "top16_fp8_hidden128",
        (9, 4, 11, 0),
        hidden=128,
        num_topk=16,
        experts_per_rank=8,
        drop_prob=0.3,
        fp8=True,
        alignment=4,
    ),
    Case("all_dropped", (6, 6, 6, 6), drop_prob=1.0),
    Case("worst", (15, 0, 22, 9), drop_prob=0.2, worst=True, num_biases=1),
    Case("worst_multi_round", (15, 3, 22, 9), fp8=True, worst=True, rows_per_round=4),
    Case("cached", (31, 5, 12, 17), drop_prob=0.25, cached=True),
    Case("cached_worst_multi_round", (31, 5, 12, 17), cached=True, worst=True, rows_per_round=6),
    Case("repeat_100", (48, 31, 9, 40), drop_prob=0.2, num_biases=1, num_steps=100),
    Case("repeat_100_multi_round", (48, 31, 9, 40), drop_prob=0.2, num_steps=100, rows_per_round=7),
]


# ---------------------------------------------------------------------------------------------- rank functions


def _setup(ctx, hidden: int, num_topk: int, rows_per_round: int):
    """(reference Buffer over the case's group, IntranodeKernels over its resource group, destroyed after the
    case)."""
    from brute_force import check_equal

    import deep_ep_py
    from deep_ep_py.backends.intranode import IntranodeKernels
    from deep_ep_py.topology import Topology

    ext = _ext.load_extension()
    num_ranks = ctx.num_ranks
    hidden_bytes = hidden * 2
    hint = max(
        config.get_nvl_buffer_size_hint(hidden_bytes, num_ranks)
        for config in (
            deep_ep_py.Buffer.get_dispatch_config(num_ranks),
            deep_ep_py.Buffer.get_combine_config(num_ranks),
        )
    )
    reference = deep_ep_py.Buffer(ctx.group, hint, backend="reference")
    num_nvl_bytes = max(hint, 1 << 20)
    if rows_per_round > 0:
        slot_bytes = ext.intranode_reserved_slot_bytes(hidden, num_topk)
        num_nvl_bytes = ext.intranode_layout()["staging_offset"] + num_ranks * rows_per_round * slot_bytes
    kernels = IntranodeKernels(ctx.resource_group, Topology(num_ranks, num_ranks), num_nvl_bytes, ext)
    ctx.on_cleanup(kernels.destroy)
    if rows_per_round > 0:
        check_equal("rows per round", kernels.rows_per_round(hidden, num_topk)[0], rows_per_round)
    kernels.debug_poison_byte = POISON_BYTE
    return reference, kernels


def _poison_staging(ctx, kernels) -> None:
    """Every rank out of the previous call (synchronize, barrier), poison, every rank done poisoning."""
    torch.cuda.synchronize()
    ctx.barrier()
    kernels.poison_staging(POISON_BYTE)
    torch.cuda.synchronize()
    ctx.barrier()


def _total_tokens(ctx, num_tokens: int) -> int:
    """Tokens over all ranks (collective)."""
    import torch.distributed as dist

    totals = torch.tensor([num_tokens], dtype=torch.int64)
    dist.all_reduce(totals, group=ctx.group)
    return int(totals.item())


def _inputs(case: Case, num_ranks: int, rank: int, step: int):
    from brute_force import make_rank_inputs

    num_experts = case.experts_per_rank * num_ranks
    owner = [e // case.experts_per_rank for e in range(num_experts)]
    if case.allowed_ranks == "not_rank_1":
        allowed = [e for e in range(num_experts) if owner[e] != 1]
    elif case.allowed_ranks == "only_rank_0":
        allowed = [e for e in range(num_experts) if owner[e] == 0]
    else:
        allowed = list(range(num_experts))
    seed = 1000 * step + len(case.name) * 31 + num_ranks
    num_tokens = case.tokens[rank % len(case.tokens)]
    inp = make_rank_inputs(seed, rank, num_tokens, case.hidden, case.num_topk, num_experts, allowed, case.drop_prob)
    return inp, num_experts


def _as_input(case: Case, x_bf16: torch.Tensor):
    """bf16 [T, H] -> what a client passes: bf16, or (fp8, column-major float32 scales)."""
    from brute_force import fp8_cast

    if not case.fp8:
        return x_bf16.cuda(), None
    values, scales = fp8_cast(x_bf16)
    scales_cm = torch.empty((scales.shape[1], scales.shape[0]), dtype=torch.float32, device="cuda").T
    scales_cm.copy_(scales)
    return values.cuda(), scales_cm


def _compare_dispatch(where, case, ref_out, mine_out, num_worst: int) -> None:
    from brute_force import check, check_equal

    ref_recv, ref_topk_idx, ref_topk_weights, ref_list, ref_handle, _ = ref_out
    recv_x, recv_scales, recv_topk_idx, recv_topk_weights, per_expert, handle = mine_out
    ref_x, ref_scales = ref_recv if isinstance(ref_recv, tuple) else (ref_recv, None)
    check_equal(f"{where} recv_x", recv_x, ref_x)
    if ref_scales is not None:
        check_equal(f"{where} recv_x scales", recv_scales, ref_scales.contiguous())
        check(recv_scales.is_contiguous(), f"{where}: received scales are not row-major")
    else:
        check(recv_scales is None, f"{where}: scales returned for bf16")
    if ref_topk_idx is not None:
        check_equal(f"{where} recv_topk_idx", recv_topk_idx, ref_topk_idx)
        check_equal(f"{where} recv_topk_weights", recv_topk_weights, ref_topk_weights)
    if ref_list is not None:
        check_equal(f"{where} num_recv_tokens_per_expert_list", per_expert, ref_list)
    if ref_handle is not None:
        check_equal(f"{where} rank_prefix_matrix", handle.rank_prefix_matrix, ref_handle.rank_prefix_matrix)
        num_recv = ref_handle.num_recv_tokens
        check_equal(f"{where} recv_src_idx", handle.recv_src_idx[:num_recv], ref_handle.recv_src_idx)
        if num_worst:
            padding = handle.recv_src_idx[num_recv:]
            check(bool((padding == -1).all()), f"{where}: recv_src_idx padding is not -1: {padding.tolist()}")
            check_equal(f"{where} handle.num_recv_tokens", handle.num_recv_tokens, -1)
        else:
            check_equal(f"{where} handle.num_recv_tokens", handle.num_recv_tokens, num_recv)
        check_equal(f"{where} handle.num_tokens", handle.num_tokens, ref_handle.num_tokens)
        check_equal(f"{where} handle.num_worst_tokens", handle.num_worst_tokens, ref_handle.num_worst_tokens)
        check_equal(f"{where} handle.hidden", handle.hidden, ref_handle.hidden)


def _compare_combine(where, ref_out, mine_out) -> None:
    from brute_force import check_close, check_equal

    ref_x, ref_weights, _ = ref_out
    combined_x, combined_weights = mine_out
    check_close(f"{where} combined_x", combined_x, ref_x, COMBINE_RTOL, COMBINE_ATOL)
    if ref_weights is not None:
        check_equal(f"{where} combined_topk_weights", combined_weights, ref_weights)


def _run_step(ctx, case: Case, reference, kernels, step: int, num_sms: int) -> None:
    """One dispatch (+ cached dispatch) + combine, each compared with the reference on the same inputs."""
    rank, num_ranks = ctx.rank, ctx.num_ranks
    where = f"{case.name} step {step} rank {rank}/{num_ranks}"
    inp, num_experts = _inputs(case, num_ranks, rank, step)
    x, scales = _as_input(case, inp.x)
    topk_idx, topk_weights = inp.topk_idx.cuda(), inp.topk_weights.cuda()
    num_tokens_per_rank, _, num_tokens_per_expert, is_token_in_rank, _ = reference.get_dispatch_layout(
        topk_idx, num_experts
    )
    num_worst = _total_tokens(ctx, inp.x.shape[0]) + 3 if case.worst else 0
    x_in = (x, scales) if scales is not None else x

    ref_out = reference.dispatch(
        x_in,
        num_tokens_per_rank=num_tokens_per_rank,
        is_token_in_rank=is_token_in_rank,
        num_tokens_per_expert=num_tokens_per_expert,
        topk_idx=topk_idx,
        topk_weights=topk_weights,
        expert_alignment=case.alignment,
        num_worst_tokens=num_worst,
    )
    _poison_staging(ctx, kernels)
    mine_out = kernels.dispatch(
        x,
        scales,
        None,
        is_token_in_rank,
        num_tokens_per_rank,
        num_tokens_per_expert,
        topk_idx,
        topk_weights,
        case.alignment,
        num_worst,
        num_sms,
    )
    torch.cuda.synchronize()
    _compare_dispatch(where, case, ref_out, mine_out, num_worst)
    ref_handle, handle = ref_out[4], mine_out[5]

    if case.cached:
        gen = torch.Generator().manual_seed(step * 7 + rank)
        new_x_bf16 = (torch.randn(inp.x.shape, generator=gen) * 3).to(torch.bfloat16)
        new_x, new_scales = _as_input(case, new_x_bf16)
        new_in = (new_x, new_scales) if new_scales is not None else new_x
        ref_cached = reference.dispatch(new_in, handle=ref_handle)
        _poison_staging(ctx, kernels)
        mine_cached = kernels.dispatch(new_x, new_scales, handle, None, None, None, None, None, 1, 0, num_sms)
        torch.cuda.synchronize()
        _compare_dispatch(f"{where} cached", case, (ref_cached[0], None, None, None, None, None), mine_cached, 0)
        assert mine_cached[2] is None and mine_cached[3] is None and mine_cached[5] is handle, where

    # Combine: bf16 rows of the received shape (the fp8 cases combine other bf16 data of that shape).
    num_rows = mine_out[0].shape[0]
    gen = torch.Generator().manual_seed(step * 13 + rank + 5)
    combine_x = (torch.randn((num_rows, case.hidden), generator=gen) * 2).to(torch.bfloat16).cuda()
    combine_weights = mine_out[3]
    biases = tuple(
        (torch.randn((inp.x.shape[0], case.hidden), generator=gen)).to(torch.bfloat16).cuda()
        for _ in range(case.num_biases)
    )
    ref_combined = reference.combine(combine_x, ref_handle, topk_weights=combine_weights, bias=biases or None)
    _poison_staging(ctx, kernels)
    mine_combined = kernels.combine(combine_x, handle, combine_weights, biases, num_sms)
    torch.cuda.synchronize()
    _compare_combine(where, ref_combined, mine_combined)


def _table_case(ctx, case: Case) -> None:
    reference, kernels = _setup(ctx, case.hidden, case.num_topk, case.rows_per_round)
    for step in range(case.num_steps):
        _run_step(ctx, case, reference, kernels, step, (2, 8, 24)[step % 3])


NUM_GRAPH_REPLAYS = 5


def _graph_case(ctx) -> None:
    """num_worst_tokens dispatch + combine captured in one CUDA graph, replayed with new x (same routing): every
    replay equals the reference on that x. The barriers' epochs live on the device, so replays stay in step."""
    rank, num_ranks = ctx.rank, ctx.num_ranks
    case = Case("graph", (37, 20, 5, 44), drop_prob=0.1, worst=True, rows_per_round=9)
    reference, kernels = _setup(ctx, case.hidden, case.num_topk, case.rows_per_round)
    kernels.debug_poison_byte = None
    inp, num_experts = _inputs(case, num_ranks, rank, 0)
    topk_idx, topk_weights = inp.topk_idx.cuda(), inp.topk_weights.cuda()
    num_tokens_per_rank, _, num_tokens_per_expert, is_token_in_rank, _ = reference.get_dispatch_layout(
        topk_idx, num_experts
    )
    num_worst = _total_tokens(ctx, inp.x.shape[0])
    static_x = inp.x.cuda()
    args = (None, None, is_token_in_rank, num_tokens_per_rank, num_tokens_per_expert, topk_idx, topk_weights, 1)

    def step():
        out = kernels.dispatch(static_x, *args, num_worst, 8)
        combined = kernels.combine(out[0], out[5], out[3], (), 8)
        return out, combined

    # Warm up on a side stream (as torch.cuda.graph requires), then capture.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    ctx.barrier()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out, static_combined = step()
    torch.cuda.synchronize()
    ctx.barrier()
    for replay in range(NUM_GRAPH_REPLAYS):
        gen = torch.Generator().manual_seed(100 + replay * 11 + rank)
        new_x = (torch.randn(inp.x.shape, generator=gen) * 2).to(torch.bfloat16)
        static_x.copy_(new_x.cuda())
        graph.replay()
        torch.cuda.synchronize()
        kernels._check_device_errors(f"graph replay {replay}")
        ref_out = reference.dispatch(
            static_x,
            num_tokens_per_rank=num_tokens_per_rank,
            is_token_in_rank=is_token_in_rank,
            num_tokens_per_expert=num_tokens_per_expert,
            topk_idx=topk_idx,
            topk_weights=topk_weights,
            num_worst_tokens=num_worst,
        )
        where = f"graph replay {replay} rank {rank}/{num_ranks}"
        _compare_dispatch(where, case, (*ref_out[:3], None, ref_out[4], None), static_out, num_worst)
        ref_combined = reference.combine(static_out[0].clone(), ref_out[4], topk_weights=static_out[3].clone())
        _compare_combine(where, ref_combined, static_combined)
    torch.cuda.synchronize()
    del graph


NUM_BACK_TO_BACK_STEPS = 6


def _back_to_back_case(ctx) -> None:
    """Dispatch + cached dispatch + combine of several steps issued with no host sync or barrier between the calls
    (odd steps with num_worst_tokens, so not even the notify's host wait), one rank delayed on the GPU before each
    step: a fast rank's next notify and sends must not disturb a slow rank still in the previous call. Every other
    test synchronizes and barriers between calls, so only this one exercises the protocol across calls."""
    rank, num_ranks = ctx.rank, ctx.num_ranks
    case = Case("back_to_back", (29, 7, 0, 18), drop_prob=0.2, num_biases=1, rows_per_round=4)
    reference, kernels = _setup(ctx, case.hidden, case.num_topk, case.rows_per_round)
    steps = []
    for step in range(NUM_BACK_TO_BACK_STEPS):
        inp, num_experts = _inputs(case, num_ranks, rank, step)
        topk_idx, topk_weights = inp.topk_idx.cuda(), inp.topk_weights.cuda()
        num_tokens_per_rank, _, num_tokens_per_expert, is_token_in_rank, _ = reference.get_dispatch_layout(
            topk_idx, num_experts
        )
        num_worst = _total_tokens(ctx, inp.x.shape[0]) + 1 if step % 2 == 1 else 0
        layout = (is_token_in_rank, num_tokens_per_rank, num_tokens_per_expert, topk_idx, topk_weights)
        x = inp.x.cuda()
        ref_out = reference.dispatch(
            x,
            num_tokens_per_rank=num_tokens_per_rank,
            is_token_in_rank=is_token_in_rank,
            num_tokens_per_expert=num_tokens_per_expert,
            topk_idx=topk_idx,
            topk_weights=topk_weights,
            num_worst_tokens=num_worst,
        )
        gen = torch.Generator().manual_seed(step * 17 + rank + 3)
        new_x = (torch.randn(inp.x.shape, generator=gen) * 3).to(torch.bfloat16).cuda()
        ref_cached = reference.dispatch(new_x, handle=ref_out[4])
        combine_x = (torch.randn((ref_out[0].shape[0], case.hidden), generator=gen) * 2).to(torch.bfloat16).cuda()
        bias = (torch.randn((inp.x.shape[0], case.hidden), generator=gen).to(torch.bfloat16).cuda(),)
        ref_combined = reference.combine(combine_x, ref_out[4], topk_weights=ref_out[2], bias=bias)
        steps.append((x, layout, num_worst, new_x, combine_x, bias, ref_out, ref_cached, ref_combined))
    torch.cuda.synchronize()
    ctx.barrier()

    results = []
    for step, (x, layout, num_worst, new_x, combine_x, bias, *_) in enumerate(steps):
        if step % num_ranks == rank:
            torch.cuda._sleep(2_000_000)  # about a millisecond: this rank enters the step late
        mine = kernels.dispatch(x, None, None, *layout, 1, num_worst, 8)
        cached = kernels.dispatch(new_x, None, mine[5], None, None, None, None, None, 1, 0, 8)
        combined = kernels.combine(combine_x, mine[5], mine[3], bias, 8)
        results.append((mine, cached, combined))
    torch.cuda.synchronize()
    kernels._check_device_errors("back-to-back test")
    for step, ((*_, num_worst, _, _, _, ref_out, ref_cached, ref_combined), (mine, cached, combined)) in enumerate(
        zip(steps, results)
    ):
        where = f"back-to-back step {step} rank {rank}/{num_ranks}"
        _compare_dispatch(where, case, ref_out, mine, num_worst)
        _compare_dispatch(f"{where} cached", case, (ref_cached[0], None, None, None, None, None), cached, 0)
        _compare_combine(where, ref_combined, combined)


def _timeout_case(ctx) -> str:
    """The last rank never calls dispatch: the others raise DeepEPTimeoutError naming it (as the channel)."""
    from deep_ep_py.errors import DeepEPTimeoutError

    rank, num_ranks = ctx.rank, ctx.num_ranks
    case = Case("timeout", (16,))
    reference, kernels = _setup(ctx, case.hidden, case.num_topk, 0)
    absent = num_ranks - 1
    message = ""
    if rank != absent:
        inp, num_experts = _inputs(case, num_ranks, rank, 0)
        topk_idx, topk_weights = inp.topk_idx.cuda(), inp.topk_weights.cuda()
        layout = reference.get_dispatch_layout(topk_idx, num_experts)
        try:
            kernels.dispatch(inp.x.cuda(), None, None, layout[3], layout[0], layout[2], topk_idx, topk_weights, 1, 0, 8)
        except DeepEPTimeoutError as exc:
            message = str(exc)
        else:
            raise AssertionError(f"rank {rank}: dispatch returned although rank {absent} never called it")
        # csrc/runtime/error_record.cu: "device wait timed out on rank R, channel C, waiting for <site> ...".
        assert f"on rank {rank}, channel {absent}," in message, message
        assert "intranode dispatch notify barrier" in message, message
    torch.cuda.synchronize()
    ctx.barrier()
    return message


WORST_TOO_SMALL_CASE = Case("worst_too_small", (24, 31, 17, 20), num_topk=4)


def _worst_too_small_case(ctx) -> str:
    """num_worst_tokens = 1 while ranks receive more rows: each such rank's notify leaves a capacity record, raised
    as DeepEPError naming both counts (not as a timeout), instead of returning results with rows dropped."""
    from harness import dispatch_past_worst_tokens

    case = WORST_TOO_SMALL_CASE
    reference, kernels = _setup(ctx, case.hidden, case.num_topk, 0)
    inp, num_experts = _inputs(case, ctx.num_ranks, ctx.rank, 0)
    message = dispatch_past_worst_tokens(kernels, reference, inp, num_experts, ctx.rank)
    torch.cuda.synchronize()
    ctx.barrier()
    return message


# ---------------------------------------------------------------------------------------------------------- tests


def _runs_at(case: Case, num_ranks: int) -> bool:
    return num_ranks >= 2 or case.allowed_ranks != "not_rank_1"


def _table_run_s(num_steps: int) -> float:
    """Seconds a passing case may take (8 ranks on one GPU, the reference on gloo, three poison barriers a call)."""
    return 60.0 + 1.5 * num_steps


def _batch(gpu_batch, num_ranks: int):
    """Every selected case of this module at num_ranks, in one launch."""

    def make_cases(selected):
        cases = [
            BatchCase(case.name, _table_case, (case,), run_s=_table_run_s(case.num_steps))
            for case in selected("test_intranode_matches_reference", "case", num_ranks=num_ranks)
            if _runs_at(case, num_ranks)
        ]
        # Protocol tests last: on fresh kernels like every case, but a failed capture is the likeliest to leave
        # something behind.
        if selected("test_intranode_back_to_back_calls", "num_ranks", num_ranks=num_ranks):
            cases.append(BatchCase("back_to_back", _back_to_back_case, run_s=_table_run_s(3 * NUM_BACK_TO_BACK_STEPS)))
        if selected("test_intranode_worst_tokens_in_cuda_graph", "num_ranks", num_ranks=num_ranks):
            cases.append(BatchCase("cuda_graph", _graph_case, run_s=_table_run_s(2 * NUM_GRAPH_REPLAYS)))
        if selected("test_intranode_worst_tokens_too_small", "num_ranks", num_ranks=num_ranks):
            cases.append(BatchCase("worst_too_small", _worst_too_small_case, run_s=_table_run_s(1)))
        return cases

    return gpu_batch(("intranode", num_ranks), make_cases, num_ranks)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_intranode_matches_reference(require_gpu, gpu_batch, num_ranks, case):
    if not _runs_at(case, num_ranks):
        pytest.skip("needs a rank 1")
    _batch(gpu_batch, num_ranks)[case.name].assert_passed()


@pytest.mark.gpu
def test_intranode_worst_tokens_in_cuda_graph(require_gpu, gpu_batch, num_ranks):
    _batch(gpu_batch, num_ranks)["cuda_graph"].assert_passed()


@pytest.mark.gpu
def test_intranode_worst_tokens_too_small(require_gpu, gpu_batch, num_ranks):
    _batch(gpu_batch, num_ranks)["worst_too_small"].assert_passed()


@pytest.mark.gpu
def test_intranode_back_to_back_calls(require_gpu, gpu_batch, num_ranks):
    _batch(gpu_batch, num_ranks)["back_to_back"].assert_passed()


@pytest.mark.gpu
def test_intranode_absent_peer_times_out(require_gpu, num_ranks, launch_timeout_s):
    """A launch of its own: DEEP_EP_PY_TIMEOUT_S=3, and a rank that never calls."""
    if num_ranks < 2:
        pytest.skip("needs a peer")
    results = launch(
        run_case,
        num_ranks,
        _timeout_case,
        device="cuda",
        timeout_s=launch_timeout_s,
        env={"DEEP_EP_PY_TIMEOUT_S": TIMEOUT_ENV_S},
    )
    assert results[-1] == "" and all(f"channel {num_ranks - 1}," in m for m in results[:-1]), results


@pytest.mark.parametrize("hidden, num_topk", [(8, 1), (256, 4), (7168, 8), (4096, 32)])
def test_intranode_layout_sizes(hidden, num_topk):
    """Host-side size functions of the layout (no GPU needed, only the extension): a combine row of the same top-k fits
    the slot a dispatch reserves, and rows_per_round fills but never overfills the staging area."""
    ext = _ext.load_extension()
    if ext is None:
        pytest.skip(_ext.kernels_unavailable_reason())
    constants = ext.intranode_layout()
    assert constants["staging_offset"] % 128 == 0 and constants["num_host_counters"] > constants["max_local_experts"]
    slot_bytes = ext.intranode_reserved_slot_bytes(hidden, num_topk)
    assert slot_bytes % 16 == 0 and slot_bytes >= 2 * hidden + 12 * num_topk + 4
    assert ext.intranode_combine_slot_bytes(hidden, num_topk) <= slot_bytes
    for num_ranks in (2, 3, 8):
        for rows in (1, 7, 100):
            num_bytes = constants["staging_offset"] + num_ranks * rows * slot_bytes
            assert ext.intranode_rows_per_round(num_bytes, num_ranks, slot_bytes) == rows
            assert ext.intranode_rows_per_round(num_bytes - 1, num_ranks, slot_bytes) == rows - 1
