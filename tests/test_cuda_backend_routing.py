"""The cuda backend's routing, checked where it can run without a GPU: calls on CPU tensors (and every call while
the opt-in kernels are off) must take the reference path with unchanged arguments and results."""

from __future__ import annotations

import torch
import torch.distributed as dist

from deep_ep_py.testing import launch

NUM_TOKENS, HIDDEN, NUM_TOPK, NUM_EXPERTS, MAX_TOKENS = 24, 128, 2, 8, 32


def _same_results(rank: int, num_ranks: int) -> None:
    from deep_ep_py.backends import BufferSizes
    from deep_ep_py.backends.cuda import CudaBackend
    from deep_ep_py.backends.reference import ReferenceBackend
    from deep_ep_py.config import Config
    from deep_ep_py.topology import Topology

    group = dist.group.WORLD
    topology = Topology(num_ranks, num_ranks)
    cuda = CudaBackend(group, topology, BufferSizes(1 << 30, 1 << 30, True, True))
    reference = ReferenceBackend(group, topology)
    assert cuda.intranode is None and cuda.low_latency is None, "opt-in kernels built without the opt-in"
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(NUM_TOKENS, HIDDEN, generator=gen).to(torch.bfloat16)
    topk_idx = torch.randn(NUM_TOKENS, NUM_EXPERTS, generator=gen).topk(NUM_TOPK).indices
    weights = torch.rand(NUM_TOKENS, NUM_TOPK, generator=gen)
    config = Config(20, 6, 256)

    results = []
    for backend in (cuda, reference):
        per_rank, _, per_expert, in_rank = backend.get_dispatch_layout(topk_idx, NUM_EXPERTS)
        recv = backend.dispatch(x, None, None, in_rank, per_rank, per_expert, topk_idx, weights, 2, 0, config=config)
        recv_x, _, _, recv_w, per_expert_list, handle = recv
        combined, combined_w = backend.combine(recv_x, handle, recv_w, (), config=config)
        ll_x, _, ll_count, ll_handle, _ = backend.low_latency_dispatch(
            x, topk_idx, MAX_TOKENS, NUM_EXPERTS, None, None, False, False, False, False
        )
        ll_out, _ = backend.low_latency_combine(
            ll_x.nan_to_num(), topk_idx, weights, ll_handle, False, False, None, None
        )
        results.append([per_rank, in_rank, recv_x, recv_w, handle[0], combined, combined_w, ll_count, ll_out])
        results[-1].append(torch.tensor(per_expert_list))
    for i, (got, want) in enumerate(zip(*results)):
        assert torch.equal(got, want), f"rank {rank}: output {i} of the cuda backend differs from the reference"


def test_cuda_backend_routes_cpu_tensors_to_the_reference() -> None:
    launch(_same_results, 2, timeout_s=120.0)


def _arena_on_two_nodes(rank: int, num_ranks: int) -> list[str]:
    """With the opt-in kernels on but no buffers to build, a receive arena asked for on a group of two nodes is only
    warned about: it serves the intranode kernels."""
    import os
    import warnings

    from deep_ep_py.backends import BufferSizes
    from deep_ep_py.backends.cuda import CudaBackend
    from deep_ep_py.topology import Topology

    os.environ["DEEP_EP_PY_UNVERIFIED_KERNELS"] = "1"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cuda = CudaBackend(dist.group.WORLD, Topology(num_ranks, 1), BufferSizes(0, 0, False, False, 1 << 20))
    assert cuda.intranode is None and cuda.internode is None
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def test_a_receive_arena_on_several_nodes_is_warned_about() -> None:
    from deep_ep_py import _ext

    if not _ext.has_kernels():
        import pytest

        pytest.skip(_ext.kernels_unavailable_reason())
    for messages in launch(_arena_on_two_nodes, 2, timeout_s=120.0):
        assert any("num_recv_arena_bytes" in m and "2 nodes" in m for m in messages), messages


def _dispatch_without_kernel_bytes(rank: int, num_ranks: int, ranks_per_node: int, low_latency: bool) -> list[str]:
    """With the kernels on but the Buffer's bytes for them 0, normal dispatches on the kernels' device (the CPU
    emulator's) run on the reference, equal to it, with one warning per Buffer naming the missing bytes. A
    low-latency Buffer across nodes builds its internode kernels only at its first normal dispatch (a decode
    Buffer never makes one, and they take num_rdma_bytes more of NVSHMEM's heap): none before it, and that dispatch
    and the next go by them, equal to the reference, with no warning."""
    import os
    import warnings

    from deep_ep_py.backends import BufferSizes
    from deep_ep_py.backends.cuda import CudaBackend
    from deep_ep_py.backends.reference import ReferenceBackend
    from deep_ep_py.config import Config
    from deep_ep_py.topology import Topology

    os.environ["DEEP_EP_PY_UNVERIFIED_KERNELS"] = "1"
    topology = Topology(num_ranks, ranks_per_node)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(NUM_TOKENS, HIDDEN, generator=gen).to(torch.bfloat16)
    topk_idx = torch.randn(NUM_TOKENS, NUM_EXPERTS, generator=gen).topk(NUM_TOPK).indices
    weights = torch.rand(NUM_TOKENS, NUM_TOPK, generator=gen)
    config = Config(20, 6, 256)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if low_latency:
            from deep_ep_py.config import low_latency_rdma_size_hint

            rdma = low_latency_rdma_size_hint(MAX_TOKENS, HIDDEN, num_ranks, NUM_EXPERTS)
            cuda = CudaBackend(dist.group.WORLD, topology, BufferSizes(1 << 20, rdma, True, False))
            assert cuda.low_latency is not None
        else:
            cuda = CudaBackend(dist.group.WORLD, topology, BufferSizes(0, 0, False, False))
        assert cuda.intranode is None and cuda.internode is None
        reference = ReferenceBackend(dist.group.WORLD, topology)
        per_rank, _, per_expert, in_rank = reference.get_dispatch_layout(topk_idx, NUM_EXPERTS)
        args = (in_rank, per_rank, per_expert, topk_idx, weights, 1, 0)
        for _ in range(2):
            mine = cuda.dispatch(x, None, None, *args, config=config)
            want = reference.dispatch(x, None, None, *args, config=config)
            assert torch.equal(mine[0], want[0]), f"rank {rank}: the fallback's recv_x differs from the reference"
            if low_latency:
                assert cuda.internode is not None and cuda.internode.owns(mine[5]), "not the internode kernels"
        if low_latency:
            cuda.destroy()
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def test_dispatch_without_the_kernels_bytes_warns_once() -> None:
    import pytest

    from deep_ep_py import _ext

    if not _ext.emulator_available():
        pytest.skip(f"the CPU emulator of the kernels is not built: {_ext.emulator_unavailable_reason()}")
    cases = (
        (2, False, "num_nvl_bytes is 0 on a group of one node"),
        (1, False, "num_rdma_bytes is 0"),
        (1, True, None),
    )
    for ranks_per_node, low_latency, missing in cases:
        for messages in launch(
            _dispatch_without_kernel_bytes, 2, ranks_per_node, low_latency, timeout_s=120.0, device="emulated"
        ):
            if missing is None:
                assert messages == [], messages
                continue
            assert len(messages) == 1, messages
            assert "run on the reference backend, not the kernels" in messages[0] and missing in messages[0], messages
