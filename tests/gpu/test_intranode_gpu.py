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
after every rank has left the case) and groups of its own; the absent-peer and late-peer tests need
DEEP_EP_PY_TIMEOUT_S=3 and a launch each. The rank functions are shared with the internode tests
(normal_kernels_cases.py); IntranodePath supplies what is intranode's own.
"""

from __future__ import annotations

import normal_kernels_cases as cases
import pytest
from kernel_device import delay_this_rank, on_kernel_device, skip_on_emulator, tier_device
from normal_kernels_cases import (
    Case,
    KernelsPath,
    late_peer_case,
    late_peer_combine_case,
    protocol_batch_cases,
    table_batch_cases,
    timeout_case,
)

from deep_ep_py import _ext
from deep_ep_py import device as ep_device
from deep_ep_py.backends.round_kernels import MAX_HOST_SEQUENCE
from deep_ep_py.testing import launch
from deep_ep_py.testing.batch import BatchCase, run_case

torch = pytest.importorskip("torch")

COMBINE_RTOL = 1e-2
COMBINE_ATOL = 1e-2
TIMEOUT_ENV_S = "3"


# routing: "random"; "not_rank_1" (rank 1 receives nothing); "only_rank_0" (all to one rank).
CASES = [
    Case("random", (64, 33, 0, 47), drop_prob=0.2, num_biases=1),
    Case("multi_round", (40, 29, 17, 35), drop_prob=0.1, alignment=8, num_biases=2, rows_per_round=3),
    Case("rank1_receives_nothing", (24, 0, 19, 8), routing="not_rank_1", num_topk=3),
    Case("all_to_one_rank", (30, 12, 25, 7), routing="only_rank_0", num_topk=2, rows_per_round=5),
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
    # Launches ceil(num_worst_tokens / 4) rounds, more than the counts need at every rank count (the busiest pair
    # carries at most 22 rows): the rounds past the notify's count must do nothing, barriers included.
    Case("worst_multi_round", (15, 3, 22, 9), fp8=True, worst=True, rows_per_round=4),
    Case("cached", (31, 5, 12, 17), drop_prob=0.25, cached=True),
    Case("cached_worst_multi_round", (31, 5, 12, 17), cached=True, worst=True, rows_per_round=6),
    Case("repeat_100", (48, 31, 9, 40), drop_prob=0.2, num_biases=1, num_steps=100),
    Case("repeat_100_multi_round", (48, 31, 9, 40), drop_prob=0.2, num_steps=100, rows_per_round=7),
]


# ---------------------------------------------------------------------------------------------- rank functions


class IntranodePath(KernelsPath):
    """IntranodeKernels, every rank on one node, for the shared cases (normal_kernels_cases.py)."""

    name = "intranode"
    seconds_per_step = 1.5
    timeout_wait = "intranode dispatch notify barrier"
    num_recv_arena_bytes = 0

    def setup(self, ctx, hidden: int, num_topk: int, rows_per_round: int):
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
        kernels = IntranodeKernels(
            ctx.resource_group,
            Topology(num_ranks, num_ranks),
            num_nvl_bytes,
            ext,
            num_recv_arena_bytes=self.num_recv_arena_bytes,
        )
        ctx.on_cleanup(kernels.destroy)
        if rows_per_round > 0:
            check_equal("rows per round", kernels.rows_per_round(hidden, num_topk)[0], rows_per_round)
        return reference, kernels

    def inputs(self, case: Case, num_ranks: int, rank: int, step: int):
        from brute_force import make_rank_inputs

        num_experts = case.experts_per_rank * num_ranks
        owner = [e // case.experts_per_rank for e in range(num_experts)]
        allowed = {
            "random": list(range(num_experts)),
            "not_rank_1": [e for e in range(num_experts) if owner[e] != 1],
            "only_rank_0": [e for e in range(num_experts) if owner[e] == 0],
        }[case.routing]
        seed = 1000 * step + len(case.name) * 31 + num_ranks
        num_tokens = case.tokens[rank % len(case.tokens)]
        inp = make_rank_inputs(seed, rank, num_tokens, case.hidden, case.num_topk, num_experts, allowed, case.drop_prob)
        return inp, num_experts

    def check_routing(self, where: str, case: Case, layout, num_tokens: int, rank: int, num_ranks: int) -> None:
        from brute_force import check

        per_rank = layout[0].cpu().tolist()
        receives = {"not_rank_1": lambda r: r != 1, "only_rank_0": lambda r: r == 0}.get(case.routing, lambda r: True)
        check(
            all(count == 0 or receives(r) for r, count in enumerate(per_rank)),
            f"{where}: tokens per destination rank {per_rank} do not fit routing {case.routing!r}",
        )

    def check_combined_x(self, where: str, combined_x, ref_x, magnitude) -> None:
        from brute_force import check_close

        check_close(f"{where} combined_x", combined_x, ref_x, COMBINE_RTOL, COMBINE_ATOL)

    def after_dispatch(self, ctx, where: str, kernels, outputs, *, captured=False, check_note=True) -> None:
        """The rounds the notify counted (num_rounds_device, which the kernels run) are the ones the busiest (source,
        destination) pair needs, at least 1, whatever the host launched (without a host sync: the most the counts
        could need). dead_rounds_case checks that the rounds past it run no barrier."""
        from brute_force import check, check_equal

        handle = outputs[5]
        state = handle.backend_state
        matrix = handle.rank_prefix_matrix.cpu().to(torch.int64)  # [i][r]: rows r receives from ranks 0..i
        pair_counts = torch.cat([matrix[:1], matrix[1:] - matrix[:-1]])
        needed = _rounds_needed(int(pair_counts.max()), state.rows_per_round)
        check_equal(f"{where} rounds the notify counted", int(state.num_rounds_device.item()), needed)
        if handle.num_worst_tokens == 0:
            check_equal(f"{where} rounds launched", state.num_rounds, needed)
        else:
            check(state.num_rounds >= needed, f"{where}: launched {state.num_rounds} rounds, {needed} needed")

    def runs_at(self, case: Case, num_ranks: int) -> bool:
        """not_rank_1 needs a rank 1."""
        return num_ranks >= 2 or case.routing != "not_rank_1"


class IntranodeOneCopyPath(IntranodePath):
    """The same kernels with a receive arena: dispatch results are arena blocks that peers write straight into, and
    combine sources read their rows straight from the arenas (the input copied in when it is not a dispatch result).
    ONE_COPY has room for every call: each dispatch and combine must go by the one-copy path, dispatch results in the
    arena. ONE_COPY_STARVED fills the last rank's arena before the case: that rank gets no block, so every rank must
    move every call's rows through the rounds (the others' results still in their arenas), exactly all the same."""

    def __init__(self, name: str, num_recv_arena_bytes: int, starve_last_rank: bool) -> None:
        self.name = name
        self.num_recv_arena_bytes = num_recv_arena_bytes
        self.starve_last_rank = starve_last_rank

    def setup(self, ctx, hidden: int, num_topk: int, rows_per_round: int):
        from deep_ep_py.recv_arena import Part

        reference, kernels = super().setup(ctx, hidden, num_topk, rows_per_round)
        if self.starve_last_rank and ctx.rank == ctx.num_ranks - 1:
            # Held as long as the kernels: the whole arena, so not even a call that receives nothing fits.
            kernels.test_starving_block = kernels.recv_arena.allocate(
                [Part((self.num_recv_arena_bytes,), torch.uint8)], ep_device.current_stream()
            )
            assert kernels.test_starving_block is not None
        return reference, kernels

    def after_dispatch(self, ctx, where: str, kernels, outputs, *, captured=False, check_note=True) -> None:
        from brute_force import check, check_equal

        super().after_dispatch(ctx, where, kernels, outputs, captured=captured, check_note=check_note)
        in_arena = kernels.recv_arena.contains(outputs[0])
        if captured:
            # Capture takes no block (a replay would write into whatever the block has become), so every rank's
            # captured dispatch went through the rounds.
            check(not in_arena, f"{where}: a captured dispatch returned receive-arena tensors")
            check(not kernels.debug_one_copy_note(), f"{where}: a captured dispatch noted the one-copy path")
            return
        starved = self.starve_last_rank and ctx.rank == ctx.num_ranks - 1
        if outputs[0].numel() > 0:  # torch gives an empty tensor a null pointer, in the arena or not
            check_equal(f"{where} recv_x in the receive arena", in_arena, not starved)
        if check_note:
            # One-copy exactly when every rank's results got a block.
            check_equal(f"{where} one-copy note", kernels.debug_one_copy_note(), not self.starve_last_rank)

    def combine_inputs(self, kernels, dispatched, combine_x, combine_weights):
        """bf16 cases combine their dispatch's recv_x, overwritten with combine_x's values, with its recv_topk_weights:
        both in the arena, so the combine takes no block. fp8 cases (recv_x is fp8) pass combine_x and a copy of the
        weights, neither in the arena: the combine copies both into one block. (back_to_back covers x copied alone.)"""
        recv_x = dispatched[0]
        self._blocks_before = kernels.recv_arena.num_blocks_allocated
        if recv_x.dtype == combine_x.dtype and recv_x.shape == combine_x.shape:
            x, weights = recv_x.copy_(combine_x), combine_weights
        else:
            x, weights = combine_x, combine_weights.clone() if combine_weights is not None else None
        needs_copy = [t for t in (x, weights) if t is not None and t.numel() > 0 and not kernels.recv_arena.contains(t)]
        self._blocks_expected = 1 if needs_copy else 0
        return x, weights

    def after_combine(self, ctx, where: str, kernels) -> None:
        from brute_force import check_equal

        # One-copy exactly when every rank's input (and weights) got into its arena; the starved rank has no room.
        check_equal(f"{where} combine one-copy note", kernels.debug_one_copy_note(), not self.starve_last_rank)
        if not self.starve_last_rank:
            taken = kernels.recv_arena.num_blocks_allocated - self._blocks_before
            check_equal(f"{where} blocks the combine took for copies of its inputs", taken, self._blocks_expected)


INTRANODE = IntranodePath()
# 64 MiB per rank holds every table case's results (the largest, hidden 512, is well under 1 MiB a call) with the
# back-to-back test's six steps alive at once.
ONE_COPY = IntranodeOneCopyPath("intranode_one_copy", 64 << 20, starve_last_rank=False)
ONE_COPY_STARVED = IntranodeOneCopyPath("intranode_one_copy_starved", 64 << 20, starve_last_rank=True)
STARVED_CASES = [case for case in CASES if case.name in ("random", "multi_round", "cached", "repeat_100", "worst")]


REUSE_CASE = Case("reuse", (29, 7, 0, 18), drop_prob=0.2)
NUM_REUSE_STEPS = 8


def reuse_case(ctx, path: IntranodeOneCopyPath) -> None:
    """One-copy blocks reused across calls with no host sync in between (odd steps use num_worst_tokens): each step
    dispatches, combines its own recv_x (read straight from the arenas), and drops every result and the handle at
    once, so the next step's dispatch (a fast peer's first) takes the same blocks while a rank delayed on the GPU may
    still be reading them. Every step must equal the reference; some step must really have reused a block."""
    from brute_force import check, check_equal

    rank, num_ranks = ctx.rank, ctx.num_ranks
    reference, kernels = cases._reference_and_kernels(ctx, path, REUSE_CASE)
    steps = []
    for step in range(NUM_REUSE_STEPS):
        inp, num_experts = path.inputs(REUSE_CASE, num_ranks, rank, step)
        topk_idx, topk_weights = on_kernel_device(inp.topk_idx), on_kernel_device(inp.topk_weights)
        layout = reference.get_dispatch_layout(topk_idx, num_experts)[:4]
        num_worst = cases._total_tokens(ctx, inp.x.shape[0]) + 1 if step % 2 == 1 else 0
        x = on_kernel_device(inp.x)
        ref_out = cases._reference_dispatch(reference, x, layout, topk_idx, topk_weights, 1, num_worst)
        with_weights = step % 3 != 2  # every third combine without top-k weights
        ref_combined = reference.combine(ref_out[0], ref_out[4], topk_weights=ref_out[2] if with_weights else None)
        kernel_layout = (layout[3], layout[0], layout[2], topk_idx, topk_weights)
        steps.append((x, kernel_layout, num_worst, with_weights, ref_out, ref_combined))
    ep_device.synchronize()
    ctx.barrier()

    results, block_ptrs = [], []
    for step, (x, kernel_layout, num_worst, with_weights, *_) in enumerate(steps):
        if step % num_ranks == rank:
            delay_this_rank()  # about a millisecond: this rank enters the step late
        mine = kernels.dispatch(x, None, None, *kernel_layout, 1, num_worst, 8)
        block_ptrs.append(mine[0].data_ptr())
        kept = (mine[0].clone(), mine[3].clone())  # ordered on the stream before the block can go back
        combined = kernels.combine(mine[0], mine[5], mine[3] if with_weights else None, (), 8)
        results.append((kept, combined))
        del mine  # every view of the block, the handle's included: the next dispatch may take it
    ep_device.synchronize()
    kernels._check_device_errors("one-copy reuse test")
    check(len(set(block_ptrs)) < len(block_ptrs), f"no step reused an arena block: {block_ptrs}")
    for step, ((recv_x, recv_weights), combined) in enumerate(results):
        ref_out, ref_combined = steps[step][4], steps[step][5]
        where = f"reuse step {step} {path.label(ctx)}"
        check_equal(f"{where} recv_x", recv_x, ref_out[0])
        check_equal(f"{where} recv_topk_weights", recv_weights, ref_out[2])
        cases._compare_combine(path, where, ref_combined, combined, None)


INT32_MAX = 2**31 - 1
EPOCH_WRAP_CASE = Case("epoch_wrap", (20, 13, 8, 16), drop_prob=0.1, rows_per_round=3)
NUM_WRAP_BARRIERS = 3
# How late the late rank of each barrier of the epoch-wrap test enters it.
WRAP_LATE_S = 0.5


def _set_barrier_epoch(ctx, kernels, epoch: int) -> None:
    """This rank's control area as after `epoch` barriers: its local_epoch, and every peer's flag there as that
    peer's barrier `epoch` left it (an int32, so epochs past 2^31 read negative). Every rank out of its calls first,
    and done before any rank goes on."""
    from deep_ep_py.runtime import device_bytes_view

    constants = kernels._constants
    ep_device.synchronize()
    ctx.barrier()
    control = device_bytes_view(kernels.buffer.local_ptr, constants["staging_offset"]).view(torch.int32)
    first_flag = constants["barrier_flags_offset"] // 4
    control[first_flag : first_flag + ctx.num_ranks] = epoch
    control[constants["local_epoch_offset"] // 4] = epoch
    ep_device.synchronize()
    ctx.barrier()


def _rounds_needed(max_pair_count: int, rows_per_round: int) -> int:
    """The rounds the busiest (source, destination) pair needs, at least 1 (as the notify kernel counts them)."""
    return max(1, -(-max_pair_count // rows_per_round))


def _local_epoch(kernels) -> int:
    """Barriers this rank has run (its control area's local_epoch), once its calls are done."""
    from deep_ep_py.runtime import device_bytes_view

    constants = kernels._constants
    ep_device.synchronize()
    control = device_bytes_view(kernels.buffer.local_ptr, constants["staging_offset"]).view(torch.int32)
    return int(control[constants["local_epoch_offset"] // 4].item())


# num_worst_tokens makes the host launch ceil(num_worst_tokens / 4) rounds, more than the busiest pair needs.
DEAD_ROUNDS_CASE = Case("dead_rounds", (15, 3, 22, 9), drop_prob=0.1, worst=True, rows_per_round=4, cached=True)


def dead_rounds_case(ctx, path: IntranodePath) -> None:
    """The rounds past what the counts need run no barrier on any rank: a dispatch (notify barrier + 2 a round), its
    cached dispatch and its combine (2 a round each) step the epoch by 1 + 6 * needed, not by the rounds launched,
    and the results match the reference."""
    import torch.distributed as dist
    from brute_force import check, check_equal

    case = DEAD_ROUNDS_CASE
    reference, kernels = cases._reference_and_kernels(ctx, path, case)
    inp, num_experts = path.inputs(case, ctx.num_ranks, ctx.rank, 0)
    is_token_in_rank = reference.get_dispatch_layout(inp.topk_idx, num_experts)[3]
    sent = is_token_in_rank.to(torch.int64).sum(dim=0).reshape(1, -1)
    pair_counts = [torch.empty_like(sent) for _ in range(ctx.num_ranks)]
    dist.all_gather(pair_counts, sent, group=ctx.group)
    needed = _rounds_needed(int(torch.cat(pair_counts).max()), case.rows_per_round)
    num_worst = cases._total_tokens(ctx, inp.x.shape[0]) + 3  # as _run_step passes it
    launched = -(-num_worst // case.rows_per_round)
    check(launched > needed, f"the case launches {launched} rounds for the {needed} needed: no round to skip")
    before = _local_epoch(kernels)
    cases._run_step(ctx, path, case, reference, kernels, 0, 8)
    kernels._check_device_errors("the dead-rounds test")
    check_equal(f"{case.name} {path.label(ctx)}: barriers run", _local_epoch(kernels) - before, 1 + 6 * needed)


def epoch_wrap_case(ctx, path: IntranodePath) -> None:
    """Barrier epochs past 2^31 (the int32 count wraps to -2^31): from 2^31 - 2 barriers, three barriers, each with
    another rank entering WRAP_LATE_S late; no rank may leave one before its late rank entered it (host times on the
    machine's monotonic clock, which the ranks share). A signed comparison lets the barrier of epoch -2^31 through at
    once. Then, from 2^31 - 3 so that the wrap falls inside its rounds, a dispatch and combine must match the
    reference; and two more, whose host-counter sequence numbers are the last before the wrap and the first after
    it (which the counters' wait must tell from the previous call's)."""
    import time

    import torch.distributed as dist
    from brute_force import check

    rank, num_ranks = ctx.rank, ctx.num_ranks
    reference, kernels = cases._reference_and_kernels(ctx, path, EPOCH_WRAP_CASE)
    _set_barrier_epoch(ctx, kernels, INT32_MAX - 1)
    for barrier_idx in range(NUM_WRAP_BARRIERS):
        late = barrier_idx % num_ranks
        ctx.barrier()
        if rank == late:
            time.sleep(WRAP_LATE_S)
        entered = time.monotonic()
        kernels.barrier()
        ep_device.synchronize()
        left = time.monotonic()
        times: list = [None] * num_ranks
        dist.all_gather_object(times, (entered, left), group=ctx.group)
        late_entered = times[late][0]
        for other, (_, other_left) in enumerate(times):
            check(
                other_left >= late_entered,
                f"barrier {barrier_idx} past epoch 2^31 - 2: rank {other} left it {late_entered - other_left:.3f} s "
                f"before rank {late} entered it",
            )
    kernels._check_device_errors("the epoch-wrap test's barriers")
    _set_barrier_epoch(ctx, kernels, INT32_MAX - 2)
    cases._run_step(ctx, path, EPOCH_WRAP_CASE, reference, kernels, 0, 8)
    kernels._check_device_errors("the epoch-wrap test's dispatch and combine")
    kernels._sequence = MAX_HOST_SEQUENCE - 1
    for step in (1, 2):
        cases._run_step(ctx, path, EPOCH_WRAP_CASE, reference, kernels, step, 8)
    check(kernels._sequence == 1, f"host-counter sequence after the wrap: expected 1, got {kernels._sequence}")
    kernels._check_device_errors("the epoch-wrap test's dispatches across the host-counter sequence wrap")


# ---------------------------------------------------------------------------------------------------------- tests


def _batch(gpu_batch, num_ranks: int, path: IntranodePath = INTRANODE):
    """Every selected case of this module's `path` at num_ranks, in one launch."""

    def make_cases(selected):
        extra = []
        reuse_test = "test_intranode_one_copy_reuse_without_sync"
        if path.name == ONE_COPY.name and selected(reuse_test, "num_ranks", num_ranks=num_ranks):
            extra.append(BatchCase("reuse", reuse_case, (path,), run_s=path.run_s(2 * NUM_REUSE_STEPS)))
        wrap_test = "test_intranode_barrier_epochs_wrap"
        if path.name == INTRANODE.name and num_ranks >= 2 and selected(wrap_test, "num_ranks", num_ranks=num_ranks):
            extra.append(BatchCase("epoch_wrap", epoch_wrap_case, (path,), run_s=path.run_s(4 + NUM_WRAP_BARRIERS)))
        dead_rounds_test = "test_intranode_rounds_past_the_counts_run_no_barrier"
        if path.name == INTRANODE.name and selected(dead_rounds_test, "num_ranks", num_ranks=num_ranks):
            extra.append(BatchCase("dead_rounds", dead_rounds_case, (path,), run_s=path.run_s(3)))
        return [
            *table_batch_cases(selected, path, f"test_{path.name}_matches_reference", num_ranks),
            *protocol_batch_cases(selected, path, num_ranks),
            *extra,
        ]

    return gpu_batch((path.name, num_ranks), make_cases, num_ranks)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_intranode_matches_reference(require_gpu, gpu_batch, num_ranks, case):
    if not INTRANODE.runs_at(case, num_ranks):
        pytest.skip("needs a rank 1")
    _batch(gpu_batch, num_ranks)[case.name].assert_passed()


@pytest.mark.gpu
def test_intranode_worst_tokens_in_cuda_graph(require_gpu, gpu_batch, num_ranks):
    skip_on_emulator("CUDA graphs")
    _batch(gpu_batch, num_ranks)["cuda_graph"].assert_passed()


@pytest.mark.gpu
def test_intranode_worst_tokens_too_small(require_gpu, gpu_batch, num_ranks):
    _batch(gpu_batch, num_ranks)["worst_too_small"].assert_passed()


@pytest.mark.gpu
def test_intranode_worst_tokens_too_small_on_one_rank(require_gpu, gpu_batch, num_ranks):
    if num_ranks < 2:
        pytest.skip("needs a rank 1")
    _batch(gpu_batch, num_ranks)["worst_too_small_on_rank_0"].assert_passed()


@pytest.mark.gpu
def test_intranode_worst_tokens_differ_between_ranks(require_gpu, gpu_batch, num_ranks):
    if num_ranks < 2:
        pytest.skip("needs a rank 1")
    _batch(gpu_batch, num_ranks)["worst_tokens_differ"].assert_passed()


@pytest.mark.gpu
def test_intranode_back_to_back_calls(require_gpu, gpu_batch, num_ranks):
    _batch(gpu_batch, num_ranks)["back_to_back"].assert_passed()


@pytest.mark.gpu
def test_intranode_rounds_past_the_counts_run_no_barrier(require_gpu, gpu_batch, num_ranks):
    _batch(gpu_batch, num_ranks)["dead_rounds"].assert_passed()


@pytest.mark.gpu
def test_intranode_barrier_epochs_wrap(require_gpu, gpu_batch, num_ranks):
    if num_ranks < 2:
        pytest.skip("needs a peer to wait for")
    _batch(gpu_batch, num_ranks)["epoch_wrap"].assert_passed()


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_intranode_one_copy_matches_reference(require_gpu, gpu_batch, num_ranks, case):
    if not ONE_COPY.runs_at(case, num_ranks):
        pytest.skip("needs a rank 1")
    _batch(gpu_batch, num_ranks, ONE_COPY)[case.name].assert_passed()


@pytest.mark.gpu
def test_intranode_one_copy_worst_tokens_in_cuda_graph(require_gpu, gpu_batch, num_ranks):
    """Capture takes no arena block, so every rank's captured dispatch goes through the rounds."""
    skip_on_emulator("CUDA graphs")
    _batch(gpu_batch, num_ranks, ONE_COPY)["cuda_graph"].assert_passed()


@pytest.mark.gpu
def test_intranode_one_copy_worst_tokens_too_small(require_gpu, gpu_batch, num_ranks):
    _batch(gpu_batch, num_ranks, ONE_COPY)["worst_too_small"].assert_passed()


@pytest.mark.gpu
def test_intranode_one_copy_worst_tokens_too_small_on_one_rank(require_gpu, gpu_batch, num_ranks):
    if num_ranks < 2:
        pytest.skip("needs a rank 1")
    _batch(gpu_batch, num_ranks, ONE_COPY)["worst_too_small_on_rank_0"].assert_passed()


@pytest.mark.gpu
def test_intranode_one_copy_worst_tokens_differ_between_ranks(require_gpu, gpu_batch, num_ranks):
    if num_ranks < 2:
        pytest.skip("needs a rank 1")
    _batch(gpu_batch, num_ranks, ONE_COPY)["worst_tokens_differ"].assert_passed()


@pytest.mark.gpu
def test_intranode_one_copy_back_to_back_calls(require_gpu, gpu_batch, num_ranks):
    _batch(gpu_batch, num_ranks, ONE_COPY)["back_to_back"].assert_passed()


@pytest.mark.gpu
def test_intranode_one_copy_reuse_without_sync(require_gpu, gpu_batch, num_ranks):
    _batch(gpu_batch, num_ranks, ONE_COPY)["reuse"].assert_passed()


@pytest.mark.gpu
@pytest.mark.parametrize("case", STARVED_CASES, ids=lambda c: c.name)
def test_intranode_one_copy_starved_matches_reference(require_gpu, gpu_batch, num_ranks, case):
    _batch(gpu_batch, num_ranks, ONE_COPY_STARVED)[case.name].assert_passed()


@pytest.mark.gpu
def test_intranode_one_copy_starved_back_to_back_calls(require_gpu, gpu_batch, num_ranks):
    _batch(gpu_batch, num_ranks, ONE_COPY_STARVED)["back_to_back"].assert_passed()


# The call the absent rank never makes -> (the case, what the others' timeout names besides the absent rank).
ABSENT_IN = {"dispatch": (timeout_case, "notify barrier"), "combine": (cases.combine_timeout_case, "round barrier")}


def _launch_with_short_timeout(case_fn, num_ranks: int, launch_timeout_s: float) -> list:
    """A launch of its own for case_fn, with device waits giving up after DEEP_EP_PY_TIMEOUT_S=TIMEOUT_ENV_S."""
    return launch(
        run_case,
        num_ranks,
        case_fn,
        INTRANODE,
        device=tier_device(),
        timeout_s=launch_timeout_s,
        env={"DEEP_EP_PY_TIMEOUT_S": TIMEOUT_ENV_S},
    )


@pytest.mark.gpu
@pytest.mark.parametrize("call", list(ABSENT_IN))
def test_intranode_absent_peer_times_out(require_gpu, num_ranks, launch_timeout_s, call):
    """A launch of its own: DEEP_EP_PY_TIMEOUT_S=3, and a rank that never makes `call`."""
    if num_ranks < 2:
        pytest.skip("needs a peer")
    case_fn, wait = ABSENT_IN[call]
    results = _launch_with_short_timeout(case_fn, num_ranks, launch_timeout_s)
    assert results[-1] == "", results
    for message in results[:-1]:
        assert f"channel {num_ranks - 1}," in message and wait in message, message


@pytest.mark.gpu
@pytest.mark.parametrize("call", ["dispatch", "combine"])
def test_intranode_late_peer_raises(require_gpu, num_ranks, launch_timeout_s, call):
    """A launch of its own: DEEP_EP_PY_TIMEOUT_S=3, and a rank that enters a multi-round `call` after it."""
    if num_ranks < 2:
        pytest.skip("needs a peer")
    case_fn = late_peer_case if call == "dispatch" else late_peer_combine_case
    results = _launch_with_short_timeout(case_fn, num_ranks, launch_timeout_s)
    assert "gave up" in results[-1], results


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
