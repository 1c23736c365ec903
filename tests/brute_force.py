"""Plain-torch references for the tests: inputs every rank can regenerate, and the expected results.

Nothing here calls deep_ep_py: the tests are an independent check of the library. Every rank builds every
rank's input from a per-rank seed (``make_rank_inputs``), so it knows the global picture without communicating.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

import torch

FP8_MAX = 448.0
FP8_AMAX_MIN = 1e-4
FP8_GROUP = 128


# ---------------------------------------------------------------------------------------------------------------
# Checks that raise with the values in the message (children run without pytest's assertion rewriting).


def check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def check_equal(name: str, actual, expected) -> None:
    if isinstance(expected, torch.Tensor):
        check(isinstance(actual, torch.Tensor), f"{name}: expected a tensor, got {type(actual).__name__}")
        check(actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype}, expected {expected.dtype}")
        check(
            tuple(actual.shape) == tuple(expected.shape),
            f"{name}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}",
        )
        a, e = _bits(actual), _bits(expected)
        if not torch.equal(a, e):
            bad = (a != e).nonzero()
            first = tuple(bad[0].tolist()) if bad.numel() else ()
            got_value = actual[first].item() if first else actual
            want_value = expected[first].item() if first else expected
            small = f"\nactual={actual}\nexpected={expected}" if expected.numel() <= 64 else ""
            raise AssertionError(
                f"{name}: {bad.shape[0]} elements differ (not bitwise equal); first at {first}: "
                f"actual {got_value} expected {want_value}{small}"
            )
    else:
        check(actual == expected, f"{name}: {actual!r}, expected {expected!r}")


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A view comparable bit for bit (NaN == NaN, -0 != +0)."""
    t = t.detach().cpu().contiguous()
    if t.dtype in (torch.float8_e4m3fn, torch.bool):
        return t.view(torch.uint8)
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.view(torch.int16)
    if t.dtype == torch.float32:
        return t.view(torch.int32)
    if t.dtype == torch.float64:
        return t.view(torch.int64)
    return t


def check_close(name: str, actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> None:
    """|actual - expected| <= atol + rtol * |expected| elementwise, compared in float32."""
    check(
        tuple(actual.shape) == tuple(expected.shape),
        f"{name}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}",
    )
    a, e = actual.detach().float().cpu(), expected.detach().float().cpu()
    check(bool(torch.isfinite(a).all()), f"{name}: non-finite values in the result: {a}")
    excess = (a - e).abs() - (atol + rtol * e.abs())
    if bool((excess > 0).any()):
        idx = tuple(torch.nonzero(excess > 0)[0].tolist())
        raise AssertionError(
            f"{name}: {(excess > 0).sum().item()} elements outside rtol={rtol} atol={atol}; first at {idx}: "
            f"actual {a[idx].item()} expected {e[idx].item()}"
        )


# ---------------------------------------------------------------------------------------------------------------
# Inputs.


@dataclasses.dataclass
class RankInput:
    x: torch.Tensor  # bf16 [T, H]
    topk_idx: torch.Tensor  # int64 [T, K], -1 = no expert
    topk_weights: torch.Tensor  # float32 [T, K]


def make_rank_inputs(
    seed: int,
    rank: int,
    num_tokens: int,
    hidden: int,
    num_topk: int,
    num_experts: int,
    allowed_experts: Sequence[int] | None = None,
    drop_prob: float = 0.0,
    x_dtype: torch.dtype = torch.bfloat16,
) -> RankInput:
    """Random tokens of one rank: K distinct experts per token among allowed_experts, each replaced by -1
    with probability drop_prob. Deterministic in (seed, rank, shapes)."""
    gen = torch.Generator().manual_seed(seed * 7919 + rank * 104729 + 17)
    allowed = torch.tensor(list(allowed_experts) if allowed_experts is not None else range(num_experts))
    k_real = min(num_topk, allowed.numel())
    topk_idx = torch.full((num_tokens, num_topk), -1, dtype=torch.int64)
    for t in range(num_tokens):
        perm = allowed[torch.randperm(allowed.numel(), generator=gen)[:k_real]]
        topk_idx[t, :k_real] = perm
    if drop_prob > 0 and num_tokens > 0:
        drop = torch.rand((num_tokens, num_topk), generator=gen) < drop_prob
        topk_idx[drop] = -1
    topk_weights = torch.rand((num_tokens, num_topk), generator=gen, dtype=torch.float32) + 0.05
    x = (torch.randn((num_tokens, hidden), generator=gen, dtype=torch.float32) * 2).to(x_dtype)
    return RankInput(x=x, topk_idx=topk_idx, topk_weights=topk_weights)


# ---------------------------------------------------------------------------------------------------------------
# Normal mode.


def layout(topk_idx: torch.Tensor, num_experts: int, num_ranks: int, ranks_per_node: int):
    """(num_tokens_per_rank int32[R], num_tokens_per_node int32[N] or None, num_tokens_per_expert int32[E],
    is_token_in_rank bool[T, R]) by loops."""
    num_local = num_experts // num_ranks
    num_tokens = topk_idx.shape[0]
    in_rank = torch.zeros((num_tokens, num_ranks), dtype=torch.bool)
    per_expert = torch.zeros(num_experts, dtype=torch.int32)
    for t in range(num_tokens):
        for e in topk_idx[t].tolist():
            if e >= 0:
                per_expert[e] += 1
                in_rank[t, e // num_local] = True
    per_rank = in_rank.sum(dim=0).to(torch.int32)
    num_nodes = num_ranks // ranks_per_node
    if num_nodes <= 1:
        per_node = None
    else:
        per_node = torch.zeros(num_nodes, dtype=torch.int32)
        for t in range(num_tokens):
            for n in range(num_nodes):
                if bool(in_rank[t, n * ranks_per_node : (n + 1) * ranks_per_node].any()):
                    per_node[n] += 1
    return per_rank, per_node, per_expert, in_rank


@dataclasses.dataclass
class ExpectedDispatch:
    rows: list[tuple[int, int]]  # (source rank, source token) in receive order
    recv_topk_idx: torch.Tensor  # int64 [N, K]
    recv_topk_weights: torch.Tensor  # float32 [N, K]
    num_recv_per_expert: list[int]  # before alignment
    rank_prefix_matrix: torch.Tensor  # int32 [R, R]


def expected_dispatch(inputs: Sequence[RankInput], me: int, num_experts: int) -> ExpectedDispatch:
    num_ranks = len(inputs)
    num_local = num_experts // num_ranks
    rows, idx_rows, w_rows = [], [], []
    counts = [0] * num_local
    received = torch.zeros((num_ranks, num_ranks), dtype=torch.int64)  # received[src][dst]
    num_topk = inputs[0].topk_idx.shape[1]
    for src, inp in enumerate(inputs):
        for t in range(inp.topk_idx.shape[0]):
            experts = inp.topk_idx[t].tolist()
            dsts = {e // num_local for e in experts if e >= 0}
            for dst in dsts:
                received[src, dst] += 1
            if me not in dsts:
                continue
            rows.append((src, t))
            local_idx = []
            local_w = []
            for k, e in enumerate(experts):
                if e >= 0 and e // num_local == me:
                    local_idx.append(e - me * num_local)
                    local_w.append(float(inp.topk_weights[t, k]))
                    counts[e - me * num_local] += 1
                else:
                    local_idx.append(-1)
                    local_w.append(0.0)
            idx_rows.append(local_idx)
            w_rows.append(local_w)
    recv_topk_idx = torch.tensor(idx_rows, dtype=torch.int64).reshape(len(rows), num_topk)
    recv_topk_weights = torch.tensor(w_rows, dtype=torch.float32).reshape(len(rows), num_topk)
    prefix = torch.zeros((num_ranks, num_ranks), dtype=torch.int32)
    for i in range(num_ranks):
        for r in range(num_ranks):
            prefix[i, r] = int(received[: i + 1, r].sum())
    return ExpectedDispatch(rows, recv_topk_idx, recv_topk_weights, counts, prefix)


def gather_rows(rows: Sequence[tuple[int, int]], per_rank: Sequence[torch.Tensor], width: int, dtype) -> torch.Tensor:
    if not rows:
        return torch.empty((0, width), dtype=dtype)
    return torch.stack([per_rank[src][t] for src, t in rows])


def align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


# ---------------------------------------------------------------------------------------------------------------
# FP8, written from the contract's FP8 format section with float32 bit manipulation (no frexp/log2).


def round_scale_up_pow2(scale: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= scale for positive normal float32 scales, via the exponent and mantissa bits."""
    bits = scale.float().contiguous().view(torch.int32).to(torch.int64)
    exponent = (bits >> 23) & 0xFF
    mantissa = bits & 0x7FFFFF
    exponent = exponent + (mantissa != 0).to(torch.int64)
    return (exponent << 23).to(torch.int32).view(torch.float32)


def fp8_cast(x: torch.Tensor, round_scale: bool = False):
    """x [T, H] -> (float8_e4m3fn [T, H], float32 scales [T, H/128]) by the contract's formula."""
    num_tokens, hidden = x.shape
    groups = x.float().reshape(num_tokens, hidden // FP8_GROUP, FP8_GROUP)
    amax = groups.abs().amax(dim=-1)
    amax = torch.where(amax < FP8_AMAX_MIN, torch.full_like(amax, FP8_AMAX_MIN), amax)
    scale = amax / FP8_MAX
    if round_scale:
        scale = round_scale_up_pow2(scale)
    values = (groups / scale.unsqueeze(-1)).reshape(num_tokens, hidden).to(torch.float8_e4m3fn)
    return values, scale


def ue8m0_pack(scale: torch.Tensor) -> torch.Tensor:
    """Power-of-two float32 scales [T, G] -> int32 [T, G/4]: byte j of word w = exponent field of group 4w+j."""
    num_tokens, num_groups = scale.shape
    exponent = (scale.float().contiguous().view(torch.int32).to(torch.int64) >> 23) & 0xFF
    exponent = exponent.reshape(num_tokens, num_groups // 4, 4)
    word = exponent[..., 0] | (exponent[..., 1] << 8) | (exponent[..., 2] << 16) | (exponent[..., 3] << 24)
    word = torch.where(word >= 2**31, word - 2**32, word)
    return word.to(torch.int32)


def ue8m0_unpack(packed: torch.Tensor) -> torch.Tensor:
    words = packed.to(torch.int64) & 0xFFFFFFFF
    groups = [((words >> (8 * j)) & 0xFF) for j in range(4)]
    exponent = torch.stack(groups, dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 4)
    return (exponent << 23).to(torch.int32).view(torch.float32)


def fp8_dequant(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    num_tokens, hidden = values.shape
    groups = values.float().reshape(num_tokens, hidden // FP8_GROUP, FP8_GROUP)
    return (groups * scale.float().unsqueeze(-1)).reshape(num_tokens, hidden)


# ---------------------------------------------------------------------------------------------------------------
# Low-latency mode.


def row_key(*parts: torch.Tensor) -> bytes:
    return b"".join(_bits(p).numpy().tobytes() for p in parts)


def multiset(keys) -> dict[bytes, int]:
    return dict(collections.Counter(keys))
