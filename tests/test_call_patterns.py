"""The calls Megatron-Core, vLLM (high-throughput and low-latency) and SGLang make, keyword for keyword.

Each replay goes through `deep_ep_py.alias()` + `import deep_ep`, as the frameworks import DeepEP, and checks
the results against brute force so that a call that "runs" but computes the wrong thing still fails.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import sys
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

from deep_ep_py.testing import launch


@pytest.fixture
def clean_alias():
    saved = {name: sys.modules.get(name) for name in ("deep_ep", "deep_ep.utils")}
    for name in saved:
        sys.modules.pop(name, None)
    yield
    for name, module in saved.items():
        if module is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = module


def _import_deep_ep():
    import deep_ep_py

    deep_ep_py.alias()
    import deep_ep

    return deep_ep


# ------------------------------------------------------------------------------------------- import surface


def test_import_as_deep_ep(clean_alias):
    import deep_ep_py as deep_ep

    assert deep_ep.topk_idx_t == torch.int64
    assert "deep_ep" not in sys.modules
    deep_ep.alias()
    assert importlib.util.find_spec("deep_ep") is not None  # SGLang/vLLM probe for DeepEP this way
    import deep_ep as aliased
    from deep_ep import Buffer, Config  # noqa: F401
    from deep_ep.utils import EventHandle, EventOverlap

    assert aliased is deep_ep
    assert Buffer is deep_ep.Buffer
    assert EventOverlap is deep_ep.EventOverlap and EventHandle is deep_ep.EventHandle
    overlap = EventOverlap(EventHandle())
    assert overlap.event is not None
    overlap.current_stream_wait()
    with EventOverlap(EventHandle()) as inside:
        assert isinstance(inside, EventOverlap)
    assert EventOverlap().event is None
    assert EventOverlap(None, extra_tensors=(torch.zeros(1),)).event is None


def test_config_from_json_and_num_sms():
    import deep_ep_py

    text = json.dumps(
        {
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
            },
        }
    )
    parsed = json.loads(text)
    dispatch_config = deep_ep_py.Config(**parsed["normal_dispatch"])
    combine_config = deep_ep_py.Config(**parsed["normal_combine"])
    assert dispatch_config.num_sms == 24
    assert dispatch_config.num_max_nvl_chunked_send_tokens == 16
    assert combine_config.num_max_rdma_chunked_send_tokens == 6  # default
    assert combine_config.num_max_rdma_chunked_recv_tokens == 128  # default
    positional = deep_ep_py.Config(24, 16, 256, 6, 128)
    assert positional.num_max_nvl_chunked_recv_tokens == 256
    for config in (dispatch_config, combine_config):
        assert config.get_nvl_buffer_size_hint(7168 * 2, 8) > 0
        assert config.get_rdma_buffer_size_hint(7168 * 2, 8) >= 0

    saved = deep_ep_py.Buffer.num_sms
    try:
        assert saved == 20  # DeepEP V1's default
        deep_ep_py.Buffer.set_num_sms(24)
        assert deep_ep_py.Buffer.num_sms == 24
        assert deep_ep_py.Buffer.get_dispatch_config(8).num_sms == 24
        assert deep_ep_py.Buffer.get_combine_config(8).num_sms == 24
    finally:
        deep_ep_py.Buffer.num_sms = saved
    # Positional and keyword size hint (vLLM passes keywords).
    a = deep_ep_py.Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 256)
    b = deep_ep_py.Buffer.get_low_latency_rdma_size_hint(
        num_max_dispatch_tokens_per_rank=128, hidden=7168, num_ranks=8, num_experts=256
    )
    assert a == b > 0
    assert isinstance(deep_ep_py.Buffer.is_sm90_compiled(), bool)
    assert isinstance(deep_ep_py.Buffer.capture(), deep_ep_py.EventOverlap)


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
    deep_ep = _import_deep_ep()
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


@pytest.mark.parametrize("async_finish", [False, True])
def test_megatron_core(async_finish, launch_timeout_s):
    results = launch(_run_megatron, 2, async_finish, timeout_s=launch_timeout_s)
    assert sum(results) > 0


# ----------------------------------------------------------------------------------------------------- vLLM


def _run_vllm(rank: int, num_ranks: int):
    deep_ep = _import_deep_ep()
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


def test_vllm(launch_timeout_s):
    results = launch(_run_vllm, 2, timeout_s=launch_timeout_s)
    assert sum(results) > 0


# --------------------------------------------------------------------------------------------------- SGLang


def _run_sglang(rank: int, num_ranks: int):
    use_deepep = importlib.util.find_spec("deep_ep") is not None
    check(not use_deepep, "sglang: deep_ep found before alias()")
    _import_deep_ep()
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


def test_sglang(launch_timeout_s):
    results = launch(_run_sglang, 2, timeout_s=launch_timeout_s)
    assert sum(results) > 0
