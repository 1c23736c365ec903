"""vLLM's DeepEP all2all backends (high-throughput and low-latency), keyword for keyword, checked against
brute force."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.distributed as dist
from brute_force import (
    check,
    check_close,
    check_equal,
    expected_dispatch,
    fp8_cast,
    fp8_dequant,
    gather_rows,
    layout,
    make_rank_inputs,
)
from harness import check_kernels_took, framework_launch_kwargs, import_deep_ep

from deep_ep_py.testing import launch

# ----------------------------------------------------------------------------------------------------- vLLM


def _run_vllm(rank: int, num_ranks: int):
    deep_ep = import_deep_ep()
    cpu_group = dist.new_group(list(range(num_ranks)), backend="gloo")
    cache: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    # High-throughput (DeepEPHTAll2AllManager + DeepEPHTPrepareAndFinalize).
    num_experts, hidden, num_topk = 2 * num_ranks, 256, 2
    kwargs = dict(
        group=cpu_group,
        num_nvl_bytes=1024 * 1024 * 1024,
        num_rdma_bytes=0,
        low_latency_mode=False,
        num_qps_per_rank=10,
        explicitly_destroy=True,
    )
    buffer = deep_ep.Buffer(**kwargs)
    cache[("ht", num_ranks)] = buffer
    check(cache[("ht", num_ranks)] is buffer, "vllm: WeakValueDictionary lost the buffer")
    inputs = [make_rank_inputs(31, r, 9 + r, hidden, num_topk, num_experts, None, 0.1) for r in range(num_ranks)]
    mine = inputs[rank]
    expected = expected_dispatch(inputs, rank, num_experts)
    for use_fp8 in (False, True):
        if use_fp8:
            a1q, a1q_scale = fp8_cast(mine.x)
            token_data = (a1q, a1q_scale)
        else:
            token_data = mine.x
        (num_tokens_per_rank, num_tokens_per_rdma_rank, dispatch_expert_num_tokens, is_token_in_rank, event) = (
            buffer.get_dispatch_layout(
                topk_idx=mine.topk_idx,
                num_experts=num_experts,
                previous_event=None,
                async_finish=False,
                allocate_on_comm_stream=False,
            )
        )
        (token_data, expert_topk_ids, _expert_topk_weights, expert_num_tokens_per_expert_list, handle, event) = (
            buffer.dispatch(
                x=token_data,
                handle=None,
                num_tokens_per_rank=num_tokens_per_rank,
                num_tokens_per_rdma_rank=num_tokens_per_rdma_rank,
                is_token_in_rank=is_token_in_rank,
                num_tokens_per_expert=dispatch_expert_num_tokens,
                topk_idx=mine.topk_idx,
                topk_weights=mine.topk_weights,
                expert_alignment=1,
                config=deep_ep.Buffer.get_dispatch_config(num_ranks),
                previous_event=None,
                async_finish=True,
                allocate_on_comm_stream=False,
            )
        )
        check(event.event is not None, "vllm: dispatch(async_finish=True) returned event.event None")
        event.current_stream_wait()
        check_kernels_took(buffer, "intranode", handle, f"vllm dispatch fp8={use_fp8}")
        if use_fp8:
            check(isinstance(token_data, tuple), "vllm: fp8 dispatch must return (values, scales)")
            expert_x, expert_x_scale = token_data
            want_v = gather_rows(expected.rows, [fp8_cast(i.x)[0] for i in inputs], hidden, torch.float8_e4m3fn)
            check_equal("vllm fp8 values", expert_x, want_v)
            check_equal(
                "vllm fp8 scales",
                expert_x_scale.contiguous(),
                fp8_cast(gather_rows(expected.rows, [i.x for i in inputs], hidden, torch.bfloat16))[1],
            )
            fused_expert_output = fp8_dequant(expert_x, expert_x_scale).to(torch.bfloat16)
        else:
            want_x = gather_rows(expected.rows, [i.x for i in inputs], hidden, torch.bfloat16)
            check_equal("vllm recv x", token_data, want_x)
            fused_expert_output = token_data.clone()
        check_equal("vllm num tokens per expert", expert_num_tokens_per_expert_list, expected.num_recv_per_expert)
        # vLLM turns local ids back to global ones; -1 becomes some valid id.
        rank_expert_offset = rank * (num_experts // num_ranks)
        global_ids = torch.where(
            expert_topk_ids == -1,
            num_experts - 1 if rank_expert_offset == 0 else 0,
            expert_topk_ids + rank_expert_offset,
        )
        check(bool((global_ids >= 0).all()), "vllm: global ids")

        combined_x, _, event = buffer.combine(
            x=fused_expert_output,
            handle=handle,
            topk_weights=None,
            config=deep_ep.Buffer.get_combine_config(num_ranks),
            previous_event=None,
            async_finish=True,
            allocate_on_comm_stream=False,
        )
        check(event.event is not None, "vllm: combine(async_finish=True) returned event.event None")
        event.current_stream_wait()
        _, _, _, in_rank = layout(mine.topk_idx, num_experts, num_ranks, num_ranks)
        x_seen = fp8_dequant(*fp8_cast(mine.x)).to(torch.bfloat16) if use_fp8 else mine.x
        want = in_rank.sum(1, keepdim=True).float() * x_seen.float()
        check_close(f"vllm combine fp8={use_fp8}", combined_x, want, 1e-2, 1e-2)

    # Low-latency (DeepEPLLAll2AllManager + DeepEPLLPrepareAndFinalize).
    max_tokens, ll_hidden, ll_experts = 8, 512, 2 * num_ranks
    ll_kwargs = dict(
        group=cpu_group,
        num_nvl_bytes=1024 * 1024 * 1024,
        num_rdma_bytes=deep_ep.Buffer.get_low_latency_rdma_size_hint(
            num_max_dispatch_tokens_per_rank=max_tokens, hidden=ll_hidden, num_ranks=num_ranks, num_experts=ll_experts
        ),
        low_latency_mode=True,
        num_qps_per_rank=ll_experts // num_ranks,
        allow_nvlink_for_low_latency_mode=True,
        allow_mnnvl=False,
        explicitly_destroy=True,
        enable_shrink=True,
    )
    ll_buffer = deep_ep.Buffer(**ll_kwargs)
    cache[("ll", num_ranks)] = ll_buffer
    ll_inputs = [make_rank_inputs(41, r, 5 + r, ll_hidden, 2, ll_experts) for r in range(num_ranks)]
    a1, topk_ids, topk_weights = ll_inputs[rank].x, ll_inputs[rank].topk_idx, ll_inputs[rank].topk_weights
    for use_fp8 in (False, True):
        expert_x, expert_num_tokens, handle, _, hook = ll_buffer.low_latency_dispatch(
            a1,
            topk_ids,
            max_tokens,
            ll_experts,
            use_fp8=use_fp8,
            round_scale=False,
            use_ue8m0=False,
            async_finish=False,
            return_recv_hook=True,
        )
        hook()
        check_kernels_took(ll_buffer, "low_latency", handle, f"vllm ll dispatch fp8={use_fp8}")
        want_counts = [sum(int((inp.topk_idx == rank * 2 + le).any(1).sum()) for inp in ll_inputs) for le in range(2)]
        check_equal("vllm ll expert_num_tokens", expert_num_tokens.tolist(), want_counts)
        if use_fp8:
            values, scales = expert_x
            fused_expert_output = torch.stack([fp8_dequant(values[e], scales[e].contiguous()) for e in range(2)]).to(
                torch.bfloat16
            )
        else:
            fused_expert_output = expert_x.clone()
        output = torch.empty_like(a1)
        _, _, _recv_hook = ll_buffer.low_latency_combine(
            fused_expert_output,
            topk_ids,
            topk_weights,
            handle,
            async_finish=False,
            zero_copy=False,
            return_recv_hook=False,
            out=output,
        )
        x_seen = fp8_dequant(*fp8_cast(a1)).to(torch.bfloat16) if use_fp8 else a1
        want = (topk_weights * (topk_ids >= 0)).sum(1, keepdim=True) * x_seen.float()
        check_close(f"vllm ll combine fp8={use_fp8}", output, want, 1e-2, 1e-2)

    # vLLM's destroy: every cached buffer, then drop them; the WeakValueDictionary must let go.
    for handle_buffer in list(cache.values()):
        handle_buffer.destroy()
    raised = False
    try:
        buffer.get_dispatch_layout(mine.topk_idx, num_experts)
    except Exception:
        raised = True
    check(raised, "vllm: a destroyed Buffer should refuse work")
    del buffer, ll_buffer, handle_buffer
    gc.collect()
    check(
        len(cache) == 0, f"vllm: WeakValueDictionary still holds {len(cache)} buffer(s) after the last reference went"
    )
    return len(expected.rows)


@pytest.mark.parametrize("device", ["cpu", "emulated"])
def test_vllm(device, launch_timeout_s):
    results = launch(_run_vllm, 2, timeout_s=launch_timeout_s, **framework_launch_kwargs(device))
    assert sum(results) > 0
