"""DEEP_EP_PY_TRAP_ON_DEVICE_ERROR reaches the kernels of every path: with "always", a call whose kernel records an
error (on every rank alike, so no rank waits for one that died) ends each rank's process, after the kernel printed
what it recorded. Launches captured into a CUDA graph get the same setting by default ("captured"), which the
emulator cannot show (it has no graphs): tests/test_timeouts.py checks that choice on the host.

Emulator only: on a GPU a trap under MPS reaches every client of the GPU, so the GPU tier checks the trap itself in a
process of its own outside MPS (test_runtime_gpu.py::test_trap_on_device_error_ends_the_process).
"""

from __future__ import annotations

import os
import re

import pytest
import torch
import torch.distributed as dist
from kernel_device import emulated_tier, tier_device

from deep_ep_py.testing import launch
from deep_ep_py.testing.launcher import RankFailedError

pytestmark = pytest.mark.gpu

NUM_TOKENS, HIDDEN, NUM_TOPK, EXPERTS_PER_RANK, MAX_TOKENS = 16, 128, 2, 2, 32

# What each path's trapping kernel prints after "deep_ep_py: ": its error, and (after the rank and channel) the
# wait site.
PRINTED = {
    "layout": ("an input value is out of range", 42),
    "intranode": ("a count is past the capacity the host sized", 32),
    "internode": ("a count is past the capacity the host sized", 33),
    "low_latency": ("an input value is out of range", 40),
}


def _trap_worker(rank: int, num_ranks: int, path: str, log_dir: str) -> str:
    # The kernels' printf writes to fd 1: into a file the test reads after this process has ended.
    log = os.open(os.path.join(log_dir, f"rank{rank}.log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    import deep_ep_py
    from deep_ep_py import device as ep_device

    device = ep_device.kernel_device()
    num_experts = EXPERTS_PER_RANK * num_ranks
    # Every token to an expert of every rank pair, so every rank receives more than one row.
    topk_idx = torch.stack(
        [torch.arange(NUM_TOKENS) % num_experts, (torch.arange(NUM_TOKENS) + EXPERTS_PER_RANK) % num_experts], dim=1
    ).to(device)
    x = torch.randn(NUM_TOKENS, HIDDEN).to(torch.bfloat16).to(device)
    group = dist.group.WORLD
    if path == "low_latency":
        rdma = deep_ep_py.Buffer.get_low_latency_rdma_size_hint(MAX_TOKENS, HIDDEN, num_ranks, num_experts)
        buffer = deep_ep_py.Buffer(group, 0, rdma, low_latency_mode=True, backend="cuda")
        bad = topk_idx.clone()
        bad[1, 0] = num_experts
        buffer.low_latency_dispatch(x, bad, MAX_TOKENS, num_experts, use_fp8=False)
    else:
        config = deep_ep_py.Buffer.get_dispatch_config(num_ranks)
        nvl = config.get_nvl_buffer_size_hint(HIDDEN * 2, num_ranks)
        rdma = config.get_rdma_buffer_size_hint(HIDDEN * 2, num_ranks) if path == "internode" else 0
        buffer = deep_ep_py.Buffer(group, nvl, rdma, backend="cuda")
        if path == "layout":
            bad = topk_idx.clone()
            bad[1, 0] = num_experts
            buffer.get_dispatch_layout(bad, num_experts)
        else:
            per_rank, per_rdma, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
            buffer.dispatch(
                x,
                num_tokens_per_rank=per_rank,
                num_tokens_per_rdma_rank=per_rdma,
                is_token_in_rank=in_rank,
                num_tokens_per_expert=per_expert,
                topk_idx=topk_idx,
                topk_weights=torch.ones(NUM_TOKENS, NUM_TOPK, device=device),
                num_worst_tokens=1,
            )
    ep_device.synchronize()
    return f"rank {rank}: the {path} call returned without a trap"


@pytest.mark.parametrize("path", list(PRINTED))
def test_trap_policy_always_reaches_the_kernels(require_gpu, tmp_path, num_ranks, launch_timeout_s, path):
    if not emulated_tier():
        pytest.skip("a trap under MPS reaches every client of the GPU: the GPU tier checks it in one process")
    if num_ranks < 2:
        pytest.skip("needs a peer")
    env = {"DEEP_EP_PY_UNVERIFIED_KERNELS": "1", "DEEP_EP_PY_TRAP_ON_DEVICE_ERROR": "always"}
    if path == "internode":
        env["DEEP_EP_PY_RANKS_PER_NODE"] = "1"  # every rank a node of its own
    with pytest.raises(RankFailedError) as failed:
        launch(_trap_worker, num_ranks, path, str(tmp_path), device=tier_device(), timeout_s=launch_timeout_s, env=env)
    rank = failed.value.rank
    assert "exited with code -6" in str(failed.value), str(failed.value)  # SIGABRT: the emulator's trap
    printed = (tmp_path / f"rank{rank}.log").read_text()
    error, site = PRINTED[path]
    assert re.search(rf"deep_ep_py: {error} \(rank \d+, channel -?\d+, wait site {site},.*trapping", printed), printed
