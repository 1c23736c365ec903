"""Buffer on the cuda backend with the ranks playing two nodes, end to end: Buffer(backend="cuda") with
num_ranks_per_node (or DEEP_EP_PY_RANKS_PER_NODE) and Buffer(backend="reference") give the same results on the same
inputs for get_dispatch_layout, dispatch, cached dispatch and combine, called by those names and by their
internode_dispatch / internode_combine names.

With DEEP_EP_PY_UNVERIFIED_KERNELS=1 the calls must reach the internode kernels through the wiring in backends/cuda.py
(the backend holds an InternodeKernels as `internode`, no intranode kernels, and every handle is the internode
kernels' own); without it, the reference fallback on GPU tensors (no internode kernels built at all).

combined_x: the internode combine rounds a bf16 partial sum per node before the final rounding, so the tolerance
(rtol = atol = 2e-2) scales with the sum of the magnitudes that come back, not with the result alone (see
test_internode_gpu.py). combined_topk_weights is exact: float32 partials, and each top-k slot is non-zero on at most
one rank (the combine gets the dispatch's recv_topk_weights).
"""

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

NUM_TOKENS, HIDDEN, NUM_TOPK, EXPERTS_PER_RANK = 96, 256, 4, 4
NUM_NODES = 2
COMBINE_TOLERANCE = 2e-2
# Rows per round of the internode buffer when the size hints ask for none (ranks per node from the argument only:
# the hints assume 8 ranks per node then): room for every row of a call in one round.
MIN_ROWS_PER_ROUND = 128
RANKS_PER_NODE_ENV = "DEEP_EP_PY_RANKS_PER_NODE"
UNVERIFIED_KERNELS_ENV = "DEEP_EP_PY_UNVERIFIED_KERNELS"


def _inputs(rank: int, num_experts: int, device: torch.device):
    gen = torch.Generator().manual_seed(2000 + rank)
    x = torch.randn(NUM_TOKENS, HIDDEN, generator=gen).to(torch.bfloat16)
    topk_idx = torch.randn(NUM_TOKENS, num_experts, generator=gen).topk(NUM_TOPK).indices
    topk_idx[torch.rand(NUM_TOKENS, NUM_TOPK, generator=gen) < 0.1] = -1
    weights = torch.rand(NUM_TOKENS, NUM_TOPK, generator=gen)
    return x.to(device), topk_idx.to(device), weights.to(device)


def _normal(buffer, x, topk_idx, weights, num_experts: int, internode_names: bool):
    """Layout, dispatch, cached dispatch (new x), combine with weights, and a combine of |rows| without weights (all
    partial sums positive: the scale of the tolerance)."""
    dispatch = buffer.internode_dispatch if internode_names else buffer.dispatch
    combine = buffer.internode_combine if internode_names else buffer.combine
    per_rank, per_rdma, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
    recv_x, recv_idx, recv_w, per_expert_list, handle, _ = dispatch(
        x,
        num_tokens_per_rank=per_rank,
        num_tokens_per_rdma_rank=per_rdma,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        topk_idx=topk_idx,
        topk_weights=weights,
        expert_alignment=4,
    )
    cached_recv_x = dispatch(x * 3, handle=handle)[0]
    combined, combined_w, _ = combine(recv_x * 2, handle, topk_weights=recv_w)
    magnitude = combine(recv_x.abs() * 2, handle)[0]
    ep_device.synchronize()
    exact = [per_rank, per_rdma, per_expert, in_rank, recv_x, recv_idx, recv_w, handle[0], cached_recv_x, combined_w]
    return exact, per_expert_list, combined, magnitude, handle


def _compare(rank: int, num_ranks: int, topology_from: str, unverified_kernels: str) -> None:
    import deep_ep_py
    from deep_ep_py import _ext

    device = ep_device.kernel_device()
    num_experts = EXPERTS_PER_RANK * num_ranks
    ranks_per_node = num_ranks // NUM_NODES
    group = dist.group.WORLD
    configs = (deep_ep_py.Buffer.get_dispatch_config(num_ranks), deep_ep_py.Buffer.get_combine_config(num_ranks))
    num_nvl_bytes = max(config.get_nvl_buffer_size_hint(HIDDEN * 2, num_ranks) for config in configs)
    num_rdma_bytes = max(config.get_rdma_buffer_size_hint(HIDDEN * 2, num_ranks) for config in configs)
    num_rdma_bytes = max(
        num_rdma_bytes,
        _ext.load_extension().internode_min_bytes(num_ranks, NUM_NODES, HIDDEN, NUM_TOPK, MIN_ROWS_PER_ROUND),
    )
    topology = {"num_ranks_per_node": ranks_per_node} if topology_from == "argument" else {}
    buffers = {
        name: deep_ep_py.Buffer(group, num_nvl_bytes, num_rdma_bytes, explicitly_destroy=True, backend=name, **topology)
        for name in ("cuda", "reference")
    }
    cuda = buffers["cuda"]
    assert cuda.backend == "cuda"
    for name, buffer in buffers.items():
        assert buffer.topology.num_nodes == NUM_NODES, f"rank {rank}: {name} Buffer has {buffer.topology}"
    kernels = getattr(cuda._backend, "internode", None)
    if unverified_kernels == "1":
        assert kernels is not None, f"rank {rank}: no internode kernels on Buffer(backend='cuda') across nodes"
        assert cuda._backend.intranode is None, f"rank {rank}: intranode kernels on a group that spans nodes"
    else:
        assert kernels is None, f"rank {rank}: internode kernels without {UNVERIFIED_KERNELS_ENV}=1"
    # The RDMA buffer tensor is the internode kernels' symmetric buffer where they exist. They hold no NVLink buffer,
    # so that tensor is a zero stand-in, as on the reference.
    rdma = cuda.get_local_buffer_tensor(torch.uint8, use_rdma_buffer=True)
    if kernels is not None:
        assert rdma.data_ptr() == kernels.buffer_ptr, f"rank {rank}: the RDMA buffer tensor is not the kernels'"
    nvl = cuda.get_local_buffer_tensor(torch.uint8)
    assert nvl.numel() == num_nvl_bytes and nvl.count_nonzero().item() == 0, f"rank {rank}: NVLink stand-in {nvl}"

    x, topk_idx, weights = _inputs(rank, num_experts, device)
    for repeat in range(4):  # repeated calls, by both names: no stale state between them
        internode_names = repeat % 2 == 1
        where = f"rank {rank}/{num_ranks} call {repeat} ({'internode_*' if internode_names else 'dispatch/combine'})"
        got, got_list, got_combined, got_magnitude, handle = _normal(
            cuda, x, topk_idx, weights, num_experts, internode_names
        )
        want, want_list, want_combined, magnitude, _ = _normal(
            buffers["reference"], x, topk_idx, weights, num_experts, internode_names
        )
        if kernels is not None:
            assert kernels.owns(handle), f"{where}: the dispatch did not run on the internode kernels"
        for i, (g, w) in enumerate(zip(got, want)):
            assert torch.equal(g.cpu(), w.cpu()), f"{where}: output {i} differs"
        assert got_list == want_list, f"{where}: per-expert counts {got_list} != {want_list}"
        _assert_combined_close(f"{where} combined_x", got_combined, want_combined, magnitude)
        _assert_combined_close(f"{where} combined |x|", got_magnitude, magnitude, magnitude)
    check_results_allocated_on_the_callers_stream(cuda, x, topk_idx, weights, num_experts, low_latency_tokens=None)
    for buffer in buffers.values():
        buffer.destroy()
    finalize_nvshmem()


def _assert_combined_close(what: str, got: torch.Tensor, want: torch.Tensor, magnitude: torch.Tensor) -> None:
    """|got - want| <= tol * (1 + magnitude + |want|) elementwise (see the module docstring)."""
    got, want = got.float().cpu(), want.float().cpu()
    assert bool(torch.isfinite(got).all()), f"{what}: non-finite values"
    excess = (got - want).abs() - COMBINE_TOLERANCE * (1 + magnitude.float().cpu() + want.abs())
    assert not bool((excess > 0).any()), (
        f"{what}: {int((excess > 0).sum())} elements outside the bound; largest excess {excess.max().item()}"
    )


@pytest.mark.parametrize("unverified_kernels", ["0", "1"])
@pytest.mark.parametrize("topology_from", ["argument", "env"])
def test_buffer_internode_matches_reference(
    require_gpu, num_ranks: int, topology_from: str, unverified_kernels: str, launch_timeout_s: float
) -> None:
    if num_ranks % NUM_NODES != 0:
        pytest.skip(f"{num_ranks} ranks do not split into {NUM_NODES} nodes")
    env = {UNVERIFIED_KERNELS_ENV: unverified_kernels, "DEEP_EP_PY_TIMEOUT_S": "30"}
    if topology_from == "env":
        env[RANKS_PER_NODE_ENV] = str(num_ranks // NUM_NODES)
    launch(
        _compare,
        num_ranks,
        topology_from,
        unverified_kernels,
        timeout_s=launch_timeout_s,
        device=tier_device(),
        env=env,
    )
