"""The calls Megatron-Core, vLLM (high-throughput and low-latency) and SGLang make, keyword for keyword.

Each replay goes through `deep_ep_py.alias()` + `import deep_ep`, as the frameworks import DeepEP, and checks
the results against brute force so that a call that "runs" but computes the wrong thing still fails.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch


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
