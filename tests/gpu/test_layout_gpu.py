"""get_dispatch_layout kernel against a brute-force torch reference: exact comparison (it counts). In-process on the
GPU, and on N ranks sharing it at once (DEEP_EP_PY_GPU_TEST_RANKS). On an emulated tier the in-process tests run the
CPU emulator in the pytest process (require_gpu sets DEEP_EP_PY_EMULATE_DEVICE=1 for the test)."""

from __future__ import annotations

import re

import pytest
from kernel_device import on_kernel_device, tier_device

from deep_ep_py import _ext
from deep_ep_py import device as ep_device

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")

POISON_INT = -7


def reference_layout(topk_idx: torch.Tensor, num_experts: int, num_ranks: int, num_ranks_per_node: int):
    """topk_idx int64 [T, K] on CPU, -1 = none. Returns per-rank [R], per-node [R / rpn], per-expert [E] int32 counts
    and is_token_in_rank bool [T, R]."""
    num_tokens = topk_idx.shape[0]
    is_token_in_expert = torch.zeros(num_tokens, num_experts, dtype=torch.bool)
    for token_idx in range(num_tokens):
        for expert_idx in topk_idx[token_idx].tolist():
            if expert_idx >= 0:
                is_token_in_expert[token_idx, expert_idx] = True
    is_token_in_rank = is_token_in_expert.view(num_tokens, num_ranks, num_experts // num_ranks).any(dim=2)
    num_nodes = max(1, num_ranks // num_ranks_per_node)
    # Ranks per node spelled out: -1 is ambiguous when there are no tokens.
    is_token_in_node = is_token_in_rank.view(num_tokens, num_nodes, num_ranks // num_nodes).any(dim=2)
    return (
        is_token_in_rank.sum(dim=0, dtype=torch.int32),
        is_token_in_node.sum(dim=0, dtype=torch.int32),
        is_token_in_expert.sum(dim=0, dtype=torch.int32),
        is_token_in_rank,
    )


def random_topk_idx(num_tokens: int, num_topk: int, num_experts: int, generator: torch.Generator) -> torch.Tensor:
    """Random experts with repeats within a token allowed, ~20% of choices masked to -1, some all -1 rows."""
    topk_idx = torch.randint(0, num_experts, (num_tokens, num_topk), generator=generator, dtype=torch.int64)
    masked = torch.rand(num_tokens, num_topk, generator=generator) < 0.2
    topk_idx[masked] = -1
    if num_tokens > 2:
        topk_idx[num_tokens // 2] = -1
    return topk_idx


def _check_layout_kernel(
    topk_idx_cpu: torch.Tensor, num_experts: int, num_ranks: int, num_ranks_per_node: int, where: str
) -> torch.Tensor:
    """Run the layout kernel on poisoned outputs (it must write every element) and compare each output exactly
    with the reference; returns num_tokens_per_rank."""
    ext = _ext.load_extension()
    num_tokens, num_topk = topk_idx_cpu.shape
    multi_node = num_ranks > num_ranks_per_node
    num_nodes = num_ranks // num_ranks_per_node if multi_node else 1
    device = ep_device.kernel_device()
    per_rank = torch.full((num_ranks,), POISON_INT, dtype=torch.int32, device=device)
    per_node = torch.full((num_nodes,), POISON_INT, dtype=torch.int32, device=device)
    per_expert = torch.full((num_experts,), POISON_INT, dtype=torch.int32, device=device)
    in_rank = torch.ones((num_tokens, num_ranks), dtype=torch.bool, device=device)
    topk_idx = on_kernel_device(topk_idx_cpu)
    ext.get_dispatch_layout(
        topk_idx.data_ptr(),
        num_tokens,
        num_topk,
        num_experts,
        num_ranks,
        num_ranks_per_node,
        per_rank.data_ptr(),
        per_node.data_ptr() if multi_node else 0,
        per_expert.data_ptr(),
        in_rank.data_ptr(),
        ep_device.current_stream().cuda_stream,
    )
    ep_device.synchronize()
    ref_per_rank, ref_per_node, ref_per_expert, ref_in_rank = reference_layout(
        topk_idx_cpu, num_experts, num_ranks, num_ranks_per_node
    )
    assert torch.equal(per_rank.cpu(), ref_per_rank), f"{where}: {per_rank.cpu()} != {ref_per_rank}"
    assert torch.equal(per_expert.cpu(), ref_per_expert), f"{where}: per-expert counts differ"
    assert torch.equal(in_rank.cpu(), ref_in_rank), f"{where}: is_token_in_rank differs"
    if multi_node:
        assert torch.equal(per_node.cpu(), ref_per_node), f"{where}: {per_node.cpu()} != {ref_per_node}"
    else:
        # Not asked for (null pointer): left untouched.
        assert torch.equal(per_node.cpu(), torch.full((1,), POISON_INT, dtype=torch.int32)), where
    return per_rank


@pytest.mark.parametrize(
    "num_tokens, num_topk, num_experts, num_ranks, num_ranks_per_node",
    [
        (0, 8, 64, 8, 8),  # no tokens
        (1, 1, 8, 8, 8),
        (5, 2, 4, 1, 8),  # one rank
        (129, 8, 256, 8, 8),  # one node (DeepEP intranode shape)
        (4096, 8, 256, 16, 8),  # two nodes
        (1000, 6, 48, 12, 4),  # three nodes
        (333, 32, 1024, 1024, 8),  # K = 32, one expert per rank, 128 nodes
        (257, 9, 16384, 16, 2),  # counters too big for shared memory: global atomics path
    ],
)
def test_dispatch_layout_matches_reference(
    require_gpu, num_tokens, num_topk, num_experts, num_ranks, num_ranks_per_node
):
    generator = torch.Generator().manual_seed(num_tokens * 7919 + num_experts)
    topk_idx_cpu = random_topk_idx(num_tokens, num_topk, num_experts, generator)
    _check_layout_kernel(topk_idx_cpu, num_experts, num_ranks, num_ranks_per_node, "single process")


@pytest.mark.parametrize("bad_id", [64 + 5, -3])
def test_dispatch_layout_skips_and_records_an_id_out_of_range(require_gpu, bad_id):
    """An id outside [-1, E) that reached the kernel unchecked (no host sync under CUDA-graph capture or
    DEEP_EP_PY_SKIP_VALUE_CHECKS) counts as -1, and the error record names it, its token and the rank."""
    from deep_ep_py.errors import DeepEPError

    ext = _ext.load_extension()
    num_tokens, num_topk, num_experts, num_ranks = 300, 8, 64, 8
    topk_idx_cpu = random_topk_idx(num_tokens, num_topk, num_experts, torch.Generator().manual_seed(5))
    seen = topk_idx_cpu.clone()
    seen[217, 3] = -1
    topk_idx_cpu[217, 3] = bad_id
    device = ep_device.kernel_device()
    per_rank = torch.full((num_ranks,), POISON_INT, dtype=torch.int32, device=device)
    per_expert = torch.full((num_experts,), POISON_INT, dtype=torch.int32, device=device)
    in_rank = torch.ones((num_tokens, num_ranks), dtype=torch.bool, device=device)
    record = ext.ErrorRecord()
    ext.get_dispatch_layout(
        on_kernel_device(topk_idx_cpu).data_ptr(), num_tokens, num_topk, num_experts, num_ranks, 8,
        per_rank.data_ptr(), 0, per_expert.data_ptr(), in_rank.data_ptr(), ep_device.current_stream().cuda_stream,
        record.device_ptr, 3,
    )  # fmt: skip
    ep_device.synchronize()
    ref_per_rank, _, ref_per_expert, ref_in_rank = reference_layout(seen, num_experts, num_ranks, 8)
    assert torch.equal(per_rank.cpu(), ref_per_rank)
    assert torch.equal(per_expert.cpu(), ref_per_expert)
    assert torch.equal(in_rank.cpu(), ref_in_rank)
    want = (
        f"topk_idx of get_dispatch_layout: expected expert ids in [-1, 64) (-1 = none), got {bad_id} "
        "(token 217, on rank 3"
    )
    with pytest.raises(DeepEPError, match=re.escape(want)):
        record.check("the test")


def test_dispatch_layout_runs_on_the_given_stream(require_gpu):
    ext = _ext.load_extension()
    num_tokens, num_topk, num_experts, num_ranks = 512, 8, 64, 8
    stream = ep_device.new_stream()
    generator = torch.Generator().manual_seed(0)
    topk_idx_cpu = random_topk_idx(num_tokens, num_topk, num_experts, generator)
    with ep_device.stream(stream):
        topk_idx = on_kernel_device(topk_idx_cpu)
        device = ep_device.kernel_device()
        per_rank = torch.empty(num_ranks, dtype=torch.int32, device=device)
        per_expert = torch.empty(num_experts, dtype=torch.int32, device=device)
        in_rank = torch.empty(num_tokens, num_ranks, dtype=torch.bool, device=device)
        ext.get_dispatch_layout(
            topk_idx.data_ptr(),
            num_tokens,
            num_topk,
            num_experts,
            num_ranks,
            8,
            per_rank.data_ptr(),
            0,
            per_expert.data_ptr(),
            in_rank.data_ptr(),
            stream.cuda_stream,
        )
    stream.synchronize()
    ref_per_rank, _, ref_per_expert, ref_in_rank = reference_layout(topk_idx_cpu, num_experts, num_ranks, 8)
    assert torch.equal(per_rank.cpu(), ref_per_rank)
    assert torch.equal(per_expert.cpu(), ref_per_expert)
    assert torch.equal(in_rank.cpu(), ref_in_rank)


def _layout_worker(rank: int, num_ranks: int, num_tokens: int, num_topk: int, num_experts_per_rank: int) -> int:
    """Every rank runs the layout kernel on its own routing at the same time (ranks share the GPU); exact check."""
    num_experts = num_experts_per_rank * num_ranks
    num_ranks_per_node = 2 if num_ranks % 2 == 0 else num_ranks
    generator = torch.Generator().manual_seed(1000 + rank)
    topk_idx_cpu = random_topk_idx(num_tokens, num_topk, num_experts, generator)
    per_rank = _check_layout_kernel(topk_idx_cpu, num_experts, num_ranks, num_ranks_per_node, f"rank {rank}")
    return int(per_rank.sum().item())


def test_dispatch_layout_on_ranks_sharing_the_gpu(require_gpu, num_ranks, launch_timeout_s):
    from deep_ep_py.testing import launch

    results = launch(_layout_worker, num_ranks, 4096, 8, 32, device=tier_device(), timeout_s=launch_timeout_s)
    assert len(results) == num_ranks and all(total > 0 for total in results), results
