"""A dead or late peer makes the reference backend raise DeepEPTimeoutError within DEEP_EP_PY_TIMEOUT_S."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from deep_ep_py.testing import launch

LATE_PEER_SLEEP_S = 4.0
TIMEOUT_S = 1.0


def _late_peer(rank: int, num_ranks: int, call: str) -> str | None:
    import deep_ep_py

    low_latency = call == "low_latency_dispatch"
    hint = deep_ep_py.Buffer.get_low_latency_rdma_size_hint(8, 128, num_ranks, 4)
    buffer = deep_ep_py.Buffer(
        dist.group.WORLD, int(1e8), hint if low_latency else 0, low_latency_mode=low_latency, backend="reference"
    )
    topk_idx = torch.tensor([[0, 3], [1, -1]], dtype=torch.int64)
    x = torch.ones(2, 128, dtype=torch.bfloat16)
    if rank == num_ranks - 1:
        time.sleep(LATE_PEER_SLEEP_S)  # never makes the call
        return None
    started = time.monotonic()
    with pytest.raises(deep_ep_py.DeepEPTimeoutError) as caught:
        if low_latency:
            buffer.low_latency_dispatch(x, topk_idx, 8, 4, use_fp8=False)
        else:
            per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, 4)
            buffer.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    elapsed = time.monotonic() - started
    assert elapsed < TIMEOUT_S + 3.0, f"the timeout took {elapsed:.1f} s, limit {TIMEOUT_S} s"
    assert isinstance(caught.value, TimeoutError)
    return str(caught.value)


@pytest.mark.parametrize("call", ["dispatch", "low_latency_dispatch"])
def test_late_peer_raises_timeout(call: str) -> None:
    messages = launch(_late_peer, 2, call, timeout_s=60.0, env={"DEEP_EP_PY_TIMEOUT_S": str(TIMEOUT_S)})
    assert messages[1] is None
    assert "rank 0" in messages[0] and "DEEP_EP_PY_TIMEOUT_S" in messages[0], messages[0]


def test_timeout_env_must_be_positive(monkeypatch: pytest.MonkeyPatch) -> None:
    from deep_ep_py.config import timeout_s

    monkeypatch.setenv("DEEP_EP_PY_TIMEOUT_S", "-3")
    with pytest.raises(ValueError, match=r"DEEP_EP_PY_TIMEOUT_S.*-3"):
        timeout_s()
    monkeypatch.setenv("DEEP_EP_PY_TIMEOUT_S", "2.5")
    assert timeout_s() == 2.5


def test_trap_policy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from deep_ep_py.config import TRAP_ENV, trap_on_device_error, trap_policy

    expected = {  # policy -> (trap when captured, trap when not)
        "": (True, False),  # unset: "captured"
        "captured": (True, False),
        "always": (True, True),
        "never": (False, False),
    }
    for policy, (when_captured, when_eager) in expected.items():
        monkeypatch.setenv(TRAP_ENV, policy)
        assert trap_policy() == (policy or "captured")
        assert (trap_on_device_error(True), trap_on_device_error(False)) == (when_captured, when_eager), policy
    monkeypatch.setenv(TRAP_ENV, "sometimes")
    with pytest.raises(ValueError, match=r"DEEP_EP_PY_TRAP_ON_DEVICE_ERROR: expected one of captured, always, never"):
        trap_policy()


def _bad_trap_policy_buffer(rank: int, num_ranks: int) -> str:
    import deep_ep_py

    with pytest.raises(ValueError) as caught:
        deep_ep_py.Buffer(dist.group.WORLD, int(1e6), 0, backend="reference")
    return str(caught.value)


def test_buffer_refuses_a_bad_trap_policy() -> None:
    """Read at construction (as every launch reads it again), so a typo fails there, on every rank."""
    for message in launch(_bad_trap_policy_buffer, 2, timeout_s=60.0, env={"DEEP_EP_PY_TRAP_ON_DEVICE_ERROR": "1"}):
        assert "DEEP_EP_PY_TRAP_ON_DEVICE_ERROR" in message and "'1'" in message, message


@pytest.mark.parametrize("capturing", [True, False])
def test_launches_trap_when_captured(monkeypatch: pytest.MonkeyPatch, capturing: bool) -> None:
    """What the kernel launches of each path pass as trap_on_error under the default policy: True exactly while the
    stream is being captured into a CUDA graph, whose replays no host check follows (the emulator, which has no
    graphs, shows the kernels act on it: tests/gpu/test_trap_gpu.py)."""
    import types

    from deep_ep_py.backends import low_latency, round_kernels

    monkeypatch.delenv("DEEP_EP_PY_TRAP_ON_DEVICE_ERROR", raising=False)
    for module in (round_kernels, low_latency):
        monkeypatch.setattr(module, "is_current_stream_capturing", lambda: capturing)
    monkeypatch.setattr(low_latency, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=7))
    record = types.SimpleNamespace(device_ptr=4096)
    normal = types.SimpleNamespace(error_record=record, _timeout_s=lambda: 2.0)
    assert round_kernels.RoundKernels._wait_args(normal) == {
        "error_record": 4096,
        "timeout_s": 2.0,
        "trap_on_error": capturing,
    }
    decode = types.SimpleNamespace(
        num_blocks=3, device=None, error_record=record, mask_on_timeout=False, emulated_node_size=0
    )
    assert low_latency.LowLatencyKernels._launch_args(decode)["trap_on_error"] is capturing
