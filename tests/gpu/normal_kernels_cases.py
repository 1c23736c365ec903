"""The rank functions of the normal-kernel GPU tests (tests/gpu/test_intranode_gpu.py, test_internode_gpu.py).

IntranodeKernels and InternodeKernels have one interface (dispatch, combine, rows_per_round, poison_staging,
debug_poison_byte, _check_device_errors, destroy) and are checked against the reference backend the same way, so the
cases run here once for both. What differs is a :class:`KernelsPath`, subclassed in each test module: how the kernels
and the reference Buffer are built, how a case's routing draws experts, the combine tolerance (each module's
docstring gives its reasoning) and the wait a timed-out dispatch names. The case functions and the paths travel to
the batch's spawned ranks pickled by module name, so this module sits next to the test modules (pytest puts tests/gpu
on sys.path, and spawned ranks inherit it); its name keeps pytest from collecting it.

The ranks run on a GPU or on the CPU emulator of the kernels (DEEP_EP_PY_EMULATE_DEVICE=1): tensors go to the kernels'
device through kernel_device.on_kernel_device, synchronize and streams through deep_ep_py.device. Only the CUDA-graph
case is GPU only.
"""

from __future__ import annotations

import abc
import dataclasses

import torch
from kernel_device import delay_this_rank, emulated_tier, on_kernel_device

from deep_ep_py import device as ep_device
from deep_ep_py.testing.batch import BatchCase

POISON_BYTE = 0xA5
# Blocks per call, cycled over the steps. 24 at 8 ranks asks for more SMs than an H100 has (192 > 132): only the
# kernels' one-block waits may need every rank resident at once.
NUM_SMS = (2, 8, 24)
NUM_GRAPH_REPLAYS = 5
NUM_BACK_TO_BACK_STEPS = 6


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    tokens: tuple[int, ...]  # tokens per rank, cycled over the ranks
    hidden: int = 256
    num_topk: int = 4
    experts_per_rank: int = 4
    drop_prob: float = 0.0
    routing: str = "random"  # which experts a token may pick: "random" (any), or a routing the path's inputs() knows
    fp8: bool = False
    alignment: int = 1
    worst: bool = False
    num_biases: int = 0
    rows_per_round: int = 0  # > 0: size the buffer so that only this many rows fit per round (several rounds)
    num_steps: int = 1  # calls with fresh data
    cached: bool = False  # also a cached dispatch with new x


GRAPH_CASE = Case("graph", (37, 20, 5, 44), drop_prob=0.1, worst=True, rows_per_round=9)
BACK_TO_BACK_CASE = Case("back_to_back", (29, 7, 0, 18), drop_prob=0.2, num_biases=1, rows_per_round=4)
TIMEOUT_CASE = Case("timeout", (16,))
WORST_TOO_SMALL_CASE = Case("worst_too_small", (24, 31, 17, 20), num_topk=4)
# Every token also to rank 0, num_worst_tokens sized for the other ranks: only rank 0 overflows. Several rounds, so
# that a rank leaving a round barrier early would write into staging a peer is still reading.
WORST_TOO_SMALL_ON_RANK_0_CASE = Case("worst_too_small_on_rank_0", (30, 21, 26, 17), num_topk=2, rows_per_round=3)
# Rank 0 passes a num_worst_tokens one past the others': with 3 rows a round, it would launch one round more.
WORST_TOKENS_DIFFER_CASE = Case("worst_tokens_differ", (22, 9, 30, 14), num_topk=2, rows_per_round=3)
LATE_PEER_CASE = Case("late_peer", (16, 11, 9, 14), rows_per_round=3)
# How much later than the device timeout the late rank of the late-peer test enters its dispatch.
LATE_MARGIN_S = 3.0


class KernelsPath(abc.ABC):
    """One kernel class under test, as the shared cases see it. Subclasses live at module level in their test module
    (instances are case arguments, pickled to the ranks)."""

    name: str  # "intranode" or "internode": the test names are test_<name>_...
    num_nodes: int = 1
    seconds_per_step: float  # a passing table case's budget per step, on top of 60 s
    timeout_wait: str  # what a rank's DeepEPTimeoutError says it waited for when a peer never calls dispatch

    @abc.abstractmethod
    def setup(self, ctx, hidden: int, num_topk: int, rows_per_round: int):
        """(reference Buffer over ctx.group, kernels over ctx.resource_group whose rows_per_round is checked), both
        destroyed through ctx.on_cleanup."""

    @abc.abstractmethod
    def inputs(self, case: Case, num_ranks: int, rank: int, step: int):
        """(brute_force.RankInput on the CPU, num_experts) of this rank and step, drawn by case.routing."""

    @abc.abstractmethod
    def check_routing(self, where: str, case: Case, layout, num_tokens: int, rank: int, num_ranks: int) -> None:
        """Raise when the layout (get_dispatch_layout's first four) does not show the case's routing, so that no case
        passes vacuously."""

    def combine_magnitude(self, reference, ref_handle, combine_x: torch.Tensor, biases) -> torch.Tensor | None:
        """None, or what check_combined_x scales its bound by. It may be collective (a reference combine): every rank
        calls it at the same point."""
        return None

    @abc.abstractmethod
    def check_combined_x(self, where: str, combined_x: torch.Tensor, ref_x: torch.Tensor, magnitude) -> None:
        """combined_x against the reference's, within the module's stated tolerance."""

    def after_dispatch(  # noqa: B027 (a hook; most paths need none)
        self, ctx, where: str, kernels, outputs, *, captured: bool = False, check_note: bool = True
    ) -> None:
        """Checks of the path's own after a dispatch (outputs: what kernels.dispatch returned), called on every rank
        at the same point: captured = the dispatch was captured in a CUDA graph (outputs: the graph's);
        check_note = it was the last call on the kernels."""

    def combine_inputs(self, kernels, dispatched, combine_x: torch.Tensor, combine_weights):
        """(x, topk_weights) a table case's combine passes, holding the values of combine_x and combine_weights
        (dispatched: what the dispatch returned); a path may place them elsewhere."""
        return combine_x, combine_weights

    def after_combine(self, ctx, where: str, kernels) -> None:  # noqa: B027 (a hook; most paths need none)
        """Checks of the path's own after a table case's combine, on every rank at the same point."""

    def label(self, ctx) -> str:
        """Where a check ran, for its message."""
        nodes = f" ({self.num_nodes} nodes)" if self.num_nodes > 1 else ""
        return f"rank {ctx.rank}/{ctx.num_ranks}{nodes}"

    def runs_at(self, case: Case, num_ranks: int) -> bool:
        """Whether the case makes sense at num_ranks (its test skips where not)."""
        return True

    def run_s(self, num_steps: int) -> float:
        """Seconds a passing case may take (8 ranks on one GPU, the reference on gloo, three poison barriers a call)."""
        return 60.0 + self.seconds_per_step * num_steps


# ---------------------------------------------------------------------------------------------- rank functions


def _reference_and_kernels(ctx, path: KernelsPath, case: Case):
    """path.setup, then the kernels poison their fresh outputs."""
    reference, kernels = path.setup(ctx, case.hidden, case.num_topk, case.rows_per_round)
    kernels.debug_poison_byte = POISON_BYTE
    return reference, kernels


def _poison_staging(ctx, kernels) -> None:
    """Every rank out of the previous call (synchronize, barrier), poison, every rank done poisoning."""
    ep_device.synchronize()
    ctx.barrier()
    kernels.poison_staging(POISON_BYTE)
    ep_device.synchronize()
    ctx.barrier()


def _total_tokens(ctx, num_tokens: int) -> int:
    """Tokens over all ranks (collective)."""
    import torch.distributed as dist

    totals = torch.tensor([num_tokens], dtype=torch.int64)
    dist.all_reduce(totals, group=ctx.group)
    return int(totals.item())


def _as_input(case: Case, x_bf16: torch.Tensor):
    """bf16 [T, H] -> what a client passes: bf16, or (fp8, column-major float32 scales)."""
    from brute_force import fp8_cast

    if not case.fp8:
        return on_kernel_device(x_bf16), None
    values, scales = fp8_cast(x_bf16)
    scales_cm = torch.empty((scales.shape[1], scales.shape[0]), dtype=torch.float32, device=ep_device.kernel_device()).T
    scales_cm.copy_(scales)
    return on_kernel_device(values), scales_cm


def _reference_dispatch(reference, x_in, layout, topk_idx, topk_weights, alignment: int, num_worst: int):
    """layout: get_dispatch_layout's first four (num_tokens_per_rdma_rank is None within one node)."""
    num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank = layout
    return reference.dispatch(
        x_in,
        num_tokens_per_rank=num_tokens_per_rank,
        num_tokens_per_rdma_rank=num_tokens_per_rdma_rank,
        is_token_in_rank=is_token_in_rank,
        num_tokens_per_expert=num_tokens_per_expert,
        topk_idx=topk_idx,
        topk_weights=topk_weights,
        expert_alignment=alignment,
        num_worst_tokens=num_worst,
    )


def _compare_dispatch(where, ref_out, mine_out, num_worst: int) -> None:
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


def _compare_combine(path: KernelsPath, where, ref_out, mine_out, magnitude) -> None:
    from brute_force import check, check_equal

    ref_x, ref_weights, _ = ref_out
    combined_x, combined_weights = mine_out
    path.check_combined_x(where, combined_x, ref_x, magnitude)
    if ref_weights is not None:
        check_equal(f"{where} combined_topk_weights", combined_weights, ref_weights)
    else:
        check(combined_weights is None, f"{where}: combined_topk_weights returned without topk_weights")


def _run_step(ctx, path: KernelsPath, case: Case, reference, kernels, step: int, num_sms: int) -> None:
    """One dispatch (+ cached dispatch) + combine, each compared with the reference on the same inputs."""
    rank, num_ranks = ctx.rank, ctx.num_ranks
    where = f"{case.name} step {step} {path.label(ctx)}"
    inp, num_experts = path.inputs(case, num_ranks, rank, step)
    x, scales = _as_input(case, inp.x)
    topk_idx, topk_weights = on_kernel_device(inp.topk_idx), on_kernel_device(inp.topk_weights)
    layout = reference.get_dispatch_layout(topk_idx, num_experts)[:4]
    num_tokens_per_rank, _, num_tokens_per_expert, is_token_in_rank = layout
    path.check_routing(where, case, layout, inp.x.shape[0], rank, num_ranks)
    num_worst = _total_tokens(ctx, inp.x.shape[0]) + 3 if case.worst else 0
    x_in = (x, scales) if scales is not None else x

    ref_out = _reference_dispatch(reference, x_in, layout, topk_idx, topk_weights, case.alignment, num_worst)
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
    ep_device.synchronize()
    _compare_dispatch(where, ref_out, mine_out, num_worst)
    path.after_dispatch(ctx, where, kernels, mine_out)
    ref_handle, handle = ref_out[4], mine_out[5]

    if case.cached:
        gen = torch.Generator().manual_seed(step * 7 + rank)
        new_x_bf16 = (torch.randn(inp.x.shape, generator=gen) * 3).to(torch.bfloat16)
        new_x, new_scales = _as_input(case, new_x_bf16)
        new_in = (new_x, new_scales) if new_scales is not None else new_x
        ref_cached = reference.dispatch(new_in, handle=ref_handle)
        _poison_staging(ctx, kernels)
        mine_cached = kernels.dispatch(new_x, new_scales, handle, None, None, None, None, None, 1, 0, num_sms)
        ep_device.synchronize()
        _compare_dispatch(f"{where} cached", (ref_cached[0], None, None, None, None, None), mine_cached, 0)
        path.after_dispatch(ctx, f"{where} cached", kernels, mine_cached)
        assert mine_cached[2] is None and mine_cached[3] is None and mine_cached[5] is handle, where

    # Combine: bf16 rows of the received shape (the fp8 cases combine other bf16 data of that shape).
    num_rows = mine_out[0].shape[0]
    gen = torch.Generator().manual_seed(step * 13 + rank + 5)
    combine_x = on_kernel_device((torch.randn((num_rows, case.hidden), generator=gen) * 2).to(torch.bfloat16))
    combine_weights = mine_out[3]
    biases = tuple(
        on_kernel_device(torch.randn((inp.x.shape[0], case.hidden), generator=gen).to(torch.bfloat16))
        for _ in range(case.num_biases)
    )
    ref_combined = reference.combine(combine_x, ref_handle, topk_weights=combine_weights, bias=biases or None)
    magnitude = path.combine_magnitude(reference, ref_handle, combine_x, biases)
    _poison_staging(ctx, kernels)
    combine_in, weights_in = path.combine_inputs(kernels, mine_out, combine_x, combine_weights)
    mine_combined = kernels.combine(combine_in, handle, weights_in, biases, num_sms)
    ep_device.synchronize()
    _compare_combine(path, where, ref_combined, mine_combined, magnitude)
    path.after_combine(ctx, where, kernels)


def table_case(ctx, path: KernelsPath, case: Case) -> None:
    reference, kernels = _reference_and_kernels(ctx, path, case)
    for step in range(case.num_steps):
        _run_step(ctx, path, case, reference, kernels, step, NUM_SMS[step % len(NUM_SMS)])


def graph_case(ctx, path: KernelsPath) -> None:
    """num_worst_tokens dispatch + combine captured in one CUDA graph, replayed with new x and new routing copied into
    the captured tensors (top-k, weights and the layout): every replay equals the reference on those inputs, so a
    replay that reused an earlier one's counts, prefix matrix or send lists fails. The barriers' epochs live on the
    device, so replays stay in step. GPU only (torch.cuda throughout): protocol_batch_cases leaves it out of an
    emulated tier's batch."""
    rank, num_ranks = ctx.rank, ctx.num_ranks
    case = GRAPH_CASE
    reference, kernels = _reference_and_kernels(ctx, path, case)
    kernels.debug_poison_byte = None
    inp, num_experts = path.inputs(case, num_ranks, rank, 0)
    topk_idx, topk_weights = inp.topk_idx.cuda(), inp.topk_weights.cuda()
    layout = reference.get_dispatch_layout(topk_idx, num_experts)[:4]
    num_tokens_per_rank, _, num_tokens_per_expert, is_token_in_rank = layout
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
        fresh = path.inputs(case, num_ranks, rank, replay + 1)[0]
        assert fresh.topk_idx.shape == topk_idx.shape, "the routing's shape must not change between replays"
        topk_idx.copy_(fresh.topk_idx.cuda())
        topk_weights.copy_(fresh.topk_weights.cuda())
        for captured, new in zip(layout, reference.get_dispatch_layout(topk_idx, num_experts)[:4]):
            if captured is not None:
                captured.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        kernels._check_device_errors(f"graph replay {replay}")
        ref_out = _reference_dispatch(reference, static_x, layout, topk_idx, topk_weights, 1, num_worst)
        where = f"graph replay {replay} {path.label(ctx)}"
        _compare_dispatch(where, (*ref_out[:3], None, ref_out[4], None), static_out, num_worst)
        path.after_dispatch(ctx, where, kernels, static_out, captured=True)
        rows = static_out[0].clone()
        ref_combined = reference.combine(rows, ref_out[4], topk_weights=static_out[3].clone())
        magnitude = path.combine_magnitude(reference, ref_out[4], rows, ())
        _compare_combine(path, where, ref_combined, static_combined, magnitude)
    torch.cuda.synchronize()
    del graph


def back_to_back_case(ctx, path: KernelsPath) -> None:
    """Dispatch + cached dispatch + combine of several steps issued with no host sync or barrier between the calls
    (odd steps with num_worst_tokens, so not even the notify's host wait), one rank delayed on the GPU before each
    step: a fast rank's next notify and sends must not disturb a slow rank (or, internode, a forwarder) still in the
    previous call. Every other test synchronizes and barriers between calls, so only this one exercises the protocol
    across calls."""
    rank, num_ranks = ctx.rank, ctx.num_ranks
    case = BACK_TO_BACK_CASE
    reference, kernels = _reference_and_kernels(ctx, path, case)
    steps = []
    for step in range(NUM_BACK_TO_BACK_STEPS):
        inp, num_experts = path.inputs(case, num_ranks, rank, step)
        topk_idx, topk_weights = on_kernel_device(inp.topk_idx), on_kernel_device(inp.topk_weights)
        ref_layout = reference.get_dispatch_layout(topk_idx, num_experts)[:4]
        num_tokens_per_rank, _, num_tokens_per_expert, is_token_in_rank = ref_layout
        num_worst = _total_tokens(ctx, inp.x.shape[0]) + 1 if step % 2 == 1 else 0
        layout = (is_token_in_rank, num_tokens_per_rank, num_tokens_per_expert, topk_idx, topk_weights)
        x = on_kernel_device(inp.x)
        ref_out = _reference_dispatch(reference, x, ref_layout, topk_idx, topk_weights, 1, num_worst)
        gen = torch.Generator().manual_seed(step * 17 + rank + 3)
        new_x = on_kernel_device((torch.randn(inp.x.shape, generator=gen) * 3).to(torch.bfloat16))
        ref_cached = reference.dispatch(new_x, handle=ref_out[4])
        combine_x = on_kernel_device(
            (torch.randn((ref_out[0].shape[0], case.hidden), generator=gen) * 2).to(torch.bfloat16)
        )
        bias = (on_kernel_device(torch.randn((inp.x.shape[0], case.hidden), generator=gen).to(torch.bfloat16)),)
        ref_combined = reference.combine(combine_x, ref_out[4], topk_weights=ref_out[2], bias=bias)
        magnitude = path.combine_magnitude(reference, ref_out[4], combine_x, bias)
        steps.append((x, layout, num_worst, new_x, combine_x, bias, ref_out, ref_cached, ref_combined, magnitude))
    ep_device.synchronize()
    ctx.barrier()

    results = []
    for step, (x, layout, num_worst, new_x, combine_x, bias, *_) in enumerate(steps):
        if step % num_ranks == rank:
            delay_this_rank()  # about a millisecond: this rank enters the step late
        mine = kernels.dispatch(x, None, None, *layout, 1, num_worst, 8)
        cached = kernels.dispatch(new_x, None, mine[5], None, None, None, None, None, 1, 0, 8)
        combined = kernels.combine(combine_x, mine[5], mine[3], bias, 8)
        results.append((mine, cached, combined))
    ep_device.synchronize()
    kernels._check_device_errors("back-to-back test")
    for step, (expected, (mine, cached, combined)) in enumerate(zip(steps, results)):
        num_worst, ref_out, ref_cached, ref_combined, magnitude = expected[2], *expected[6:]
        where = f"back-to-back step {step} {path.label(ctx)}"
        _compare_dispatch(where, ref_out, mine, num_worst)
        _compare_dispatch(f"{where} cached", (ref_cached[0], None, None, None, None, None), cached, 0)
        path.after_dispatch(ctx, where, kernels, mine, check_note=False)
        path.after_dispatch(ctx, f"{where} cached", kernels, cached, check_note=False)
        _compare_combine(path, where, ref_combined, combined, magnitude)


def timeout_case(ctx, path: KernelsPath) -> str:
    """The last rank never calls dispatch: the others raise DeepEPTimeoutError naming it (as the channel) and the
    notify's wait (path.timeout_wait). Returns the message ("" on the absent rank)."""
    from deep_ep_py.errors import DeepEPTimeoutError

    rank, num_ranks = ctx.rank, ctx.num_ranks
    case = TIMEOUT_CASE
    reference, kernels = _reference_and_kernels(ctx, path, case)
    absent = num_ranks - 1
    message = ""
    if rank != absent:
        inp, num_experts = path.inputs(case, num_ranks, rank, 0)
        topk_idx, topk_weights = on_kernel_device(inp.topk_idx), on_kernel_device(inp.topk_weights)
        layout = reference.get_dispatch_layout(topk_idx, num_experts)
        x = on_kernel_device(inp.x)
        try:
            kernels.dispatch(x, None, None, layout[3], layout[0], layout[2], topk_idx, topk_weights, 1, 0, 8)
        except DeepEPTimeoutError as exc:
            message = str(exc)
        else:
            raise AssertionError(f"rank {rank}: dispatch returned although rank {absent} never called it")
        # csrc/runtime/error_record.cu: "device wait timed out on rank R, channel C, waiting for <site> ...".
        assert f"on rank {rank}, channel {absent}," in message, message
        assert path.timeout_wait in message, message
    # Every rank's notify kernel has returned (timed out, or never launched) before the buffer is freed.
    ep_device.synchronize()
    ctx.barrier()
    return message


def _dispatch_before_combine(ctx, path: KernelsPath, case: Case, what: str):
    """(kernels, dispatch outputs) of one host-synced dispatch of `case` on fresh kernels, checked and synchronized on
    every rank, for a test whose failure must be the combine's."""
    reference, kernels = _reference_and_kernels(ctx, path, case)
    inp, num_experts = path.inputs(case, ctx.num_ranks, ctx.rank, 0)
    topk_idx, topk_weights = on_kernel_device(inp.topk_idx), on_kernel_device(inp.topk_weights)
    layout = reference.get_dispatch_layout(topk_idx, num_experts)
    out = kernels.dispatch(
        on_kernel_device(inp.x), None, None, layout[3], layout[0], layout[2], topk_idx, topk_weights, 1, 0, 8
    )
    ep_device.synchronize()
    kernels._check_device_errors(f"{what}'s dispatch")
    ctx.barrier()
    return kernels, out


def combine_timeout_case(ctx, path: KernelsPath) -> str:
    """Every rank dispatches; the last never combines: the others' combine raises DeepEPTimeoutError naming the
    waiting rank (and, in the intranode kernels, the absent one as the channel) instead of hanging. Returns the
    message ("" on the absent rank)."""
    from deep_ep_py.errors import DeepEPTimeoutError

    rank, num_ranks = ctx.rank, ctx.num_ranks
    absent = num_ranks - 1
    kernels, out = _dispatch_before_combine(ctx, path, TIMEOUT_CASE, "the combine timeout test")
    message = ""
    if rank != absent:
        try:
            kernels.combine(out[0], out[5], out[3], (), 8)
            ep_device.synchronize()  # the combine's waits give up after DEEP_EP_PY_TIMEOUT_S
            kernels._check_device_errors("the combine timeout test")
        except DeepEPTimeoutError as exc:
            message = str(exc)
        else:
            raise AssertionError(f"rank {rank}: combine returned although rank {absent} never called it")
        assert f"on rank {rank}," in message, message
    ep_device.synchronize()
    ctx.barrier()
    return message


def _timeout_message(run, failure: str) -> str:
    """The message of the DeepEPTimeoutError that run() raises; AssertionError(failure) where it raises none."""
    from deep_ep_py.errors import DeepEPTimeoutError

    try:
        run()
    except DeepEPTimeoutError as exc:
        return str(exc)
    raise AssertionError(failure)


def _check_names_peer_that_gave_up(where: str, message: str, late: int) -> None:
    """The late rank's DeepEPTimeoutError names an earlier rank as the channel, and says that rank gave up."""
    from brute_force import check

    named = [peer for peer in range(late) if f"on rank {late}, channel {peer}," in message]
    check(bool(named) and "timed out earlier" in message, f"{where}: expected a peer that gave up: {message}")


def late_peer_case(ctx, path: KernelsPath) -> str:
    """The last rank enters a dispatch of several rounds LATE_MARGIN_S after the device timeout, with num_worst_tokens
    > 0 so that no host waits for the counts: the others time out in the notify naming it (path.timeout_wait), tell
    every peer they gave up, and run none of their rounds (a failed notify counts none). The late rank must raise
    DeepEPTimeoutError naming one of them as a peer that gave up, with every returned row padding (its notify failed,
    so it receives no rows, and the others, having given up, wrote none into its staging), rather than pass their
    flags or counts, which ran ahead, at once and return the rows of their last round as its first. Returns the
    message."""
    import time

    from brute_force import check

    from deep_ep_py import config as ep_config

    rank, num_ranks = ctx.rank, ctx.num_ranks
    late = num_ranks - 1
    reference, kernels = _reference_and_kernels(ctx, path, LATE_PEER_CASE)
    inp, num_experts = path.inputs(LATE_PEER_CASE, num_ranks, rank, 0)
    topk_idx, topk_weights = on_kernel_device(inp.topk_idx), on_kernel_device(inp.topk_weights)
    layout = reference.get_dispatch_layout(topk_idx, num_experts)
    num_worst = _total_tokens(ctx, inp.x.shape[0]) + 1
    x = on_kernel_device(inp.x)
    ctx.barrier()
    if rank == late:
        time.sleep(ep_config.timeout_s() + LATE_MARGIN_S)
    out = kernels.dispatch(x, None, None, layout[3], layout[0], layout[2], topk_idx, topk_weights, 1, num_worst, 8)
    ep_device.synchronize()
    where = f"late peer {path.label(ctx)}"
    message = _timeout_message(
        lambda: kernels._check_device_errors(where),
        f"{where}: dispatch raised nothing although rank {late} entered it after the timeout",
    )
    if rank == late:
        _check_names_peer_that_gave_up(where, message, rank)
        recv_x, recv_topk_idx, handle = out[0], out[2], out[5]
        check(bool((recv_x.view(torch.int16) == 0).all()), f"{where}: recv_x holds rows other than padding")
        check(bool((recv_topk_idx == -1).all()), f"{where}: recv_topk_idx holds rows other than padding")
        src_idx = handle.recv_src_idx
        check(bool((src_idx == -1).all()), f"{where}: recv_src_idx holds rows other than padding: {src_idx.tolist()}")
    else:
        check(f"on rank {rank}, channel {late}," in message and path.timeout_wait in message, f"{where}: {message}")
    ep_device.synchronize()
    ctx.barrier()
    return message


def late_peer_combine_case(ctx, path: KernelsPath) -> str:
    """Every rank dispatches (several rounds); the last enters the combine of as many rounds LATE_MARGIN_S after the
    device timeout. The others' waits time out or find a peer that gave up, and they go on through their rounds
    without waiting. The late rank must raise DeepEPTimeoutError naming one of them as a peer that gave up, rather than
    find their barrier flags and cumulative arrival counts past its targets, pass every wait at once and return the
    sums of rows they left in staging in other rounds, with no error. Returns the message."""
    import time

    from deep_ep_py import config as ep_config

    rank, num_ranks = ctx.rank, ctx.num_ranks
    late = num_ranks - 1
    kernels, out = _dispatch_before_combine(ctx, path, LATE_PEER_CASE, "the late-peer combine test")
    if rank == late:
        time.sleep(ep_config.timeout_s() + LATE_MARGIN_S)
    where = f"late peer combine {path.label(ctx)}"

    def combine_and_check() -> None:
        kernels.combine(out[0], out[5], out[3], (), 8)
        ep_device.synchronize()
        kernels._check_device_errors(where)

    message = _timeout_message(
        combine_and_check, f"{where}: combine raised nothing although rank {late} entered it after the timeout"
    )
    if rank == late:
        _check_names_peer_that_gave_up(where, message, rank)
    else:
        assert f"on rank {rank}," in message, message
    ep_device.synchronize()
    ctx.barrier()
    return message


def worst_too_small_case(ctx, path: KernelsPath) -> str:
    """num_worst_tokens = 1 while ranks receive more rows: every rank's notify leaves the same capacity record,
    raised as DeepEPError naming the first such rank and its rows (not as a timeout), instead of returning results
    with rows dropped."""
    from harness import dispatch_past_worst_tokens

    case = WORST_TOO_SMALL_CASE
    reference, kernels = _reference_and_kernels(ctx, path, case)
    inp, num_experts = path.inputs(case, ctx.num_ranks, ctx.rank, 0)
    message = dispatch_past_worst_tokens(kernels, reference, inp, num_experts, ctx.group)
    ep_device.synchronize()
    ctx.barrier()
    return message


def worst_too_small_on_rank_0_case(ctx, path: KernelsPath) -> str:
    """Every token also goes to rank 0, and num_worst_tokens is sized for the other ranks only: every rank's notify
    leaves a capacity record naming rank 0, so that all of them raise at their next call, not rank 0 alone while the
    others wait for it there. The kernels go on within the capacity: rank 0's rows are not checked, while every
    other rank, rank 1 entering late, must get exactly the reference's padded rows (a rank with a capacity record
    still waits for its peers at every barrier). Then, the records cleared, a dispatch and combine sized right must
    match the reference on every rank: the barriers' epochs stayed in step. Returns the message."""
    import torch.distributed as dist
    from brute_force import check

    from deep_ep_py.errors import DeepEPError, DeepEPTimeoutError

    case = WORST_TOO_SMALL_ON_RANK_0_CASE
    rank, num_ranks = ctx.rank, ctx.num_ranks
    reference, kernels = _reference_and_kernels(ctx, path, case)
    inp, num_experts = path.inputs(case, num_ranks, rank, 0)
    topk_idx = inp.topk_idx.clone()
    experts_per_rank = num_experts // num_ranks
    # A token none of whose experts is on rank 0 takes one there in slot 0 (no duplicate: none of its others is).
    no_rank_0 = ~((topk_idx >= 0) & (topk_idx < experts_per_rank)).any(dim=1)
    gen = torch.Generator().manual_seed(rank + 77)
    topk_idx[no_rank_0, 0] = torch.randint(0, experts_per_rank, (int(no_rank_0.sum()),), generator=gen)
    x = on_kernel_device(inp.x)
    topk_idx, topk_weights = on_kernel_device(topk_idx), on_kernel_device(inp.topk_weights)
    layout = reference.get_dispatch_layout(topk_idx, num_experts)[:4]
    num_tokens_per_rank, _, num_tokens_per_expert, is_token_in_rank = layout
    # Rows each rank receives, over the group: column r of every rank's is_token_in_rank.
    sent = is_token_in_rank.to(torch.int64).sum(dim=0).cpu()
    dist.all_reduce(sent, group=ctx.group)
    num_worst = max(int(sent[1:].max()), 1)
    check(int(sent[0]) > num_worst, f"routing: rank 0 receives {int(sent[0])} rows, not more than {num_worst}")

    message = ""
    try:
        ref_out = _reference_dispatch(reference, x, layout, topk_idx, topk_weights, 1, num_worst)
    except ValueError:
        check(rank == 0, f"rank {rank}: the reference found num_worst_tokens {num_worst} too small")
        ref_out = None
    _poison_staging(ctx, kernels)
    if rank == 1:
        delay_this_rank()
    mine_out = kernels.dispatch(
        x, None, None, is_token_in_rank, num_tokens_per_rank, num_tokens_per_expert, topk_idx, topk_weights, 1,
        num_worst, 8,
    )  # fmt: skip
    ep_device.synchronize()
    try:
        kernels._check_device_errors("the num_worst_tokens-on-rank-0 test")
    except DeepEPTimeoutError:
        raise
    except DeepEPError as exc:
        message = str(exc)
    where = f"{case.name} {path.label(ctx)}"
    want = f"num_worst_tokens: rank 0 receives {int(sent[0])} rows, more than the {num_worst} given"
    check(want in message, f"{where}: expected {want!r}, got {message!r}")
    kernels.error_record.reset()
    if rank != 0:
        _compare_dispatch(where, ref_out, mine_out, num_worst)
    ctx.barrier()

    # The next call, sized right, on every rank.
    where = f"{where}, the call after"
    ref_out = _reference_dispatch(reference, x, layout, topk_idx, topk_weights, 1, 0)
    _poison_staging(ctx, kernels)
    mine_out = kernels.dispatch(
        x, None, None, is_token_in_rank, num_tokens_per_rank, num_tokens_per_expert, topk_idx, topk_weights, 1, 0, 8
    )
    ep_device.synchronize()
    _compare_dispatch(where, ref_out, mine_out, 0)
    ref_combined = reference.combine(mine_out[0], ref_out[4], topk_weights=mine_out[3])
    magnitude = path.combine_magnitude(reference, ref_out[4], mine_out[0], ())
    _poison_staging(ctx, kernels)
    mine_combined = kernels.combine(mine_out[0], mine_out[5], mine_out[3], (), 8)
    ep_device.synchronize()
    _compare_combine(path, where, ref_combined, mine_combined, magnitude)
    kernels._check_device_errors(where)
    ctx.barrier()
    return message


def worst_tokens_differ_case(ctx, path: KernelsPath) -> str:
    """Rank 0 passes a num_worst_tokens one larger than the other ranks' (each enough for every rank): the ranks would
    launch different numbers of rounds, and those with more would wait at a barrier the others never reach until the
    timeout. Every rank's notify records the mismatch instead, naming the first rank whose value differs from its
    own, and the call's later waits give up at once: the dispatch is done in well under the timeout on every rank,
    and the check raises DeepEPError (not a timeout). Returns the message."""
    import time

    import torch.distributed as dist
    from brute_force import check

    from deep_ep_py import config as ep_config
    from deep_ep_py.errors import DeepEPError, DeepEPTimeoutError

    case = WORST_TOKENS_DIFFER_CASE
    rank = ctx.rank
    reference, kernels = _reference_and_kernels(ctx, path, case)
    inp, num_experts = path.inputs(case, ctx.num_ranks, rank, 0)
    x, topk_idx = on_kernel_device(inp.x), on_kernel_device(inp.topk_idx)
    topk_weights = on_kernel_device(inp.topk_weights)
    num_tokens_per_rank, _, num_tokens_per_expert, is_token_in_rank = reference.get_dispatch_layout(
        topk_idx, num_experts
    )[:4]
    received = is_token_in_rank.to(torch.int64).sum(dim=0).cpu()
    dist.all_reduce(received, group=ctx.group)
    rows_per_round = case.rows_per_round
    # A whole number of rounds, so that one row more takes one round more.
    num_worst = max(1, -(-int(received.max()) // rows_per_round)) * rows_per_round
    mine = num_worst + 1 if rank == 0 else num_worst
    started = time.monotonic()
    kernels.dispatch(
        x, None, None, is_token_in_rank, num_tokens_per_rank, num_tokens_per_expert, topk_idx, topk_weights, 1,
        mine, 8,
    )  # fmt: skip
    ep_device.synchronize()
    elapsed = time.monotonic() - started
    where = f"{case.name} {path.label(ctx)}"
    message = ""
    try:
        kernels._check_device_errors("the differing num_worst_tokens test")
    except DeepEPTimeoutError:
        raise
    except DeepEPError as exc:
        message = str(exc)
    other, theirs = (1, num_worst) if rank == 0 else (0, num_worst + 1)
    want = f"num_worst_tokens differs between ranks: rank {other} passed {theirs}, this rank {mine}"
    check(want in message, f"{where}: expected {want!r}, got {message!r}")
    timeout_s = ep_config.timeout_s()
    check(elapsed < timeout_s / 2, f"{where}: the dispatch took {elapsed:.1f} s of a {timeout_s} s timeout")
    ctx.barrier()
    return message


# ------------------------------------------------------------------------------------------------ batch plumbing


def table_batch_cases(selected, path: KernelsPath, test_name: str, num_ranks: int, **fixed) -> list[BatchCase]:
    """A batch case for each case of test_name that pytest selected at num_ranks (and the other `fixed` parameters)
    and that runs at num_ranks."""
    return [
        BatchCase(case.name, table_case, (path, case), run_s=path.run_s(case.num_steps))
        for case in selected(test_name, "case", num_ranks=num_ranks, **fixed)
        if path.runs_at(case, num_ranks)
    ]


def protocol_batch_cases(selected, path: KernelsPath, num_ranks: int) -> list[BatchCase]:
    """The back-to-back, CUDA-graph and num_worst_tokens-too-small cases, each if its test (test_<path>_...) is
    selected at num_ranks; named as the tests look them up. They go after the table: on fresh kernels like every
    case, but a failed capture is the likeliest to leave something behind. No CUDA-graph case when the tier runs on
    the CPU emulator (its test skips there)."""
    cases = []
    if selected(f"test_{path.name}_back_to_back_calls", "num_ranks", num_ranks=num_ranks):
        run_s = path.run_s(3 * NUM_BACK_TO_BACK_STEPS)
        cases.append(BatchCase("back_to_back", back_to_back_case, (path,), run_s=run_s))
    graph_test = f"test_{path.name}_worst_tokens_in_cuda_graph"
    if not emulated_tier() and selected(graph_test, "num_ranks", num_ranks=num_ranks):
        cases.append(BatchCase("cuda_graph", graph_case, (path,), run_s=path.run_s(2 * NUM_GRAPH_REPLAYS)))
    if selected(f"test_{path.name}_worst_tokens_too_small", "num_ranks", num_ranks=num_ranks):
        cases.append(BatchCase("worst_too_small", worst_too_small_case, (path,), run_s=path.run_s(1)))
    if selected(f"test_{path.name}_worst_tokens_too_small_on_one_rank", "num_ranks", num_ranks=num_ranks):
        on_rank_0 = BatchCase("worst_too_small_on_rank_0", worst_too_small_on_rank_0_case, (path,), run_s=path.run_s(3))
        cases.append(on_rank_0)
    if selected(f"test_{path.name}_worst_tokens_differ_between_ranks", "num_ranks", num_ranks=num_ranks):
        cases.append(BatchCase("worst_tokens_differ", worst_tokens_differ_case, (path,), run_s=path.run_s(1)))
    return cases
