"""Every name of the contract's module surface and Buffer sections, with DeepEP V1's parameter names and defaults."""

from __future__ import annotations

import inspect
import weakref

import pytest
import torch
import torch.distributed as dist

import deep_ep_py
from deep_ep_py.testing import launch

_EMPTY = inspect.Parameter.empty

# method -> [(parameter name, default or _EMPTY)] after self, as DeepEP V1 declares them.
BUFFER_METHODS = {
    "__init__": [
        ("group", _EMPTY),
        ("num_nvl_bytes", 0),
        ("num_rdma_bytes", 0),
        ("low_latency_mode", False),
        ("num_qps_per_rank", 24),
        ("allow_nvlink_for_low_latency_mode", True),
        ("allow_mnnvl", False),
        ("use_fabric", False),
        ("explicitly_destroy", False),
        ("enable_shrink", False),
        ("comm", None),
    ],
    "get_dispatch_layout": [
        ("topk_idx", _EMPTY),
        ("num_experts", _EMPTY),
        ("previous_event", None),
        ("async_finish", False),
        ("allocate_on_comm_stream", False),
    ],
    "dispatch": [
        ("x", _EMPTY),
        ("handle", None),
        ("num_tokens_per_rank", None),
        ("num_tokens_per_rdma_rank", None),
        ("is_token_in_rank", None),
        ("num_tokens_per_expert", None),
        ("topk_idx", None),
        ("topk_weights", None),
        ("expert_alignment", 1),
        ("num_worst_tokens", 0),
        ("config", None),
        ("previous_event", None),
        ("async_finish", False),
        ("allocate_on_comm_stream", False),
    ],
    "combine": [
        ("x", _EMPTY),
        ("handle", _EMPTY),
        ("topk_weights", None),
        ("bias", None),
        ("config", None),
        ("previous_event", None),
        ("async_finish", False),
        ("allocate_on_comm_stream", False),
    ],
    "low_latency_dispatch": [
        ("x", _EMPTY),
        ("topk_idx", _EMPTY),
        ("num_max_dispatch_tokens_per_rank", _EMPTY),
        ("num_experts", _EMPTY),
        ("cumulative_local_expert_recv_stats", None),
        ("dispatch_wait_recv_cost_stats", None),
        ("use_fp8", True),
        ("round_scale", False),
        ("use_ue8m0", False),
        ("async_finish", False),
        ("return_recv_hook", False),
    ],
    "low_latency_combine": [
        ("x", _EMPTY),
        ("topk_idx", _EMPTY),
        ("topk_weights", _EMPTY),
        ("handle", _EMPTY),
        ("use_logfmt", False),
        ("zero_copy", False),
        ("async_finish", False),
        ("return_recv_hook", False),
        ("out", None),
        ("combine_wait_recv_cost_stats", None),
    ],
    "clean_low_latency_buffer": [
        ("num_max_dispatch_tokens_per_rank", _EMPTY),
        ("hidden", _EMPTY),
        ("num_experts", _EMPTY),
    ],
    "get_next_low_latency_combine_buffer": [("handle", _EMPTY)],
    "low_latency_query_mask_buffer": [("mask_status", _EMPTY)],
    "low_latency_clean_mask_buffer": [],
    "get_local_buffer_tensor": [("dtype", _EMPTY), ("size", None), ("offset", 0), ("use_rdma_buffer", False)],
    "get_comm_stream": [],
    "destroy": [],
}

STATIC_METHODS = {
    "set_num_sms": [("new_num_sms", _EMPTY)],
    "capture": [],
    "get_dispatch_config": [("num_ranks", _EMPTY)],
    "get_combine_config": [("num_ranks", _EMPTY)],
    "get_low_latency_rdma_size_hint": [
        ("num_max_dispatch_tokens_per_rank", _EMPTY),
        ("hidden", _EMPTY),
        ("num_ranks", _EMPTY),
        ("num_experts", _EMPTY),
    ],
    "is_sm90_compiled": [],
}


def _positional_params(func, skip_self: bool):
    params = list(inspect.signature(func).parameters.values())
    if skip_self:
        assert params and params[0].name == "self"
        params = params[1:]
    return [(p.name, p.default) for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)], [
        p for p in params if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]


def test_module_surface():
    for name in ("Buffer", "Config", "EventOverlap", "EventHandle", "topk_idx_t", "utils", "alias", "fp8"):
        assert hasattr(deep_ep_py, name), name
    assert deep_ep_py.topk_idx_t is torch.int64
    assert deep_ep_py.utils.EventHandle is deep_ep_py.EventHandle
    assert deep_ep_py.utils.EventOverlap is deep_ep_py.EventOverlap
    assert callable(deep_ep_py.fp8.per_token_cast_to_fp8) and callable(deep_ep_py.fp8.per_token_cast_back)


@pytest.mark.parametrize("method", sorted(BUFFER_METHODS))
def test_buffer_method_signature(method):
    func = getattr(deep_ep_py.Buffer, method)
    positional, rest = _positional_params(func, skip_self=True)
    assert positional == BUFFER_METHODS[method], f"Buffer.{method}{inspect.signature(func)}"
    # Extensions beyond DeepEP's parameters must be keyword-only with defaults (never shift positions).
    for p in rest:
        if p.kind == p.KEYWORD_ONLY:
            assert p.default is not _EMPTY, f"Buffer.{method}: keyword-only {p.name} needs a default"


def test_update_mask_buffer_signature():
    # DeepEP V1 names the first parameter rank_to_mask; the contract writes it as `rank`: positionally first, or by
    # either keyword (rank= is keyword-only, so the positions stay DeepEP's); the second is `mask=False`.
    positional, rest = _positional_params(deep_ep_py.Buffer.low_latency_update_mask_buffer, skip_self=True)
    assert positional == [("rank_to_mask", None), ("mask", False)]
    assert [(p.name, p.kind, p.default) for p in rest] == [("rank", inspect.Parameter.KEYWORD_ONLY, None)]


@pytest.mark.parametrize("method", sorted(STATIC_METHODS))
def test_buffer_static_signature(method):
    raw = inspect.getattr_static(deep_ep_py.Buffer, method)
    assert isinstance(raw, staticmethod), f"Buffer.{method} should be a staticmethod, is {type(raw).__name__}"
    positional, _ = _positional_params(getattr(deep_ep_py.Buffer, method), skip_self=False)
    assert positional == STATIC_METHODS[method]


def test_internode_entry_points_exist():
    for name in ("internode_dispatch", "internode_combine"):
        assert callable(getattr(deep_ep_py.Buffer, name))


def test_buffer_num_sms_class_attribute():
    assert inspect.getattr_static(deep_ep_py.Buffer, "num_sms") == 20


def test_config_signature():
    positional, _ = _positional_params(deep_ep_py.Config.__init__, skip_self=True)
    assert positional == [
        ("num_sms", _EMPTY),
        ("num_max_nvl_chunked_send_tokens", _EMPTY),
        ("num_max_nvl_chunked_recv_tokens", _EMPTY),
        ("num_max_rdma_chunked_send_tokens", 6),
        ("num_max_rdma_chunked_recv_tokens", 128),
    ]
    for name in ("get_nvl_buffer_size_hint", "get_rdma_buffer_size_hint"):
        hint_params, _ = _positional_params(getattr(deep_ep_py.Config, name), skip_self=True)
        assert [p[0] for p in hint_params] == ["hidden_bytes", "num_ranks"], name


def test_event_classes():
    positional, _ = _positional_params(deep_ep_py.EventOverlap.__init__, skip_self=True)
    assert positional == [("event", None), ("extra_tensors", None)]
    handle = deep_ep_py.EventHandle()  # no argument: records on the current stream
    handle.current_stream_wait()
    overlap = deep_ep_py.EventOverlap(handle)
    assert overlap.event is handle
    with overlap:
        pass
    assert deep_ep_py.EventOverlap().event is None


def _instance_surface(rank: int, num_ranks: int, backend: str):
    from harness import backend_kwargs

    group = dist.new_group(list(range(num_ranks)))
    buffer = deep_ep_py.Buffer(
        group, 1 << 20, 1 << 20, low_latency_mode=True, num_recv_arena_bytes=1 << 16, **backend_kwargs(backend)
    )
    values = {
        "num_recv_arena_bytes": buffer.num_recv_arena_bytes,
        "rank": buffer.rank,
        "group_is_group": buffer.group is group,
        "group_size": buffer.group_size,
        "num_nvl_bytes": buffer.num_nvl_bytes,
        "num_rdma_bytes": buffer.num_rdma_bytes,
        "low_latency_mode": buffer.low_latency_mode,
    }
    ref = weakref.ref(buffer)
    cache = weakref.WeakValueDictionary()
    cache["buffer"] = buffer
    values["weakref_alive"] = ref() is buffer
    local = buffer.get_local_buffer_tensor(torch.int32, (16,), offset=64)
    values["local_tensor"] = (local.dtype, tuple(local.shape))
    values["comm_stream_not_none"] = buffer.get_comm_stream() is not None
    buffer.destroy()
    del buffer, local
    import gc

    gc.collect()
    values["weakref_dead_after_del"] = ref() is None and len(cache) == 0
    return values


def test_buffer_instance_attributes(backend, launch_timeout_s):
    results = launch(_instance_surface, 2, backend, timeout_s=launch_timeout_s)
    for rank, values in enumerate(results):
        assert values == {
            "num_recv_arena_bytes": 1 << 16,
            "rank": rank,
            "group_is_group": True,
            "group_size": 2,
            "num_nvl_bytes": 1 << 20,
            "num_rdma_bytes": 1 << 20,
            "low_latency_mode": True,
            "weakref_alive": True,
            "local_tensor": (torch.int32, (16,)),
            "comm_stream_not_none": True,
            "weakref_dead_after_del": True,
        }
