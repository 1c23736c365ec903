"""SGLang's DeepEP dispatcher calls (normal mode with expert_alignment=128, then low-latency after
clean_low_latency_buffer), keyword for keyword, checked against brute force."""

from __future__ import annotations

import importlib.util
import json

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

# --------------------------------------------------------------------------------------------------- SGLang


def _run_sglang(rank: int, num_ranks: int):
    use_deepep = importlib.util.find_spec("deep_ep") is not None
    check(not use_deepep, "sglang: deep_ep found before alias()")
    import_deep_ep()
    check(importlib.util.find_spec("deep_ep") is not None, "sglang: find_spec('deep_ep') after alias()")
    from deep_ep import Buffer, Config

    config_json = {
        "normal_dispatch": {
            "num_sms": 24,
            "num_max_nvl_chunked_send_tokens": 16,
            "num_max_nvl_chunked_recv_tokens": 256,
            "num_max_rdma_chunked_send_tokens": 6,
            "num_max_rdma_chunked_recv_tokens": 128,
        },
        "normal_combine": {
            "num_sms": 24,
            "num_max_nvl_chunked_send_tokens": 6,
            "num_max_nvl_chunked_recv_tokens": 256,
            "num_max_rdma_chunked_send_tokens": 6,
            "num_max_rdma_chunked_recv_tokens": 128,
        },
    }
    normal_dispatch_config = Config(**json.loads(json.dumps(config_json["normal_dispatch"])))
    normal_combine_config = Config(**config_json["normal_combine"])
    check(Buffer.num_sms == 20, f"sglang: Buffer.num_sms = {Buffer.num_sms}")
    Buffer.set_num_sms(normal_dispatch_config.num_sms)

    group = dist.group.WORLD
    hidden, num_experts, max_tokens, num_topk = 256, 2 * num_ranks, 16, 2
    hidden_bytes = hidden * 2
    num_nvl_bytes, num_rdma_bytes = 0, 0
    for config in (normal_dispatch_config, normal_combine_config):
        num_nvl_bytes = max(config.get_nvl_buffer_size_hint(hidden_bytes, group.size()), num_nvl_bytes)
        num_rdma_bytes = max(config.get_rdma_buffer_size_hint(hidden_bytes, group.size()), num_rdma_bytes)
    num_rdma_bytes = max(
        Buffer.get_low_latency_rdma_size_hint(max_tokens, hidden, group.size(), num_experts), num_rdma_bytes
    )
    buffer = Buffer(
        group,
        num_nvl_bytes,
        num_rdma_bytes,
        low_latency_mode=True,
        num_qps_per_rank=num_experts // group.size(),
        allow_mnnvl=True,
    )
    check(buffer.group_size == num_ranks and buffer.low_latency_mode is True, "sglang: buffer attributes")

    inputs = [make_rank_inputs(51, r, 11 - r, hidden, num_topk, num_experts) for r in range(num_ranks)]
    mine = inputs[rank]
    expected = expected_dispatch(inputs, rank, num_experts)
    async_finish = True
    previous_event = Buffer.capture() if async_finish else None
    (num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, previous_event) = (
        buffer.get_dispatch_layout(
            mine.topk_idx,
            num_experts,
            previous_event=previous_event,
            async_finish=async_finish,
            allocate_on_comm_stream=previous_event is not None,
        )
    )
    (recv_x, _recv_topk_idx, _recv_topk_weights, num_recv_tokens_per_expert_list, handle, event) = buffer.dispatch(
        mine.x,
        topk_idx=mine.topk_idx,
        topk_weights=mine.topk_weights,
        num_tokens_per_rank=num_tokens_per_rank,
        num_tokens_per_rdma_rank=num_tokens_per_rdma_rank,
        is_token_in_rank=is_token_in_rank,
        num_tokens_per_expert=num_tokens_per_expert,
        previous_event=previous_event,
        async_finish=async_finish,
        allocate_on_comm_stream=(previous_event is not None) and async_finish,
        expert_alignment=128,
        config=normal_dispatch_config,
    )
    event.current_stream_wait() if async_finish else ()
    check_kernels_took(buffer, "intranode", handle, "sglang dispatch")
    check_equal("sglang recv_x", recv_x, gather_rows(expected.rows, [i.x for i in inputs], hidden, torch.bfloat16))
    check_equal(
        "sglang num_recv_tokens_per_expert_list (alignment 128)",
        num_recv_tokens_per_expert_list,
        [(c + 127) // 128 * 128 for c in expected.num_recv_per_expert],
    )
    previous_event = Buffer.capture() if async_finish else None
    combined_x, _, event = buffer.combine(
        recv_x,
        handle,
        async_finish=async_finish,
        previous_event=previous_event,
        allocate_on_comm_stream=previous_event is not None,
        config=normal_combine_config,
    )
    event.current_stream_wait() if async_finish else ()
    _, _, _, in_rank = layout(mine.topk_idx, num_experts, num_ranks, num_ranks)
    check_close("sglang combine", combined_x, in_rank.sum(1, keepdim=True).float() * mine.x.float(), 1e-2, 1e-2)

    # Switching to low-latency mode on the same buffer.
    buffer.clean_low_latency_buffer(max_tokens, hidden, num_experts)
    return_recv_hook = False
    topk_idx = mine.topk_idx.to(torch.int64)
    hidden_states, masked_m, handle, event, hook = buffer.low_latency_dispatch(
        mine.x,
        topk_idx,
        max_tokens,
        num_experts,
        use_fp8=True,
        async_finish=not return_recv_hook,
        return_recv_hook=return_recv_hook,
        round_scale=True,
        use_ue8m0=False,
    )
    event.current_stream_wait() if not return_recv_hook else hook()
    check_kernels_took(buffer, "low_latency", handle, "sglang ll dispatch")
    want_m = [sum(int((inp.topk_idx == rank * 2 + le).any(1).sum()) for inp in inputs) for le in range(2)]
    check_equal("sglang masked_m", masked_m.tolist(), want_m)
    values, scales = hidden_states
    expert_out = torch.stack([fp8_dequant(values[e], scales[e].contiguous()) for e in range(2)]).to(torch.bfloat16)
    combined, event, hook = buffer.low_latency_combine(
        expert_out,
        topk_idx,
        mine.topk_weights,
        handle,
        async_finish=not return_recv_hook,
        return_recv_hook=return_recv_hook,
    )
    event.current_stream_wait() if not return_recv_hook else hook()
    x_seen = fp8_dequant(*fp8_cast(mine.x, round_scale=True)).to(torch.bfloat16)
    check_close("sglang ll combine", combined, mine.topk_weights.sum(1, keepdim=True) * x_seen.float(), 1e-2, 1e-2)
    Buffer.set_num_sms(20)
    return len(expected.rows)


@pytest.mark.parametrize("device", ["cpu", "emulated"])
def test_sglang(device, launch_timeout_s):
    results = launch(_run_sglang, 2, timeout_s=launch_timeout_s, **framework_launch_kwargs(device))
    assert sum(results) > 0
