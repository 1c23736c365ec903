"""Bad arguments raise ValueError or TypeError naming the argument and showing what was given, before any work.

The Buffer cases run in one 2-rank launch where only rank 0 makes the bad calls while rank 1 waits at a
barrier: a library that communicated before validating would leave rank 0 hanging, and the launch would time out.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist

from deep_ep_py.testing import launch

T, H, K, R, E, M = 6, 256, 2, 2, 4, 8

# name -> (patterns that must all appear in the message: the argument, then the offending value)
BUFFER_CASES = {
    "dispatch_x_float32": (r"\bx\b", r"float32|Float"),
    "layout_topk_idx_int32": (r"topk_idx", r"int32|Int"),
    "dispatch_topk_idx_int32": (r"topk_idx", r"int32|Int"),
    "dispatch_topk_weights_shape": (r"topk_weights", rf"{K + 1}"),
    "dispatch_is_token_in_rank_shape": (r"is_token_in_rank", rf"{T + 1}"),
    "dispatch_x_non_contiguous": (r"\bx\b", r"contiguous|stride"),
    "layout_expert_id_too_large": (r"topk_idx|expert", rf"\b{E}\b"),
    "layout_expert_id_below_minus_one": (r"topk_idx|expert", r"-2"),
    "layout_num_experts_not_divisible": (r"num_experts", r"\b5\b"),
    "dispatch_fp8_hidden_not_128": (r"\bx\b|scales|hidden", r"200"),
    "cached_dispatch_other_num_tokens": (r"\bx\b|handle", rf"{T + 2}"),
    "combine_x_wrong_rows": (r"\bx\b|handle", rf"{T + 5}"),
    "ll_dispatch_async_finish_with_hook": (r"async_finish", r"return_recv_hook=True", r"got True"),
    "ll_combine_async_finish_with_hook": (r"async_finish", r"return_recv_hook=True", r"got True"),
    "ll_stats_on_another_device": (r"cumulative_local_expert_recv_stats", r"\bcpu\b", r"\bmeta\b"),
    "ll_combine_out_on_another_device": (r"\bout\b", r"\bcpu\b", r"\bmeta\b"),
    "ll_too_many_tokens": (r"num_max_dispatch_tokens_per_rank|\bx\b", rf"{M + 1}"),
    "ll_fp8_hidden_not_128": (r"hidden|\bx\b", r"200"),
    "ll_topk_idx_int32": (r"topk_idx", r"int32|Int"),
    "ll_combine_topk_weights_shape": (r"topk_weights", rf"{K + 1}"),
    "ll_num_experts_not_divisible": (r"num_experts", r"\b5\b"),
    "ll_mask_rank_given_twice": (r"rank_to_mask", r"rank=1"),
    "ll_mask_rank_missing": (r"rank_to_mask", r"None"),
}


def _bad_calls(buffer, ll_buffer):
    """name -> a zero-argument callable that must raise."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((T, H), generator=gen).to(torch.bfloat16)
    topk_idx = torch.tensor([[0, 1], [2, 3], [1, -1], [3, 0], [-1, -1], [2, 0]], dtype=torch.int64)
    topk_weights = torch.rand((T, K), generator=gen)
    per_rank, per_node, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, E)
    layout = dict(
        num_tokens_per_rank=per_rank,
        num_tokens_per_rdma_rank=per_node,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
    )

    def dispatch(x_arg=x, **overrides):
        kwargs = dict(layout, topk_idx=topk_idx, topk_weights=topk_weights)
        kwargs.update(overrides)
        return buffer.dispatch(x_arg, **kwargs)

    def with_id(value):
        bad = topk_idx.clone()
        bad[1, 1] = value
        return bad

    fp8_values = torch.zeros((T, 200), dtype=torch.float8_e4m3fn)
    fp8_scales = torch.ones((T, 2), dtype=torch.float32)
    ll_x = torch.randn((T, H), generator=gen).to(torch.bfloat16)
    return {
        "dispatch_x_float32": lambda: dispatch(x.float()),
        "layout_topk_idx_int32": lambda: buffer.get_dispatch_layout(topk_idx.int(), E),
        "dispatch_topk_idx_int32": lambda: dispatch(topk_idx=topk_idx.int()),
        "dispatch_topk_weights_shape": lambda: dispatch(topk_weights=torch.rand((T, K + 1))),
        "dispatch_is_token_in_rank_shape": lambda: dispatch(is_token_in_rank=torch.ones((T + 1, R), dtype=torch.bool)),
        "dispatch_x_non_contiguous": lambda: dispatch(torch.randn((H, T)).to(torch.bfloat16).T),
        "layout_expert_id_too_large": lambda: buffer.get_dispatch_layout(with_id(E), E),
        "layout_expert_id_below_minus_one": lambda: buffer.get_dispatch_layout(with_id(-2), E),
        "layout_num_experts_not_divisible": lambda: buffer.get_dispatch_layout(topk_idx.clamp(max=4), 5),
        "dispatch_fp8_hidden_not_128": lambda: dispatch((fp8_values, fp8_scales)),
        "cached_dispatch_other_num_tokens": lambda: buffer.dispatch(
            torch.zeros((T + 2, H), dtype=torch.bfloat16), handle=_HANDLE[0]
        ),
        "combine_x_wrong_rows": lambda: buffer.combine(torch.zeros((T + 5, H), dtype=torch.bfloat16), _HANDLE[0]),
        "ll_too_many_tokens": lambda: ll_buffer.low_latency_dispatch(
            torch.zeros((M + 1, H), dtype=torch.bfloat16), torch.zeros((M + 1, K), dtype=torch.int64), M, E
        ),
        "ll_fp8_hidden_not_128": lambda: ll_buffer.low_latency_dispatch(
            torch.zeros((T, 200), dtype=torch.bfloat16), topk_idx, M, E, use_fp8=True
        ),
        "ll_topk_idx_int32": lambda: ll_buffer.low_latency_dispatch(ll_x, topk_idx.int(), M, E, use_fp8=False),
        "ll_combine_topk_weights_shape": lambda: ll_buffer.low_latency_combine(
            torch.zeros((E // R, R * M, H), dtype=torch.bfloat16), topk_idx, torch.rand((T, K + 1)), _LL_HANDLE[0]
        ),
        "ll_num_experts_not_divisible": lambda: ll_buffer.low_latency_dispatch(
            ll_x, topk_idx.clamp(max=4), M, 5, use_fp8=False
        ),
        "ll_dispatch_async_finish_with_hook": lambda: ll_buffer.low_latency_dispatch(
            ll_x, topk_idx, M, E, use_fp8=False, async_finish=True, return_recv_hook=True
        ),
        "ll_combine_async_finish_with_hook": lambda: ll_buffer.low_latency_combine(
            torch.zeros((E // R, R * M, H), dtype=torch.bfloat16),
            topk_idx,
            topk_weights,
            _LL_HANDLE[0],
            async_finish=True,
            return_recv_hook=True,
        ),
        "ll_stats_on_another_device": lambda: ll_buffer.low_latency_dispatch(
            ll_x,
            topk_idx,
            M,
            E,
            cumulative_local_expert_recv_stats=torch.zeros(E // R, dtype=torch.int32, device="meta"),
            use_fp8=False,
        ),
        "ll_combine_out_on_another_device": lambda: ll_buffer.low_latency_combine(
            torch.zeros((E // R, R * M, H), dtype=torch.bfloat16),
            topk_idx,
            topk_weights,
            _LL_HANDLE[0],
            out=torch.empty((T, H), dtype=torch.bfloat16, device="meta"),
        ),
        "ll_mask_rank_given_twice": lambda: ll_buffer.low_latency_update_mask_buffer(0, True, rank=1),
        "ll_mask_rank_missing": lambda: ll_buffer.low_latency_update_mask_buffer(mask=True),
    }


_HANDLE: list = []
_LL_HANDLE: list = []


def _run_bad_calls(rank: int, num_ranks: int, backend: str):
    from harness import low_latency_buffer, normal_buffer

    import deep_ep_py

    buffer = normal_buffer(dist.group.WORLD, H, backend)
    ll_buffer = low_latency_buffer(dist.group.WORLD, M, H, E, backend)
    # Valid handles made collectively, for the cached-dispatch / combine cases.
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn((T, H), generator=gen).to(torch.bfloat16)
    topk_idx = torch.tensor([[0, 1], [2, 3], [1, -1], [3, 0], [-1, -1], [2, 0]], dtype=torch.int64)
    per_rank, per_node, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, E)
    handle = buffer.dispatch(
        x,
        num_tokens_per_rank=per_rank,
        num_tokens_per_rdma_rank=per_node,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        topk_idx=topk_idx,
        topk_weights=torch.rand((T, K)),
    )[4]
    _HANDLE[:] = [handle]
    _LL_HANDLE[:] = [ll_buffer.low_latency_dispatch(x, topk_idx, M, E, use_fp8=False)[2]]

    outcomes = {}
    if rank == 0:
        for name, call in _bad_calls(buffer, ll_buffer).items():
            try:
                call()
            except (ValueError, TypeError) as exc:
                outcomes[name] = (type(exc).__name__, str(exc))
            except Exception as exc:  # wrong exception type: reported, not raised
                outcomes[name] = (type(exc).__name__, str(exc))
            else:
                outcomes[name] = ("no exception", "")
    dist.barrier()
    del deep_ep_py
    return outcomes


@pytest.fixture(scope="module")
def buffer_outcomes(backend):
    return launch(_run_bad_calls, 2, backend, timeout_s=90)[0]


@pytest.mark.parametrize("name", sorted(BUFFER_CASES))
def test_buffer_bad_input(name, buffer_outcomes):
    kind, message = buffer_outcomes[name]
    assert kind in ("ValueError", "TypeError"), f"{name}: raised {kind}: {message}"
    for pattern in BUFFER_CASES[name]:
        assert re.search(pattern, message), f"{name}: message lacks /{pattern}/: {message!r}"


@pytest.mark.parametrize(
    "args,kwargs,patterns",
    [
        ((21, 6, 256), {}, (r"num_sms", r"21")),  # odd
        ((0, 6, 256), {}, (r"num_sms", r"\b0\b")),
        ((-4, 6, 256), {}, (r"num_sms", r"-4")),
        ((20, 0, 256), {}, (r"num_max_nvl_chunked_send_tokens", r"\b0\b")),
        ((20, 6, -1), {}, (r"num_max_nvl_chunked_recv_tokens", r"-1")),
        ((20, 6, 256), {"num_max_rdma_chunked_send_tokens": 0}, (r"num_max_rdma_chunked_send_tokens", r"\b0\b")),
        ((20, 6, 256, 6, -128), {}, (r"num_max_rdma_chunked_recv_tokens", r"-128")),
    ],
)
def test_config_bad_values(args, kwargs, patterns):
    import deep_ep_py

    with pytest.raises((ValueError, TypeError)) as info:
        deep_ep_py.Config(*args, **kwargs)
    for pattern in patterns:
        assert re.search(pattern, str(info.value)), f"message lacks /{pattern}/: {info.value}"


def test_config_rejects_non_int():
    import deep_ep_py

    with pytest.raises(TypeError, match="num_sms"):
        deep_ep_py.Config("20", 6, 256)


@pytest.mark.parametrize("value", [23, 0, -2])
def test_set_num_sms_bad(value):
    import deep_ep_py

    before = deep_ep_py.Buffer.num_sms
    with pytest.raises((ValueError, TypeError), match="num_sms") as info:
        deep_ep_py.Buffer.set_num_sms(value)
    assert str(value) in str(info.value)
    assert deep_ep_py.Buffer.num_sms == before  # unchanged


def test_buffer_without_group():
    import deep_ep_py

    with pytest.raises((ValueError, TypeError), match="group"):
        deep_ep_py.Buffer(None, 0, 0)


@pytest.mark.parametrize(
    "value, error, patterns",
    [
        (-1, ValueError, (r"num_recv_arena_bytes", r"non-negative", r"-1")),
        (True, TypeError, (r"num_recv_arena_bytes", r"int", r"bool")),
        (1.5, TypeError, (r"num_recv_arena_bytes", r"int", r"float")),
    ],
)
def test_recv_arena_bytes_bad(value, error, patterns):
    from deep_ep_py import config

    with pytest.raises(error) as info:
        config.recv_arena_bytes(value)
    for pattern in patterns:
        assert re.search(pattern, str(info.value)), f"message lacks /{pattern}/: {info.value}"


def test_recv_arena_bytes_from_the_environment(monkeypatch):
    from deep_ep_py import config

    monkeypatch.delenv(config.RECV_ARENA_ENV, raising=False)
    assert config.recv_arena_bytes(None) == 0
    monkeypatch.setenv(config.RECV_ARENA_ENV, "4096")
    assert config.recv_arena_bytes(None) == 4096
    assert config.recv_arena_bytes(0) == 0  # the Buffer's argument wins
    for raw in ("lots", "-5"):
        monkeypatch.setenv(config.RECV_ARENA_ENV, raw)
        with pytest.raises(ValueError, match=rf"DEEP_EP_PY_RECV_ARENA_BYTES.*{raw}"):
            config.recv_arena_bytes(None)


# What one rank alone gets wrong: (environment of rank 1, Buffer keyword arguments of rank 1). Every rank must raise
# from Buffer(), not wait in a collective rank 1 never reaches.
ONE_RANK_WRONG = {
    "arena_env": ({"DEEP_EP_PY_RECV_ARENA_BYTES": "lots"}, {}),
    "timeout_env": ({"DEEP_EP_PY_TIMEOUT_S": "-3"}, {}),
    "ranks_per_node_env": ({"DEEP_EP_PY_RANKS_PER_NODE": "two"}, {}),
    "num_nvl_bytes_arg": ({}, {"num_nvl_bytes": -1}),
    "ranks_per_node_differs": ({}, {"num_ranks_per_node": 1}),
}


def _construct_with_rank_1_wrong(rank: int, num_ranks: int, case: str) -> str:
    import os
    import time

    import deep_ep_py

    env, kwargs = ONE_RANK_WRONG[case] if rank == 1 else ({}, {})
    os.environ.update(env)
    defaults = {"num_nvl_bytes": 1 << 20, "backend": "reference"}
    if case == "ranks_per_node_differs":
        defaults["num_ranks_per_node"] = 2
    started = time.monotonic()
    try:
        deep_ep_py.Buffer(dist.group.WORLD, **{**defaults, **kwargs})
    except (TypeError, ValueError) as exc:
        assert time.monotonic() - started < 20, f"rank {rank} raised only after {time.monotonic() - started:.0f} s"
        return f"{type(exc).__name__}: {exc}"
    raise AssertionError(f"rank {rank}: Buffer() accepted what rank 1 got wrong ({case})")


@pytest.mark.parametrize("case", list(ONE_RANK_WRONG))
def test_one_rank_wrong_fails_every_rank(case):
    # The group's own timeout is far longer than the launch's: a rank left waiting makes the launch time out.
    messages = launch(_construct_with_rank_1_wrong, 2, case, timeout_s=60)
    env, kwargs = ONE_RANK_WRONG[case]
    names = list(env) + [name for name in kwargs if name != "num_ranks_per_node"] or ["num_ranks_per_node"]
    for rank, message in enumerate(messages):
        assert any(name in message for name in names), f"rank {rank}'s error does not name {names}: {message}"
    if case != "ranks_per_node_differs":
        assert "rank 1" in messages[0], f"rank 0's error does not say which rank: {messages[0]}"


def test_expert_id_check_syncs_once_per_tensor_version(monkeypatch):
    """check_expert_ids skips reading the ids' range (a device sync on a GPU) once for the tensor that passed last
    with the same num_experts and no in-place write since, as dispatch does after get_dispatch_layout on the same
    topk_idx; a second skip, a write, another tensor, another num_experts, or an inference tensor (no version
    counter) is read again."""
    from deep_ep_py import _validate

    reads = []
    real_aminmax = torch.aminmax
    monkeypatch.setattr(_validate.torch, "aminmax", lambda t: reads.append(t.shape) or real_aminmax(t))
    monkeypatch.setattr(_validate, "_last_passed", None)
    topk_idx = torch.randint(-1, E, (T, K))
    _validate.check_expert_ids("topk_idx", topk_idx, E)
    _validate.check_expert_ids("topk_idx", topk_idx, E)  # get_dispatch_layout, then dispatch
    assert len(reads) == 1
    _validate.check_expert_ids("topk_idx", topk_idx, E)  # skipped once only: the next layer's layout reads again
    assert len(reads) == 2
    _validate.check_expert_ids("topk_idx", topk_idx, E + 4)
    _validate.check_expert_ids("topk_idx", topk_idx, E)  # the last pass was with E + 4
    assert len(reads) == 4
    topk_idx[1, 0] = E  # in place: the version moves on, and the bad id is found
    with pytest.raises(ValueError, match=rf"topk_idx: expected expert ids in \[-1, {E}\) .*got {E}"):
        _validate.check_expert_ids("topk_idx", topk_idx, E)
    topk_idx[1, 0] = 0
    _validate.check_expert_ids("topk_idx", topk_idx.clone(), E)  # another tensor, same values
    assert len(reads) == 6
    with torch.inference_mode():
        frozen = torch.randint(-1, E, (T, K))
        _validate.check_expert_ids("topk_idx", frozen, E)
        frozen[0, 0] = -2
        with pytest.raises(ValueError, match="got -2"):
            _validate.check_expert_ids("topk_idx", frozen, E)
    assert len(reads) == 8
