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
case); the absent-peer and late-peer tests need DEEP_EP_PY_TIMEOUT_S=3 and a launch each, with its own
NvshmemContext. The rank functions are shared with the intranode tests (normal_kernels_cases.py); InternodePath
supplies what is internode's own.
"""

from __future__ import annotations

import dataclasses

import pytest
from kernel_device import skip_on_emulator, tier_device
from normal_kernels_cases import (
    BACK_TO_BACK_CASE,
    GRAPH_CASE,
    TIMEOUT_CASE,
    WORST_TOKENS_DIFFER_CASE,
    WORST_TOO_SMALL_CASE,
    Case,
    KernelsPath,
    combine_timeout_case,
    late_peer_case,
    late_peer_combine_case,
    protocol_batch_cases,
    table_batch_cases,
    timeout_case,
)

from deep_ep_py import _ext
from deep_ep_py.testing import launch
from deep_ep_py.testing.batch import run_case

torch = pytest.importorskip("torch")

COMBINE_RTOL = 2e-2
COMBINE_ATOL = 2e-2
TIMEOUT_ENV_S = "3"
RANKS_PER_NODE_ENV = "DEEP_EP_PY_RANKS_PER_NODE"
# Rows per round when a case does not ask for few: more than any case sends, so those cases run in one round.
DEFAULT_ROWS_PER_ROUND = 256


# routing: "random"; "own_node": every expert of a token on the source's node (nothing crosses nodes); "every_node":
# each token has an expert on every node (no drops there); "not_node_1": node 1 receives nothing; "only_node_0".
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
# forwarders, partial sums back, barrier signals). On the CPU emulator the nodes are also separate P2P domains
# (DEEP_EP_PY_EMULATE_P2P_PES): nvshmem_ptr maps no rank of another node, and a put's rows become visible to the
# target only at its next consistency step (a wait or test through NVSHMEM), as over a NIC that may reorder writes.
EMULATE_NETWORK_ENV = "DEEP_EP_PY_EMULATE_NETWORK"
EMULATE_P2P_PES_ENV = "DEEP_EP_PY_EMULATE_P2P_PES"
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
    cases = (*CASES, GRAPH_CASE, BACK_TO_BACK_CASE, TIMEOUT_CASE, WORST_TOO_SMALL_CASE, WORST_TOKENS_DIFFER_CASE)
    shapes = {(c.hidden, c.num_topk, c.rows_per_round) for c in cases}
    largest = max(_rdma_bytes(ext, ctx.num_ranks, num_nodes, *shape) for shape in shapes)
    return NvshmemContext(ctx.group, num_symmetric_bytes=largest)


def _close_nvshmem(context) -> None:
    """Batch teardown: every case's kernels are destroyed by then (their cleanups). NVSHMEM itself ends here, in
    step on every rank, rather than at the process's exit."""
    from deep_ep_py.runtime import finalize_nvshmem

    context.finalize()
    finalize_nvshmem()


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


@dataclasses.dataclass(frozen=True)
class InternodePath(KernelsPath):
    """InternodeKernels with the ranks playing num_nodes nodes, for the shared cases (normal_kernels_cases.py)."""

    num_nodes: int
    name = "internode"
    seconds_per_step = 2.0
    timeout_wait = "internode dispatch notify: the counts of the rank given as the channel"

    def setup(self, ctx, hidden: int, num_topk: int, rows_per_round: int):
        """(reference Buffer over the case's group, InternodeKernels over its resource group). The kernels use the
        batch's NvshmemContext (ctx.shared), or one of their own in a launch of their own; cleanups destroy the
        kernels first, then finalize a context of their own."""
        from brute_force import check_equal

        import deep_ep_py
        from deep_ep_py.backends.internode import InternodeKernels
        from deep_ep_py.runtime import NvshmemContext
        from deep_ep_py.topology import Topology

        ext = _ext.load_extension()
        num_ranks, num_nodes = ctx.num_ranks, self.num_nodes
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
        topology = Topology(num_ranks, ranks_per_node)
        kernels = InternodeKernels(ctx.resource_group, topology, num_rdma_bytes, ext, context)
        ctx.on_cleanup(kernels.destroy)  # cleanups run last registered first: before the context's finalize
        check_equal("rows per round", kernels.rows_per_round(hidden, num_topk)[0], rows)
        return reference, kernels

    def inputs(self, case: Case, num_ranks: int, rank: int, step: int):
        from brute_force import check, make_rank_inputs

        num_nodes = self.num_nodes
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

    def check_routing(self, where: str, case: Case, layout, num_tokens: int, rank: int, num_ranks: int) -> None:
        from brute_force import check

        per_node = layout[1].cpu().tolist()  # num_tokens_per_rdma_rank
        own_node = rank // (num_ranks // self.num_nodes)
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

    def combine_magnitude(self, reference, ref_handle, combine_x: torch.Tensor, biases) -> torch.Tensor:
        """float32 [T, H]: per token and channel, the sum of |row| over the rows that come back plus |bias|: the
        scale the rounding of the per-node bf16 partials is relative to (see the module docstring)."""
        magnitude = reference.combine(combine_x.abs(), ref_handle)[0].float()
        for bias in biases:
            magnitude += bias.float().abs()
        return magnitude

    def check_combined_x(self, where: str, combined_x, ref_x, magnitude) -> None:
        from brute_force import check, check_equal

        check_equal(f"{where} combined_x shape", tuple(combined_x.shape), tuple(ref_x.shape))
        got, want = combined_x.float().cpu(), ref_x.float().cpu()
        check(bool(torch.isfinite(got).all()), f"{where} combined_x: non-finite values")
        bound = COMBINE_ATOL + COMBINE_RTOL * (magnitude.cpu() + want.abs())
        excess = (got - want).abs() - bound
        if bool((excess > 0).any()):
            idx = tuple(torch.nonzero(excess > 0)[0].tolist())
            raise AssertionError(
                f"{where} combined_x: {int((excess > 0).sum())} elements outside atol {COMBINE_ATOL} + rtol"
                f" {COMBINE_RTOL} x (sum of |rows| + |bias| + |want|); first at {idx}: got {got[idx].item()} want"
                f" {want[idx].item()} bound {bound[idx].item()}"
            )


# ---------------------------------------------------------------------------------------------------------- tests


def _ranks_per_node(num_ranks: int, num_nodes: int) -> int:
    if num_ranks < num_nodes or num_ranks % num_nodes != 0:
        pytest.skip(f"{num_ranks} ranks do not split into {num_nodes} nodes")
    return num_ranks // num_nodes


def _batch(gpu_batch, num_ranks: int, num_nodes: int, emulate_network: bool = False):
    """Every selected case of one (rank count, node count, environment) in one launch, with DEEP_EP_PY_RANKS_PER_NODE
    (and DEEP_EP_PY_EMULATE_NETWORK) set in the ranks' environment."""
    ranks_per_node = _ranks_per_node(num_ranks, num_nodes)
    env = {RANKS_PER_NODE_ENV: str(ranks_per_node)}
    path = InternodePath(num_nodes)
    if emulate_network:
        env[EMULATE_NETWORK_ENV] = "1"
        env[EMULATE_P2P_PES_ENV] = str(ranks_per_node)
        table_test, fixed = "test_internode_emulated_network_matches_reference", {}
    elif num_nodes == 2:
        table_test, fixed = "test_internode_matches_reference", {}
    else:
        table_test, fixed = "test_internode_more_nodes_match_reference", {"num_nodes": num_nodes}

    def make_cases(selected):
        cases = table_batch_cases(selected, path, table_test, num_ranks, **fixed)
        if num_nodes == 2 and not emulate_network:
            cases += protocol_batch_cases(selected, path, num_ranks)
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
@pytest.mark.parametrize("num_nodes", [3, 4, 8], ids=lambda n: f"{n}nodes")
@pytest.mark.parametrize("case", MORE_NODES_CASES, ids=lambda c: c.name)
def test_internode_more_nodes_match_reference(require_gpu, gpu_batch, num_ranks, num_nodes, case):
    _batch(gpu_batch, num_ranks, num_nodes)[case.name].assert_passed()


@pytest.mark.gpu
def test_internode_worst_tokens_in_cuda_graph(require_gpu, gpu_batch, num_ranks):
    skip_on_emulator("CUDA graphs")
    _batch(gpu_batch, num_ranks, 2)["cuda_graph"].assert_passed()


@pytest.mark.gpu
def test_internode_worst_tokens_too_small(require_gpu, gpu_batch, num_ranks):
    _batch(gpu_batch, num_ranks, 2)["worst_too_small"].assert_passed()


@pytest.mark.gpu
def test_internode_worst_tokens_too_small_on_one_rank(require_gpu, gpu_batch, num_ranks):
    _batch(gpu_batch, num_ranks, 2)["worst_too_small_on_rank_0"].assert_passed()


@pytest.mark.gpu
def test_internode_worst_tokens_differ_between_ranks(require_gpu, gpu_batch, num_ranks):
    _batch(gpu_batch, num_ranks, 2)["worst_tokens_differ"].assert_passed()


@pytest.mark.gpu
def test_internode_back_to_back_calls(require_gpu, gpu_batch, num_ranks):
    _batch(gpu_batch, num_ranks, 2)["back_to_back"].assert_passed()


@pytest.mark.gpu
@pytest.mark.parametrize("call", ["dispatch", "combine"])
def test_internode_absent_peer_times_out(require_gpu, num_ranks, launch_timeout_s, call):
    """A launch of its own: DEEP_EP_PY_TIMEOUT_S=3, a rank that never makes `call`, and an NvshmemContext of its own.
    A dispatch's wait names the absent rank; a combine's waits name a rank or, for arrivals, a node."""
    num_nodes = 2
    env = {RANKS_PER_NODE_ENV: str(_ranks_per_node(num_ranks, num_nodes)), "DEEP_EP_PY_TIMEOUT_S": TIMEOUT_ENV_S}
    case_fn = timeout_case if call == "dispatch" else combine_timeout_case
    path = InternodePath(num_nodes)
    results = launch(run_case, num_ranks, case_fn, path, device=tier_device(), timeout_s=launch_timeout_s, env=env)
    named = f"channel {num_ranks - 1}," if call == "dispatch" else "internode"
    assert results[-1] == "" and all(named in m for m in results[:-1]), results


@pytest.mark.gpu
@pytest.mark.parametrize("network", [False, True], ids=["p2p", "emulated_network"])
@pytest.mark.parametrize("call", ["dispatch", "combine"])
def test_internode_late_peer_raises(require_gpu, num_ranks, launch_timeout_s, call, network):
    """A launch of its own: DEEP_EP_PY_TIMEOUT_S=3, two nodes, a rank that enters a multi-round `call` after it, and
    an NvshmemContext of its own. With the network emulated, the ranks of the other node learn that a peer gave up
    through NVSHMEM signals (they map none of its memory)."""
    num_nodes = 2
    ranks_per_node = _ranks_per_node(num_ranks, num_nodes)
    env = {RANKS_PER_NODE_ENV: str(ranks_per_node), "DEEP_EP_PY_TIMEOUT_S": TIMEOUT_ENV_S}
    if network:
        env[EMULATE_NETWORK_ENV] = "1"
        env[EMULATE_P2P_PES_ENV] = str(ranks_per_node)
    case_fn = late_peer_case if call == "dispatch" else late_peer_combine_case
    path = InternodePath(num_nodes)
    results = launch(run_case, num_ranks, case_fn, path, device=tier_device(), timeout_s=launch_timeout_s, env=env)
    assert "gave up" in results[-1], results


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
