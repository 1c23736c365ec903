"""Megatron-Core's flex dispatcher calls (fused_a2a), keyword for keyword, forward and backward, checked
against brute force."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from brute_force import (
    check,
    check_close,
    check_equal,
    expected_dispatch,
    gather_rows,
    layout,
    make_rank_inputs,
)
from harness import check_kernels_took, framework_launch_kwargs, import_deep_ep

from deep_ep_py.testing import launch

# --------------------------------------------------------------------------------------------- Megatron-Core
# fused_a2a.py as Megatron-Core writes it (get_buffer / FusedDispatch / FusedCombine), minus its comments.

_megatron_buffer = None


def _get_hidden_bytes(x: torch.Tensor) -> int:
    return x.size(1) * max(x.element_size(), 2)


def _megatron_get_buffer(group, hidden_bytes: int):
    global _megatron_buffer
    from deep_ep import Buffer

    num_nvl_bytes, num_rdma_bytes = 0, 0
    for config in (Buffer.get_dispatch_config(group.size()), Buffer.get_combine_config(group.size())):
        num_nvl_bytes = max(config.get_nvl_buffer_size_hint(hidden_bytes, group.size()), num_nvl_bytes)
        num_rdma_bytes = max(config.get_rdma_buffer_size_hint(hidden_bytes, group.size()), num_rdma_bytes)
    if (
        _megatron_buffer is None
        or _megatron_buffer.group != group
        or _megatron_buffer.num_nvl_bytes < num_nvl_bytes
        or _megatron_buffer.num_rdma_bytes < num_rdma_bytes
    ):
        _megatron_buffer = Buffer(group, num_nvl_bytes, num_rdma_bytes)
    return _megatron_buffer


class _FusedDispatch(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x, token_indices, token_probs, num_experts, group, async_finish=False, allocate_on_comm_stream=False
    ):
        from deep_ep.utils import EventHandle, EventOverlap

        previous_event = None
        if async_finish:
            previous_event = EventOverlap(EventHandle())
        buffer = _megatron_get_buffer(group, _get_hidden_bytes(x))
        (num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, event) = (
            buffer.get_dispatch_layout(
                token_indices,
                num_experts,
                previous_event=previous_event,
                async_finish=async_finish,
                allocate_on_comm_stream=allocate_on_comm_stream,
            )
        )
        (recv_x, recv_token_indices, recv_token_probs, num_recv_tokens_per_expert_list, handle, after_event) = (
            buffer.dispatch(
                x,
                topk_idx=token_indices,
                topk_weights=token_probs,
                num_tokens_per_rank=num_tokens_per_rank,
                num_tokens_per_rdma_rank=num_tokens_per_rdma_rank,
                is_token_in_rank=is_token_in_rank,
                num_tokens_per_expert=num_tokens_per_expert,
                previous_event=event,
                async_finish=async_finish,
                allocate_on_comm_stream=allocate_on_comm_stream,
            )
        )
        if async_finish:
            after_event.current_stream_wait()
        ctx.group = group
        ctx.handle = handle
        ctx.async_finish = async_finish
        ctx.allocate_on_comm_stream = allocate_on_comm_stream
        tokens_per_expert = torch.tensor(num_recv_tokens_per_expert_list)
        return (recv_x, recv_token_indices, recv_token_probs, tokens_per_expert, handle)

    @staticmethod
    def backward(ctx, grad_output, grad_token_indices, grad_token_probs, grad_tokens_per_expert, grad_handle):
        from deep_ep.utils import EventHandle, EventOverlap

        buffer = _megatron_get_buffer(ctx.group, _get_hidden_bytes(grad_output))
        previous_event = None
        if ctx.async_finish:
            previous_event = EventOverlap(EventHandle())
        grad_x, grad_token_probs, after_event = buffer.combine(
            grad_output.contiguous(),
            ctx.handle,
            topk_weights=grad_token_probs.float(),
            previous_event=previous_event,
            async_finish=ctx.async_finish,
            allocate_on_comm_stream=ctx.allocate_on_comm_stream,
        )
        if ctx.async_finish:
            after_event.current_stream_wait()
        return grad_x, None, grad_token_probs, None, None, None, None


class _FusedCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, handle, async_finish=False, allocate_on_comm_stream=False):
        from deep_ep.utils import EventHandle, EventOverlap

        previous_event = None
        if async_finish:
            previous_event = EventOverlap(EventHandle())
        buffer = _megatron_get_buffer(group, _get_hidden_bytes(x))
        combined_x, _, after_event = buffer.combine(
            x,
            handle=handle,
            async_finish=async_finish,
            previous_event=previous_event,
            allocate_on_comm_stream=allocate_on_comm_stream,
        )
        if async_finish:
            after_event.current_stream_wait()
        ctx.handle = handle
        ctx.group = group
        ctx.async_finish = async_finish
        ctx.allocate_on_comm_stream = allocate_on_comm_stream
        return combined_x

    @staticmethod
    def backward(ctx, grad_output):
        from deep_ep.utils import EventHandle, EventOverlap

        buffer = _megatron_get_buffer(ctx.group, _get_hidden_bytes(grad_output))
        previous_event = None
        if ctx.async_finish:
            previous_event = EventOverlap(EventHandle())
        grad_x, _, _, _, _, after_event = buffer.dispatch(
            grad_output.contiguous(),
            handle=ctx.handle,
            previous_event=previous_event,
            async_finish=ctx.async_finish,
            allocate_on_comm_stream=ctx.allocate_on_comm_stream,
        )
        if ctx.async_finish:
            after_event.current_stream_wait()
        return grad_x, None, None, None, None


def _run_megatron(rank: int, num_ranks: int, async_finish: bool):
    deep_ep = import_deep_ep()
    deep_ep.Buffer.set_num_sms(24)
    group = dist.new_group(list(range(num_ranks)))
    num_experts, hidden, num_topk = 4 * num_ranks, 256, 3
    inputs = [make_rank_inputs(21, r, 10 + 3 * r, hidden, num_topk, num_experts, None, 0.2) for r in range(num_ranks)]
    mine = inputs[rank]
    expected = expected_dispatch(inputs, rank, num_experts)
    _, _, _, in_rank = layout(mine.topk_idx, num_experts, num_ranks, num_ranks)

    x = mine.x.clone().requires_grad_(True)
    probs = mine.topk_weights.clone().requires_grad_(True)
    recv_x, recv_idx, recv_probs, tokens_per_expert, handle = _FusedDispatch.apply(
        x, mine.topk_idx, probs, num_experts, group, async_finish, async_finish
    )
    check_kernels_took(_megatron_buffer, "intranode", handle, "megatron dispatch")
    check_equal(
        "megatron recv_x", recv_x.detach(), gather_rows(expected.rows, [i.x for i in inputs], hidden, torch.bfloat16)
    )
    check_equal("megatron recv_token_indices", recv_idx, expected.recv_topk_idx)
    check_equal("megatron tokens_per_expert", tokens_per_expert, torch.tensor(expected.num_recv_per_expert))

    expert_out = recv_x * (rank + 1)  # stands for the expert MLP
    combined = _FusedCombine.apply(expert_out, group, handle, async_finish, async_finish)
    want = torch.zeros((mine.x.shape[0], hidden))
    for t in range(mine.x.shape[0]):
        for d in range(num_ranks):
            if bool(in_rank[t, d]):
                want[t] += (mine.x[t].float() * (d + 1)).to(torch.bfloat16).float()
    check_close("megatron combined", combined.detach(), want, 1e-2, 1e-2)

    (combined.float().sum() + (recv_probs * (rank + 1)).sum()).backward()
    # d/dx: each receiving rank d sends back (d + 1); d/dprobs: every column sums (d + 1) over receivers.
    per_token = torch.zeros(mine.x.shape[0])
    for t in range(mine.x.shape[0]):
        per_token[t] = sum(d + 1 for d in range(num_ranks) if bool(in_rank[t, d]))
    check(x.grad is not None, "megatron: x.grad is None")
    check_equal("megatron x.grad", x.grad.float(), per_token.view(-1, 1).expand(-1, hidden).contiguous())
    check(probs.grad is not None, "megatron: probs.grad is None")
    check_equal("megatron probs.grad", probs.grad, per_token.view(-1, 1).expand(-1, num_topk).contiguous())
    deep_ep.Buffer.set_num_sms(20)
    return len(expected.rows)


@pytest.mark.parametrize("device", ["cpu", "emulated"])
@pytest.mark.parametrize("async_finish", [False, True])
def test_megatron_core(async_finish, device, launch_timeout_s):
    results = launch(_run_megatron, 2, async_finish, timeout_s=launch_timeout_s, **framework_launch_kwargs(device))
    assert sum(results) > 0
