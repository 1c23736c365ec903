"""Buffer's argument checks, one function per call. Each raises ValueError or TypeError naming the argument, the
expected and the actual value, before any work; shapes use the letters of buffer.py (T, H, K, R, E, L, M)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from . import _validate as check
from .backends.reference import DispatchHandle, LowLatencyHandle
from .config import FP8_GROUP_SIZE, Config, low_latency_rdma_size_hint

if TYPE_CHECKING:
    from .buffer import Buffer

# Kernels move rows in 16-byte pieces: 8 bf16 elements.
BF16_HIDDEN_MULTIPLE = 8
UE8M0_HIDDEN_MULTIPLE = 4 * FP8_GROUP_SIZE


def num_experts(buffer: Buffer, value: Any, name: str = "num_experts") -> None:
    check.check_int(name, value, minimum=1)
    if value % buffer.group_size != 0:
        raise ValueError(
            f"{name}: expected a number of experts divisible by the group size {buffer.group_size}, got {value}"
        )


def flags(**named: Any) -> None:
    for name, value in named.items():
        check.check_bool(name, value)


def hook_flags(async_finish: bool, return_recv_hook: bool) -> None:
    """With a hook, the send and hook()'s receive run on the calling stream (as DeepEP's), and hook() is where the
    results become ready: there is no event for async_finish to return."""
    flags(async_finish=async_finish, return_recv_hook=return_recv_hook)
    if async_finish and return_recv_hook:
        raise ValueError(
            "async_finish: expected False with return_recv_hook=True (the results are ready on the calling stream "
            "once hook() has run), got True"
        )


def low_latency_mode(buffer: Buffer, call: str) -> None:
    if not buffer.low_latency_mode:
        raise ValueError(f"low_latency_mode: {call} expected Buffer(low_latency_mode=True), got False")


def shrink(buffer: Buffer, call: str) -> None:
    if not buffer.enable_shrink:
        raise ValueError(f"enable_shrink: {call} expected Buffer(enable_shrink=True), got False")


def config_fits(buffer: Buffer, config: Config | None, default: Config, hidden_bytes: int) -> Config:
    """The config to use (default when None), once the Buffer's bytes are known to hold its buffers."""
    if config is None:
        config = default
    elif not isinstance(config, Config):
        raise TypeError(f"config: expected deep_ep_py.Config or None, got {type(config).__name__}")
    needed = config.get_nvl_buffer_size_hint(hidden_bytes, buffer.group_size)
    if buffer.num_nvl_bytes < needed:
        raise ValueError(
            f"num_nvl_bytes: expected at least {needed} bytes for {config} and hidden_bytes={hidden_bytes}, "
            f"got {buffer.num_nvl_bytes}"
        )
    if buffer.topology.num_nodes > 1:
        needed = config.get_rdma_buffer_size_hint(hidden_bytes, buffer.group_size)
        if buffer.num_rdma_bytes < needed:
            raise ValueError(
                f"num_rdma_bytes: expected at least {needed} bytes for {config} across "
                f"{buffer.topology.num_nodes} nodes, got {buffer.num_rdma_bytes}"
            )
    return config


def rdma_bytes_fit(buffer: Buffer, max_tokens: int, hidden: int, experts: int) -> None:
    needed = low_latency_rdma_size_hint(max_tokens, hidden, buffer.group_size, experts)
    if buffer.num_rdma_bytes < needed:
        raise ValueError(
            f"num_rdma_bytes: expected at least {needed} (get_low_latency_rdma_size_hint({max_tokens}, {hidden}, "
            f"{buffer.group_size}, {experts})), got {buffer.num_rdma_bytes}"
        )


def low_latency_experts_unchanged(
    previous: int | None, experts: int, max_tokens: int, hidden: int, name: str = "num_experts"
) -> None:
    """name: what carries experts, the call's num_experts or (combine) the handle's, from its dispatch."""
    if previous is not None and experts != previous:
        raise ValueError(
            f"{name}: expected {previous}, as in this Buffer's low-latency calls since it was made or cleaned, got "
            f"{experts}: the signal words of a call sit at offsets that depend on num_experts, so switching needs "
            f"clean_low_latency_buffer({max_tokens}, {hidden}, {experts}) on every rank first"
        )


# ------------------------------------------------------------------------------------------------ normal mode


def dispatch_x(x: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """bf16 [T, H] -> (x, None); (float8_e4m3fn [T, H], float32 [T, H / 128] any strides) -> (values, scales)."""
    if isinstance(x, tuple):
        if len(x) != 2:
            raise ValueError(f"x: expected (float8_e4m3fn values, float32 scales), got a tuple of {len(x)}")
        values, scales = x
        check.check_tensor("x[0]", values, dtype=torch.float8_e4m3fn, shape=(None, None), contiguous=True)
        num_tokens, hidden = values.shape
        if hidden % FP8_GROUP_SIZE != 0:
            raise ValueError(f"x[0]: expected hidden to be a multiple of {FP8_GROUP_SIZE} for FP8, got {hidden}")
        check.check_tensor("x[1]", scales, dtype=torch.float32, shape=(num_tokens, hidden // FP8_GROUP_SIZE))
        return values, scales
    check.check_tensor("x", x, dtype=torch.bfloat16, shape=(None, None), contiguous=True)
    if x.shape[1] % BF16_HIDDEN_MULTIPLE != 0:
        raise ValueError(
            f"x: expected hidden to be a multiple of {BF16_HIDDEN_MULTIPLE} (16-byte rows), got {x.shape[1]}"
        )
    return x, None


def cached_dispatch(handle: Any, num_tokens: int, topk_idx: Any, topk_weights: Any) -> None:
    if not isinstance(handle, DispatchHandle):
        raise TypeError(f"handle: expected the handle a normal-mode dispatch returned, got {type(handle).__name__}")
    if topk_idx is not None or topk_weights is not None:
        raise ValueError("topk_idx/topk_weights: expected None with a cached handle, got a tensor")
    if num_tokens != handle.num_tokens:
        raise ValueError(
            f"x: expected {handle.num_tokens} tokens (the dispatch that made the handle), got {num_tokens}"
        )


def layout_dispatch(
    buffer: Buffer,
    num_tokens: int,
    num_tokens_per_rank: Any,
    num_tokens_per_rdma_rank: Any,
    is_token_in_rank: Any,
    num_tokens_per_expert: Any,
    topk_idx: Any,
    topk_weights: Any,
) -> None:
    """A dispatch that takes the layout from get_dispatch_layout (no handle)."""
    num_ranks, num_nodes = buffer.group_size, buffer.topology.num_nodes
    if num_tokens_per_rank is None or is_token_in_rank is None or num_tokens_per_expert is None:
        raise ValueError(
            "num_tokens_per_rank/is_token_in_rank/num_tokens_per_expert: expected tensors from "
            "get_dispatch_layout when no handle is given, got None"
        )
    check.check_tensor("num_tokens_per_rank", num_tokens_per_rank, dtype=torch.int32, shape=(num_ranks,))
    check.check_tensor(
        "is_token_in_rank", is_token_in_rank, dtype=torch.bool, shape=(num_tokens, num_ranks), contiguous=True
    )
    check.check_tensor("num_tokens_per_expert", num_tokens_per_expert, dtype=torch.int32, shape=(None,))
    num_experts(buffer, num_tokens_per_expert.numel(), name="num_tokens_per_expert")
    if num_nodes > 1:
        if num_tokens_per_rdma_rank is None:
            raise ValueError(
                f"num_tokens_per_rdma_rank: expected int32 [{num_nodes}] from get_dispatch_layout (the group "
                "spans several nodes), got None"
            )
        check.check_tensor("num_tokens_per_rdma_rank", num_tokens_per_rdma_rank, dtype=torch.int32, shape=(num_nodes,))
    if (topk_idx is None) != (topk_weights is None):
        raise ValueError("topk_idx/topk_weights: expected both or neither, got only one")
    if topk_idx is not None:
        check.check_tensor("topk_idx", topk_idx, dtype=torch.int64, shape=(num_tokens, None), contiguous=True)
        check.check_tensor(
            "topk_weights", topk_weights, dtype=torch.float32, shape=tuple(topk_idx.shape), contiguous=True
        )
        check.check_expert_ids("topk_idx", topk_idx, num_tokens_per_expert.numel())


def combine(handle: Any, x: Any, topk_weights: Any, bias: Any) -> tuple[int, tuple[torch.Tensor, ...]]:
    """-> (rows of x that hold received tokens, the bias tensors)."""
    if not isinstance(handle, DispatchHandle):
        raise TypeError(f"handle: expected the handle a normal-mode dispatch returned, got {type(handle).__name__}")
    # A handle made with num_worst_tokens by the kernels knows the real count only on the device (-1 here).
    allowed_rows = {handle.num_recv_tokens, handle.num_worst_tokens} - {0, -1} or {0}
    check.check_tensor("x", x, dtype=torch.bfloat16, shape=(None, None), contiguous=True)
    if x.shape[0] not in allowed_rows:
        raise ValueError(
            f"x: expected {' or '.join(str(n) for n in sorted(allowed_rows))} rows (what the handle's dispatch "
            f"received), got {x.shape[0]}"
        )
    if topk_weights is not None:
        check.check_tensor("topk_weights", topk_weights, dtype=torch.float32, shape=(x.shape[0], None), contiguous=True)
    if bias is None:
        biases: tuple[torch.Tensor, ...] = ()
    elif isinstance(bias, torch.Tensor):
        biases = (bias,)
    elif isinstance(bias, (tuple, list)) and len(bias) <= 2:
        biases = tuple(bias)
    else:
        raise TypeError(f"bias: expected None, a tensor or a tuple of up to 2 tensors, got {type(bias).__name__}")
    for i, b in enumerate(biases):
        check.check_tensor(f"bias[{i}]", b, dtype=torch.bfloat16, shape=(handle.num_tokens, x.shape[1]))
    rows = handle.num_recv_tokens if handle.num_recv_tokens >= 0 else x.shape[0]
    return rows, biases


# ------------------------------------------------------------------------------------------------ low latency


def low_latency_dispatch(
    buffer: Buffer,
    x: Any,
    topk_idx: Any,
    max_tokens: Any,
    experts: Any,
    cumulative_local_expert_recv_stats: Any,
    dispatch_wait_recv_cost_stats: Any,
    use_fp8: Any,
    round_scale: Any,
    use_ue8m0: Any,
) -> None:
    low_latency_mode(buffer, "low_latency_dispatch")
    check.check_tensor("x", x, dtype=torch.bfloat16, shape=(None, None), contiguous=True)
    num_tokens, hidden = x.shape
    check.check_tensor("topk_idx", topk_idx, dtype=torch.int64, shape=(num_tokens, None), contiguous=True)
    check.check_int("num_max_dispatch_tokens_per_rank", max_tokens, minimum=1)
    if num_tokens > max_tokens:
        raise ValueError(f"x: expected at most num_max_dispatch_tokens_per_rank={max_tokens} tokens, got {num_tokens}")
    num_experts(buffer, experts)
    flags(use_fp8=use_fp8, round_scale=round_scale, use_ue8m0=use_ue8m0)
    if round_scale and not use_fp8:
        raise ValueError("round_scale: expected use_fp8=True with it (it rounds FP8 scales), got use_fp8=False")
    if use_ue8m0 and not round_scale:
        raise ValueError("use_ue8m0: expected round_scale=True with it (ue8m0 needs power-of-two scales)")
    multiple = UE8M0_HIDDEN_MULTIPLE if use_ue8m0 else FP8_GROUP_SIZE if use_fp8 else BF16_HIDDEN_MULTIPLE
    if hidden % multiple != 0:
        fmt = "use_ue8m0" if use_ue8m0 else "use_fp8" if use_fp8 else "bf16"
        raise ValueError(f"x: expected hidden to be a multiple of {multiple} with {fmt}, got {hidden}")
    if cumulative_local_expert_recv_stats is not None:
        check.check_tensor(
            "cumulative_local_expert_recv_stats",
            cumulative_local_expert_recv_stats,
            dtype=torch.int32,
            shape=(experts // buffer.group_size,),
            device=x.device,
        )
    if dispatch_wait_recv_cost_stats is not None:
        check.check_tensor(
            "dispatch_wait_recv_cost_stats",
            dispatch_wait_recv_cost_stats,
            dtype=torch.int64,
            shape=(buffer.group_size,),
            device=x.device,
        )
    rdma_bytes_fit(buffer, max_tokens, hidden, experts)
    # The kernels skip an id out of range and record it, and the next call raises: reading the ids here would cost
    # every decode step a device sync.
    if not buffer._backend.checks_expert_ids_on_device("low_latency_dispatch", x):
        check.check_expert_ids("topk_idx", topk_idx, experts)


def low_latency_combine(
    buffer: Buffer,
    x: Any,
    topk_idx: Any,
    topk_weights: Any,
    handle: Any,
    out: Any,
    combine_wait_recv_cost_stats: Any,
) -> None:
    low_latency_mode(buffer, "low_latency_combine")
    if not isinstance(handle, LowLatencyHandle):
        raise TypeError(f"handle: expected the handle low_latency_dispatch returned, got {type(handle).__name__}")
    experts_per_rank = handle.num_experts // buffer.group_size
    slots = buffer.group_size * handle.num_max_dispatch_tokens_per_rank
    check.check_tensor("x", x, dtype=torch.bfloat16, shape=(experts_per_rank, slots, handle.hidden), contiguous=True)
    check.check_tensor("topk_idx", topk_idx, dtype=torch.int64, shape=(handle.num_tokens, None), contiguous=True)
    check.check_tensor("topk_weights", topk_weights, dtype=torch.float32, shape=tuple(topk_idx.shape), contiguous=True)
    if out is not None:
        check.check_tensor(
            "out",
            out,
            dtype=torch.bfloat16,
            shape=(handle.num_tokens, handle.hidden),
            contiguous=True,
            device=topk_idx.device,
        )
    if combine_wait_recv_cost_stats is not None:
        check.check_tensor(
            "combine_wait_recv_cost_stats",
            combine_wait_recv_cost_stats,
            dtype=torch.int64,
            shape=(buffer.group_size,),
            device=topk_idx.device,
        )
