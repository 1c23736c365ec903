"""Internode (hierarchical) normal kernels (deep_ep_py/backends/internode.py, csrc/internode) against the reference
backend on the same inputs. The N ranks of DEEP_EP_PY_GPU_TEST_RANKS share the GPU under MPS and play num_nodes nodes
of N / num_nodes ranks each (Topology(N, N / num_nodes) for the kernels; num_ranks_per_node and
DEEP_EP_PY_RANKS_PER_NODE alike for the reference Buffer and its size hints). Two nodes run the whole case table;
more nodes (down to one rank per node) run a few cases.

Dispatch is a copy: received rows, scales, source indices, recv_topk_idx / recv_topk_weights, the per-expert list and
rank_prefix_matrix are compared bit for bit.

Combine sums in two stages: each node's forwarder adds that node's rows in float32 and rounds the partial sum to bf16
for the trip between nodes; the source adds the partials and the bias in float32 and rounds once more. The reference
adds everything in float32 and rounds once. So combined_x may differ from it by two bf16 roundings (unit roundoff
2^-8 each): one per partial, relative to that partial, and the last, relative to the result. Partials of different
nodes can cancel, leaving a result far smaller than they are, so the bound scales with the magnitudes summed, not
with the result: |got - want| <= atol + rtol * (sum over the token's rows of |row| + sum of |bias| + |want|), with
rtol = atol = 2e-2 (five roundoffs: slack for another float32 summation order across rounds); the magnitudes come from
a reference combine of |x|. combined_topk_weights is exact: the partials of the weights stay float32, and each top-k
slot is non-zero on at most one rank (the combine gets the dispatch's recv_topk_weights), so every sum adds zeros to
one value.

Fresh outputs are poisoned (InternodeKernels.debug_poison_byte) and so is the staging area before each call, so a row
the kernels forget to write cannot pass by holding last call's value.

Launches: one batch (deep_ep_py.testing.batch) per rank count, node count and environment: the two-node table with the
back-to-back and CUDA-graph tests, the emulated-network cases (DEEP_EP_PY_EMULATE_NETWORK=1), and the cases of each
larger node count (DEEP_EP_PY_RANKS_PER_NODE differs). A batch opens NVSHMEM once (its setup) and every case builds
fresh InternodeKernels on it (destroyed, then the next case's buffer allocated zeroed, once every rank has left the
case); the absent-peer test needs DEEP_EP_PY_TIMEOUT_S=3 and a launch of its own, with its own NvshmemContext.
"""

from __future__ import annotations

import dataclasses

import pytest

from deep_ep_py import _ext
from deep_ep_py.testing import launch
from deep_ep_py.testing.batch import BatchCase, run_case

torch = pytest.importorskip("torch")

COMBINE_RTOL = 2e-2
COMBINE_ATOL = 2e-2
POISON_BYTE = 0xA5
TIMEOUT_ENV_S = "3"
RANKS_PER_NODE_ENV = "DEEP_EP_PY_RANKS_PER_NODE"
# Rows per round when a case does not ask for few: more than any case sends, so those cases run in one round.
DEFAULT_ROWS_PER_ROUND = 256
# Blocks per call, cycled over the steps. 24 at 8 ranks asks for more SMs than an H100 has (192 > 132): only the
# kernels' one-block waits may need every rank resident at once.
NUM_SMS = (2, 8, 24)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    tokens: tuple[int, ...]  # tokens per rank, cycled over the ranks
    hidden: int = 256
    num_topk: int = 4
    experts_per_rank: int = 4
    drop_prob: float = 0.0
    # "random"; "own_node": every expert of a token on the source's node (nothing crosses nodes); "every_node": each
    # token has an expert on every node (no drops there); "not_node_1": node 1 receives nothing; "only_node_0".
    routing: str = "random"
    fp8: bool = False
    alignment: int = 1
    worst: bool = False
    num_biases: int = 0
    rows_per_round: int = 0  # > 0: size the buffer so that only this many rows fit per round (several rounds)
    num_steps: int = 1  # calls with fresh data
    cached: bool = False  # also a cached dispatch with new x


CASES = [
    Case("random", (64, 33, 0, 47), drop_prob=0.2, num_biases=1),
    Case("own_node", (40, 17, 25, 9), routing="own_node", drop_prob=0.1, num_biases=1),
    Case("every_node", (23, 40, 11, 0), routing="every_node", num_topk=8, num_biases=1),
    Case("node1_receives_nothing", (24, 0, 19, 8), routing="not_node_1", num_topk=3),
    Case("all_to_node_0", (30, 12, 25, 7), routing="only_node_0", num_topk=2, rows_per_round=5),
    Case("multi_round", (40, 29, 17, 35), drop_prob=0.1, alignment=8, num_biases=2, rows_per_round=3),
    Case("own_node_multi_round", (40, 17, 25, 9), routing="own_node", rows_per_round=4),
    Case("every_node_multi_round", (23, 40, 11, 31), routing="every_node", num_topk=8, num_biases=2, rows_per_round=2),
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
    Case("all_dropped", (6, 6, 6, 6), drop_prob=1.0),
    Case("worst", (15, 0, 22, 9), drop_prob=0.2, worst=True, num_biases=1),
    Case("worst_multi_round", (15, 3, 22, 9), fp8=True, worst=True, rows_per_round=4),
    Case("cached", (31, 5, 12, 17), drop_prob=0.25, cached=True),
    Case("cached_worst_multi_round", (31, 5, 12, 17), cached=True, worst=True, rows_per_round=6),
    Case("repeat_100", (48, 31, 9, 40), drop_prob=0.2, num_biases=1, num_steps=100),
    Case("repeat_100_multi_round", (48, 31, 9, 40), drop_prob=0.2, num_steps=100, rows_per_round=7),
]
# What also runs with more than two nodes (4 and 8 nodes; 8 nodes of 8 ranks is one rank per node).
# With DEEP_EP_PY_EMULATE_NETWORK=1 the kernels reach ranks of other nodes only through NVSHMEM puts and signals,
# as across a real network, although one GPU maps them all: these cases run that path (count rows, rows to the
# forwarders, partial sums back, barrier signals).
EMULATE_NETWORK_ENV = "DEEP_EP_PY_EMULATE_NETWORK"
NETWORK_CASES = [
    c
    for c in CASES
    if c.name in ("random", "every_node_multi_round", "fp8_multi_round", "cached_worst_multi_round", "repeat_100")
]

MORE_NODES_CASES = [
    c
    for c in CASES
    if c.name in ("random", "node1_receives_nothing", "every_node_multi_round", "cached_worst_multi_round")
]


# ---------------------------------------------------------------------------------------------- rank functions


def _rdma_bytes(ext, num_ranks: int, num_nodes: int, hidden: int, num_topk: int, rows_per_round: int) -> int:
    """Internode buffer bytes that hold exactly this many rows per round (DEFAULT_ROWS_PER_ROUND when 0)."""
    rows = rows_per_round if rows_per_round > 0 else DEFAULT_ROWS_PER_ROUND
    return ext.internode_min_bytes(num_ranks, num_nodes, hidden, num_topk, rows)


def _open_nvshmem(ctx, num_nodes: int):
    """Batch setup: one NvshmemContext per launch, its heap sized for the largest buffer any case of this module
    allocates (a ceiling: NVSHMEM grows the heap on demand)."""
    from deep_ep_py.runtime import NvshmemContext

    ext = _ext.load_extension()
    shapes = {(c.hidden, c.num_topk, c.rows_per_round) for c in (*CASES, GRAPH_CASE, BACK_TO_BACK_CASE, TIMEOUT_CASE)}
    largest = max(_rdma_bytes(ext, ctx.num_ranks, num_nodes, *shape) for shape in shapes)
    return NvshmemContext(ctx.group, num_symmetric_bytes=largest)


def _close_nvshmem(context) -> None:
    """Batch teardown: every case's kernels are destroyed by then (their cleanups)."""
    context.finalize()


def _setup(ctx, num_nodes: int, hidden: int, num_topk: int, rows_per_round: int):
    """(reference Buffer over the case's group, InternodeKernels over its resource group) for num_nodes nodes. The
    kernels use the batch's NvshmemContext (ctx.shared), or one of their own in a launch of their own; cleanups
    destroy the kernels first, then finalize a context of their own."""
    from brute_force import check_equal

    import deep_ep_py
    from deep_ep_py.backends.internode import InternodeKernels
    from deep_ep_py.runtime import NvshmemContext
    from deep_ep_py.topology import Topology

    ext = _ext.load_extension()
    num_ranks = ctx.num_ranks
    ranks_per_node = num_ranks // num_nodes
    hidden_bytes = hidden * 2
    configs = (deep_ep_py.Buffer.get_dispatch_config(num_ranks), deep_ep_py.Buffer.get_combine_config(num_ranks))
    num_nvl_bytes = max(config.get_nvl_buffer_size_hint(hidden_bytes, num_ranks) for config in configs)
    num_ref_rdma_bytes = max(config.get_rdma_buffer_size_hint(hidden_bytes, num_ranks) for config in configs)
    reference = deep_ep_py.Buffer(
        ctx.group, num_nvl_bytes, num_ref_rdma_bytes, backend="reference", num_ranks_per_node=ranks_per_node
    )
    check_equal("reference Buffer's nodes", reference.topology.num_nodes, num_nodes)
    rows = rows_per_round if rows_per_round > 0 else DEFAULT_ROWS_PER_ROUND
    num_rdma_bytes = _rdma_bytes(ext, num_ranks, num_nodes, hidden, num_topk, rows_per_round)
    context = ctx.shared
    if context is None:
        context = NvshmemContext(ctx.resource_group, num_symmetric_bytes=num_rdma_bytes)
        ctx.on_cleanup(context.finalize)
    kernels = InternodeKernels(ctx.resource_group, Topology(num_ranks, ranks_per_node), num_rdma_bytes, ext, context)
    ctx.on_cleanup(kernels.destroy)  # cleanups run last registered first: before the context's finalize
    check_equal("rows per round", kernels.rows_per_round(hidden, num_topk)[0], rows)
    kernels.debug_poison_byte = POISON_BYTE
    return reference, kernels


def _poison_staging(ctx, kernels) -> None:
    """Every rank out of the previous call (synchronize, barrier), poison, every rank done poisoning."""
    torch.cuda.synchronize()
    ctx.barrier()
    kernels.poison_staging(POISON_BYTE)
    torch.cuda.synchronize()
    ctx.barrier()


def _every_node_topk(seed: int, rank: int, num_tokens: int, num_topk: int, num_nodes: int, experts_per_node: int):
    """int64 [T, K]: per token one random expert on each node, the other K - nodes slots distinct random experts,
    slots shuffled."""
    gen = torch.Generator().manual_seed(seed * 7919 + rank * 31 + 5)
    num_experts = num_nodes * experts_per_node
    topk_idx = torch.empty((num_tokens, num_topk), dtype=torch.int64)
    for t in range(num_tokens):
        per_node = [
            n * experts_per_node + int(torch.randint(experts_per_node, (1,), generator=gen)) for n in range(num_nodes)
        ]
        others = [e for e in torch.randperm(num_experts, generator=gen).tolist() if e not in per_node]
        row = torch.tensor(per_node + others[: num_topk - num_nodes], dtype=torch.int64)
        topk_idx[t] = row[torch.randperm(num_topk, generator=gen)]
    return topk_idx


def _inputs(case: Case, num_ranks: int, num_nodes: int, rank: int, step: int):
    from brute_force import check, make_rank_inputs

    num_experts = case.experts_per_rank * num_ranks
    experts_per_node = num_experts // num_nodes  # expert e lives on rank e // L, of node e // (L * ranks per node)
    node_of_expert = [e // experts_per_node for e in range(num_experts)]
    own_node = rank // (num_ranks // num_nodes)
    allowed = {
        "random": list(range(num_experts)),
        "every_node": list(range(num_experts)),
        "own_node": [e for e in range(num_experts) if node_of_expert[e] == own_node],
        "not_node_1": [e for e in range(num_experts) if node_of_expert[e] != 1],
        "only_node_0": [e for e in range(num_experts) if node_of_expert[e] == 0],
    }[case.routing]
    seed = 1000 * step + len(case.name) * 31 + num_ranks * 7 + num_nodes
    num_tokens = case.tokens[rank % len(case.tokens)]
    inp = make_rank_inputs(seed, rank, num_tokens, case.hidden, case.num_topk, num_experts, allowed, case.drop_prob)
    if case.routing == "every_node":
        check(case.num_topk >= num_nodes, f"{case.name}: top-{case.num_topk} cannot reach {num_nodes} nodes")
        inp.topk_idx = _every_node_topk(seed, rank, num_tokens, case.num_topk, num_nodes, experts_per_node)
    return inp, num_experts


def _check_routing(where: str, case: Case, num_tokens_per_rdma_rank: torch.Tensor, num_tokens: int, own_node: int):
    """The case's routing is what it says (per destination node, from the layout), so that no case passes vacuously."""
    from brute_force import check

    per_node = num_tokens_per_rdma_rank.cpu().tolist()
    expected = {
        "own_node": lambda n, count: count == 0 or n == own_node,
        "every_node": lambda n, count: count == num_tokens,
        "not_node_1": lambda n, count: count == 0 or n != 1,
        "only_node_0": lambda n, count: count == 0 or n == 0,
    }.get(case.routing, lambda n, count: True)
    check(
        all(expected(n, count) for n, count in enumerate(per_node)),
        f"{where}: tokens per destination node {per_node} do not fit routing {case.routing!r}",
    )


def _as_input(case: Case, x_bf16: torch.Tensor):
    """bf16 [T, H] -> what a client passes: bf16, or (fp8, column-major float32 scales)."""
    from brute_force import fp8_cast

    if not case.fp8:
        return x_bf16.cuda(), None
    values, scales = fp8_cast(x_bf16)
    scales_cm = torch.empty((scales.shape[1], scales.shape[0]), dtype=torch.float32, device="cuda").T
    scales_cm.copy_(scales)
    return values.cuda(), scales_cm


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


def _combine_magnitude(reference, ref_handle, combine_x: torch.Tensor, biases) -> torch.Tensor:
    """float32 [T, H]: per token and channel, the sum of |row| over the rows that come back plus |bias|: the scale
    the rounding of the per-node bf16 partials is relative to (see the module docstring)."""
    magnitude = reference.combine(combine_x.abs(), ref_handle)[0].float()
    for bias in biases:
        magnitude += bias.float().abs()
    return magnitude


def _compare_combine(where, ref_out, mine_out, magnitude: torch.Tensor) -> None:
    from brute_force import check, check_equal

    ref_x, ref_weights, _ = ref_out
    combined_x, combined_weights = mine_out
    check_equal(f"{where} combined_x shape", tuple(combined_x.shape), tuple(ref_x.shape))
    got, want = combined_x.float().cpu(), ref_x.float().cpu()
    check(bool(torch.isfinite(got).all()), f"{where} combined_x: non-finite values")
    bound = COMBINE_ATOL + COMBINE_RTOL * (magnitude.cpu() + want.abs())
    excess = (got - want).abs() - bound
    if bool((excess > 0).any()):
        idx = tuple(torch.nonzero(excess > 0)[0].tolist())
        raise AssertionError(
            f"{where} combined_x: {int((excess > 0).sum())} elements outside atol {COMBINE_ATOL} + rtol {COMBINE_RTOL}"
            f" x (sum of |rows| + |bias| + |want|); first at {idx}: got {got[idx].item()} want {want[idx].item()}"
            f" bound {bound[idx].item()}"
        )
    if ref_weights is not None:
        check_equal(f"{where} combined_topk_weights", combined_weights, ref_weights)
    else:
        check(combined_weights is None, f"{where}: combined_topk_weights returned without topk_weights")


def _reference_dispatch(reference, x_in, layout, topk_idx, topk_weights, alignment: int, num_worst: int):
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


def _total_tokens(ctx, num_tokens: int) -> int:
    """Tokens over all ranks (collective)."""
    import torch.distributed as dist

    totals = torch.tensor([num_tokens], dtype=torch.int64)
    dist.all_reduce(totals, group=ctx.group)
    return int(totals.item())


def _run_step(ctx, case: Case, reference, kernels, num_nodes: int, step: int, num_sms: int):
    """One dispatch (+ cached dispatch) + combine, each compared with the reference on the same inputs."""
    rank, num_ranks = ctx.rank, ctx.num_ranks
    where = f"{case.name} step {step} rank {rank}/{num_ranks} ({num_nodes} nodes)"
    inp, num_experts = _inputs(case, num_ranks, num_nodes, rank, step)
    x, scales = _as_input(case, inp.x)
    topk_idx, topk_weights = inp.topk_idx.cuda(), inp.topk_weights.cuda()
    num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, _ = (
        reference.get_dispatch_layout(topk_idx, num_experts)
    )
    layout = (num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank)
    _check_routing(where, case, num_tokens_per_rdma_rank, inp.x.shape[0], rank // (num_ranks // num_nodes))
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
    torch.cuda.synchronize()
    _compare_dispatch(where, ref_out, mine_out, num_worst)
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
        _compare_dispatch(f"{where} cached", (ref_cached[0], None, None, None, None, None), mine_cached, 0)
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
    magnitude = _combine_magnitude(reference, ref_handle, combine_x, biases)
    _poison_staging(ctx, kernels)
    mine_combined = kernels.combine(combine_x, handle, combine_weights, biases, num_sms)
    torch.cuda.synchronize()
    _compare_combine(where, ref_combined, mine_combined, magnitude)


def _table_case(ctx, num_nodes: int, case: Case) -> None:
    reference, kernels = _setup(ctx, num_nodes, case.hidden, case.num_topk, case.rows_per_round)
    for step in range(case.num_steps):
        _run_step(ctx, case, reference, kernels, num_nodes, step, NUM_SMS[step % len(NUM_SMS)])


GRAPH_CASE = Case("graph", (37, 20, 5, 44), drop_prob=0.1, worst=True, rows_per_round=9)
NUM_GRAPH_REPLAYS = 5


def _graph_case(ctx, num_nodes: int) -> None:
    """num_worst_tokens dispatch + combine captured in one CUDA graph, replayed with new x (same routing): every
    replay equals the reference on that x."""
    rank, num_ranks = ctx.rank, ctx.num_ranks
    case = GRAPH_CASE
    reference, kernels = _setup(ctx, num_nodes, case.hidden, case.num_topk, case.rows_per_round)
    kernels.debug_poison_byte = None
    inp, num_experts = _inputs(case, num_ranks, num_nodes, rank, 0)
    topk_idx, topk_weights = inp.topk_idx.cuda(), inp.topk_weights.cuda()
    num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, _ = (
        reference.get_dispatch_layout(topk_idx, num_experts)
    )
    layout = (num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank)
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
        ref_out = _reference_dispatch(reference, static_x, layout, topk_idx, topk_weights, 1, num_worst)
        where = f"graph replay {replay} rank {rank}/{num_ranks} ({num_nodes} nodes)"
        _compare_dispatch(where, (*ref_out[:3], None, ref_out[4], None), static_out, num_worst)
        rows = static_out[0].clone()
        ref_combined = reference.combine(rows, ref_out[4], topk_weights=static_out[3].clone())
        _compare_combine(where, ref_combined, static_combined, _combine_magnitude(reference, ref_out[4], rows, ()))
    torch.cuda.synchronize()
    del graph


BACK_TO_BACK_CASE = Case("back_to_back", (29, 7, 0, 18), drop_prob=0.2, num_biases=1, rows_per_round=4)
NUM_BACK_TO_BACK_STEPS = 6


def _back_to_back_case(ctx, num_nodes: int) -> None:
    """Dispatch + cached dispatch + combine of several steps issued with no host sync or barrier between the calls
    (odd steps with num_worst_tokens, so not even the notify's host wait), one rank delayed on the GPU before each
    step: a fast rank's next notify and sends must not disturb a slow rank (or a forwarder) still in the previous
    call. Every other test synchronizes and barriers between calls, so only this one exercises the protocol across
    calls."""
    rank, num_ranks = ctx.rank, ctx.num_ranks
    case = BACK_TO_BACK_CASE
    reference, kernels = _setup(ctx, num_nodes, case.hidden, case.num_topk, case.rows_per_round)
    steps = []
    for step in range(NUM_BACK_TO_BACK_STEPS):
        inp, num_experts = _inputs(case, num_ranks, num_nodes, rank, step)
        topk_idx, topk_weights = inp.topk_idx.cuda(), inp.topk_weights.cuda()
        num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, _ = (
            reference.get_dispatch_layout(topk_idx, num_experts)
        )
        ref_layout = (num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank)
        num_worst = _total_tokens(ctx, inp.x.shape[0]) + 1 if step % 2 == 1 else 0
        layout = (is_token_in_rank, num_tokens_per_rank, num_tokens_per_expert, topk_idx, topk_weights)
        x = inp.x.cuda()
        ref_out = _reference_dispatch(reference, x, ref_layout, topk_idx, topk_weights, 1, num_worst)
        gen = torch.Generator().manual_seed(step * 17 + rank + 3)
        new_x = (torch.randn(inp.x.shape, generator=gen) * 3).to(torch.bfloat16).cuda()
        ref_cached = reference.dispatch(new_x, handle=ref_out[4])
        combine_x = (torch.randn((ref_out[0].shape[0], case.hidden), generator=gen) * 2).to(torch.bfloat16).cuda()
        bias = (torch.randn((inp.x.shape[0], case.hidden), generator=gen).to(torch.bfloat16).cuda(),)
        ref_combined = reference.combine(combine_x, ref_out[4], topk_weights=ref_out[2], bias=bias)
        magnitude = _combine_magnitude(reference, ref_out[4], combine_x, bias)
        steps.append((x, layout, num_worst, new_x, combine_x, bias, ref_out, ref_cached, ref_combined, magnitude))
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
    for step, (expected, (mine, cached, combined)) in enumerate(zip(steps, results)):
        num_worst, ref_out, ref_cached, ref_combined, magnitude = expected[2], *expected[6:]
        where = f"back-to-back step {step} rank {rank}/{num_ranks} ({num_nodes} nodes)"
        _compare_dispatch(where, ref_out, mine, num_worst)
        _compare_dispatch(f"{where} cached", (ref_cached[0], None, None, None, None, None), cached, 0)
        _compare_combine(where, ref_combined, combined, magnitude)


TIMEOUT_CASE = Case("timeout", (16,))


def _timeout_case(ctx, num_nodes: int) -> str:
    """The last rank never calls dispatch: the others raise DeepEPTimeoutError naming it (as the channel) from the
    notify's wait for every rank's counts (WaitSite kInternodeNotifyCounts)."""
    from deep_ep_py.errors import DeepEPTimeoutError

    rank, num_ranks = ctx.rank, ctx.num_ranks
    case = TIMEOUT_CASE
    reference, kernels = _setup(ctx, num_nodes, case.hidden, case.num_topk, 0)
    absent = num_ranks - 1
    message = ""
    if rank != absent:
        inp, num_experts = _inputs(case, num_ranks, num_nodes, rank, 0)
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
        assert "internode dispatch notify: the counts of the rank given as the channel" in message, message
    # Every rank's notify kernel has returned (timed out, or never launched) before the buffer is freed.
    torch.cuda.synchronize()
    ctx.barrier()
    return message


WORST_TOO_SMALL_CASE = Case("worst_too_small", (24, 31, 17, 20), num_topk=4)


def _worst_too_small_case(ctx, num_nodes: int) -> str:
    """num_worst_tokens = 1 while ranks receive more rows: each such rank's notify leaves a capacity record, raised
    as DeepEPError naming both counts (not as a timeout), instead of returning results with rows dropped."""
    from harness import dispatch_past_worst_tokens

    case = WORST_TOO_SMALL_CASE
    reference, kernels = _setup(ctx, num_nodes, case.hidden, case.num_topk, 0)
    inp, num_experts = _inputs(case, ctx.num_ranks, num_nodes, ctx.rank, 0)
    message = dispatch_past_worst_tokens(kernels, reference, inp, num_experts, ctx.rank)
    torch.cuda.synchronize()
    ctx.barrier()
    return message


# ---------------------------------------------------------------------------------------------------------- tests


def _ranks_per_node(num_ranks: int, num_nodes: int) -> int:
    if num_ranks < num_nodes or num_ranks % num_nodes != 0:
        pytest.skip(f"{num_ranks} ranks do not split into {num_nodes} nodes")
    return num_ranks // num_nodes


def _table_run_s(num_steps: int) -> float:
    """Seconds a passing case may take (8 ranks on one GPU, the reference on gloo, three poison barriers a call)."""
    return 60.0 + 2.0 * num_steps


def _batch(gpu_batch, num_ranks: int, num_nodes: int, emulate_network: bool = False):
    """Every selected case of one (rank count, node count, environment) in one launch, with DEEP_EP_PY_RANKS_PER_NODE
    (and DEEP_EP_PY_EMULATE_NETWORK) set in the ranks' environment."""
    ranks_per_node = _ranks_per_node(num_ranks, num_nodes)
    env = {RANKS_PER_NODE_ENV: str(ranks_per_node)}
    if emulate_network:
        env[EMULATE_NETWORK_ENV] = "1"
        table_test, fixed = "test_internode_emulated_network_matches_reference", {"num_ranks": num_ranks}
    elif num_nodes == 2:
        table_test, fixed = "test_internode_matches_reference", {"num_ranks": num_ranks}
    else:
        table_test, fixed = (
            "test_internode_more_nodes_match_reference",
            {"num_ranks": num_ranks, "num_nodes": num_nodes},
        )

    def make_cases(selected):
        cases = [
            BatchCase(case.name, _table_case, (num_nodes, case), run_s=_table_run_s(case.num_steps))
            for case in selected(table_test, "case", **fixed)
        ]
        if num_nodes == 2 and not emulate_network:
            # Protocol tests last: on fresh kernels like every case, but a failed capture is the likeliest to leave
            # something behind.
            if selected("test_internode_back_to_back_calls", "num_ranks", num_ranks=num_ranks):
                run_s = _table_run_s(3 * NUM_BACK_TO_BACK_STEPS)
                cases.append(BatchCase("back_to_back", _back_to_back_case, (num_nodes,), run_s=run_s))
            if selected("test_internode_worst_tokens_in_cuda_graph", "num_ranks", num_ranks=num_ranks):
                run_s = _table_run_s(2 * NUM_GRAPH_REPLAYS)
                cases.append(BatchCase("cuda_graph", _graph_case, (num_nodes,), run_s=run_s))
            if selected("test_internode_worst_tokens_too_small", "num_ranks", num_ranks=num_ranks):
                cases.append(BatchCase("worst_too_small", _worst_too_small_case, (num_nodes,), run_s=_table_run_s(1)))
        return cases

    key = ("internode", num_ranks, num_nodes, emulate_network)
    return gpu_batch(
        key, make_cases, num_ranks, env=env, setup=_open_nvshmem, setup_args=(num_nodes,), teardown=_close_nvshmem
    )


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_internode_matches_reference(require_gpu, gpu_batch, num_ranks, case):
    _batch(gpu_batch, num_ranks, 2)[case.name].assert_passed()


@pytest.mark.gpu
@pytest.mark.parametrize("case", NETWORK_CASES, ids=lambda c: c.name)
def test_internode_emulated_network_matches_reference(require_gpu, gpu_batch, num_ranks, case):
    _batch(gpu_batch, num_ranks, 2, emulate_network=True)[case.name].assert_passed()


@pytest.mark.gpu
@pytest.mark.parametrize("num_nodes", [4, 8], ids=lambda n: f"{n}nodes")
@pytest.mark.parametrize("case", MORE_NODES_CASES, ids=lambda c: c.name)
def test_internode_more_nodes_match_reference(require_gpu, gpu_batch, num_ranks, num_nodes, case):
    _batch(gpu_batch, num_ranks, num_nodes)[case.name].assert_passed()


@pytest.mark.gpu
def test_internode_worst_tokens_in_cuda_graph(require_gpu, gpu_batch, num_ranks):
    _batch(gpu_batch, num_ranks, 2)["cuda_graph"].assert_passed()


@pytest.mark.gpu
def test_internode_worst_tokens_too_small(require_gpu, gpu_batch, num_ranks):
    _batch(gpu_batch, num_ranks, 2)["worst_too_small"].assert_passed()


@pytest.mark.gpu
def test_internode_back_to_back_calls(require_gpu, gpu_batch, num_ranks):
    _batch(gpu_batch, num_ranks, 2)["back_to_back"].assert_passed()


@pytest.mark.gpu
def test_internode_absent_peer_times_out(require_gpu, num_ranks, launch_timeout_s):
    """A launch of its own: DEEP_EP_PY_TIMEOUT_S=3, a rank that never calls, and an NvshmemContext of its own."""
    num_nodes = 2
    env = {RANKS_PER_NODE_ENV: str(_ranks_per_node(num_ranks, num_nodes)), "DEEP_EP_PY_TIMEOUT_S": TIMEOUT_ENV_S}
    results = launch(run_case, num_ranks, _timeout_case, num_nodes, device="cuda", timeout_s=launch_timeout_s, env=env)
    assert results[-1] == "" and all(f"channel {num_ranks - 1}," in m for m in results[:-1]), results


@pytest.mark.parametrize("num_ranks, num_nodes", [(2, 2), (4, 2), (8, 2), (8, 4), (8, 8), (16, 2)])
def test_internode_layout_sizes(num_ranks, num_nodes):
    """Host-side size functions (no GPU needed, only the extension): the staging area starts after the control area
    on a 16-byte boundary (rows move in 16-byte chunks), and each row per round costs at least one bf16 payload per
    source node (a forwarder holds a round's rows from every node)."""
    ext = _ext.load_extension()
    if ext is None:
        pytest.skip(_ext.kernels_unavailable_reason())
    control_bytes = ext.internode_layout(num_ranks, num_nodes)["control_bytes"]
    assert control_bytes > 0 and control_bytes % 16 == 0, control_bytes
    for hidden, num_topk in [(8, 1), (256, 4), (7168, 8)]:
        rows = [1, 2, 7, 100]
        sizes = [ext.internode_min_bytes(num_ranks, num_nodes, hidden, num_topk, r) for r in rows]
        assert control_bytes < sizes[0] and sizes == sorted(set(sizes)), (hidden, num_topk, sizes)
        for r, size in zip(rows, sizes):
            assert size - control_bytes >= r * num_nodes * 2 * hidden, (hidden, num_topk, r, size, control_bytes)
