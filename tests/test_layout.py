"""Buffer.get_dispatch_layout against a loop over every token's top-k, at 2 and 4 ranks, one and two nodes."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from brute_force import check, check_equal, layout, make_rank_inputs

from deep_ep_py.testing import launch

# (seed, tokens per rank by rank index (cycled), top-k, experts per rank, -1 probability, excluded ranks)
_CASES = [
    (1, [16, 16, 16, 16], 2, 2, 0.0, ()),
    (2, [33, 7, 0, 20], 4, 4, 0.2, ()),  # uneven loads, a rank with no tokens, -1 entries
    (3, [5, 40, 12, 1], 1, 3, 0.0, ()),  # top-1
    (4, [9, 9, 9, 9], 3, 2, 0.5, (0,)),  # nothing routed to rank 0
    (5, [12, 3, 7, 2], 2, 1, 1.0, ()),  # every entry -1
]


def _run_layout_cases(rank: int, num_ranks: int, backend: str, ranks_per_node: int, buffer_kwargs: dict):
    from harness import normal_buffer

    import deep_ep_py

    group = dist.group.WORLD
    buffer = normal_buffer(group, 256, backend, **buffer_kwargs)
    num_checked = 0
    for seed, tokens, num_topk, experts_per_rank, drop_prob, excluded in _CASES:
        num_experts = experts_per_rank * num_ranks
        allowed = [e for e in range(num_experts) if e // experts_per_rank not in excluded]
        num_tokens = tokens[rank % len(tokens)]
        inp = make_rank_inputs(seed, rank, num_tokens, 8, num_topk, num_experts, allowed, drop_prob)
        per_rank, per_node, per_expert, in_rank = layout(inp.topk_idx, num_experts, num_ranks, ranks_per_node)

        result = buffer.get_dispatch_layout(inp.topk_idx, num_experts)
        where = f"case seed={seed} rank={rank}"
        check(len(result) == 5, f"{where}: get_dispatch_layout returned {len(result)} values, expected 5")
        got_per_rank, got_per_node, got_per_expert, got_in_rank, event = result
        check_equal(f"{where} num_tokens_per_rank", got_per_rank, per_rank)
        check_equal(f"{where} num_tokens_per_expert", got_per_expert, per_expert)
        check_equal(f"{where} is_token_in_rank", got_in_rank, in_rank)
        if per_node is None:
            check(got_per_node is None, f"{where}: num_tokens_per_rdma_rank should be None within one node")
        else:
            check_equal(f"{where} num_tokens_per_rdma_rank", got_per_node, per_node)
        check(isinstance(event, deep_ep_py.EventOverlap), f"{where}: event is {type(event).__name__}")
        check(event.event is None, f"{where}: event.event should be None when not async, got {event.event!r}")

        # Keyword form (as Megatron-Core calls it) gives the same result.
        again = buffer.get_dispatch_layout(topk_idx=inp.topk_idx, num_experts=num_experts, async_finish=False)
        check_equal(f"{where} keyword num_tokens_per_rank", again[0], per_rank)
        check_equal(f"{where} keyword is_token_in_rank", again[3], in_rank)
        num_checked += 1
    return num_checked


@pytest.mark.parametrize("num_ranks", [2, 4])
def test_layout_one_node(num_ranks, backend, launch_timeout_s):
    results = launch(_run_layout_cases, num_ranks, backend, num_ranks, {}, timeout_s=launch_timeout_s)
    assert results == [len(_CASES)] * num_ranks


@pytest.mark.parametrize("how", ["env", "kwarg"])
def test_layout_two_nodes(how, backend, launch_timeout_s):
    """4 ranks shown as 2 nodes x 2 ranks: num_tokens_per_rdma_rank counts each token once per node."""
    if how == "env":
        results = launch(
            _run_layout_cases, 4, backend, 2, {}, env={"DEEP_EP_PY_RANKS_PER_NODE": "2"}, timeout_s=launch_timeout_s
        )
    else:
        assert "DEEP_EP_PY_RANKS_PER_NODE" not in os.environ
        results = launch(_run_layout_cases, 4, backend, 2, {"num_ranks_per_node": 2}, timeout_s=launch_timeout_s)
    assert results == [len(_CASES)] * 4


def test_brute_force_layout_is_sane():
    """The reference itself on a hand-made case (so a wrong reference cannot hide a wrong library)."""
    topk_idx = torch.tensor([[0, 3], [-1, 1], [2, 3], [-1, -1]])
    per_rank, per_node, per_expert, in_rank = layout(topk_idx, 4, 4, 2)
    assert per_rank.tolist() == [1, 1, 1, 2]
    assert per_expert.tolist() == [1, 1, 1, 2]
    assert per_node.tolist() == [2, 2]
    assert in_rank.tolist() == [
        [True, False, False, True],
        [False, True, False, False],
        [False, False, True, True],
        [False, False, False, False],
    ]
