"""Kernel configuration (SMs and chunk sizes) and the buffer sizes each path needs.

The byte formulas here are the single description of the buffers: the reference backend checks that the
buffers given to Buffer are at least this large, so code sized on the reference runs unchanged on the kernels.
"""

from __future__ import annotations

import math
import os
from typing import Any

# Largest top-k the normal-mode buffers reserve room for per token.
MAX_TOPK = 16
# Channels of FP8 that share one float32 scale.
FP8_GROUP_SIZE = 128
# NVLink-domain size assumed by the size hints when no override is set (DeepEP's NUM_MAX_NVL_PEERS).
DEFAULT_MAX_RANKS_PER_NODE = 8
BUFFER_ALIGNMENT_BYTES = 128
RANKS_PER_NODE_ENV = "DEEP_EP_PY_RANKS_PER_NODE"
# How long any wait for a peer may take before it raises DeepEPTimeoutError (kernels read the same variable).
TIMEOUT_ENV = "DEEP_EP_PY_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 100.0
# Whether a kernel that records an error (a wait that timed out, a count past its capacity, an id out of range) then
# traps, which ends the CUDA context: "captured" (launches captured into a CUDA graph, whose replays no host check
# follows), "always" (as DeepEP does), or "never" (record only: the next deep_ep_py call raises).
TRAP_ENV = "DEEP_EP_PY_TRAP_ON_DEVICE_ERROR"
TRAP_POLICIES = ("captured", "always", "never")
# Receive arena of the one-copy intranode dispatch (Buffer's num_recv_arena_bytes when that is not given).
RECV_ARENA_ENV = "DEEP_EP_PY_RECV_ARENA_BYTES"
# "1": the kernels reach ranks of other nodes only through NVSHMEM puts and signals, even where a P2P mapping exists
# (one GPU playing several nodes under DEEP_EP_PY_RANKS_PER_NODE), so the path a NIC takes runs without one. The
# internode kernels read it in C++ (csrc/internode/notify.cu), the low-latency ones take it from their backend.
EMULATE_NETWORK_ENV = "DEEP_EP_PY_EMULATE_NETWORK"


def _align(num_bytes: int, alignment: int = BUFFER_ALIGNMENT_BYTES) -> int:
    return (num_bytes + alignment - 1) // alignment * alignment


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected int, got {type(value).__name__} ({value!r})")
    if value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value}")
    return value


def ranks_per_node_override() -> int | None:
    """The ranks-per-node override from DEEP_EP_PY_RANKS_PER_NODE, or None when unset."""
    raw = os.environ.get(RANKS_PER_NODE_ENV)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{RANKS_PER_NODE_ENV}: expected a positive int, got {raw!r}") from None
    return _check_positive_int(RANKS_PER_NODE_ENV, value)


def emulate_network() -> bool:
    """DEEP_EP_PY_EMULATE_NETWORK is set to anything but "" or "0": the internode and low-latency kernels of a Buffer
    built then reach ranks of other nodes only through NVSHMEM puts and signals."""
    return os.environ.get(EMULATE_NETWORK_ENV, "") not in ("", "0")


def recv_arena_bytes(requested: int | None) -> int:
    """Bytes of receive arena per rank for one-copy intranode dispatch: Buffer's num_recv_arena_bytes, else
    DEEP_EP_PY_RECV_ARENA_BYTES, else 0 (no arena: every dispatch moves its rows through the staging buffer)."""
    if requested is None:
        raw = os.environ.get(RECV_ARENA_ENV, "")
        if raw == "":
            return 0
        try:
            requested = int(raw)
        except ValueError:
            raise ValueError(f"{RECV_ARENA_ENV}: expected a non-negative int, got {raw!r}") from None
        name = RECV_ARENA_ENV
    else:
        name = "num_recv_arena_bytes"
    if isinstance(requested, bool) or not isinstance(requested, int):
        raise TypeError(f"{name}: expected int, got {type(requested).__name__} ({requested!r})")
    if requested < 0:
        raise ValueError(f"{name}: expected a non-negative int, got {requested}")
    return requested


def timeout_s() -> float:
    """Seconds a wait for peers may take: DEEP_EP_PY_TIMEOUT_S, else 100."""
    raw = os.environ.get(TIMEOUT_ENV, "")
    if raw == "":
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{TIMEOUT_ENV}: expected a positive number of seconds, got {raw!r}")
    return value


def trap_policy() -> str:
    """DEEP_EP_PY_TRAP_ON_DEVICE_ERROR, else "captured"."""
    raw = os.environ.get(TRAP_ENV, "")
    policy = raw or TRAP_POLICIES[0]
    if policy not in TRAP_POLICIES:
        raise ValueError(f"{TRAP_ENV}: expected one of {', '.join(TRAP_POLICIES)}, got {raw!r}")
    return policy


def trap_on_device_error(capturing: bool) -> bool:
    """Whether a launch traps after recording an error, for a launch being captured into a CUDA graph or not."""
    policy = trap_policy()
    return policy == "always" or (policy == "captured" and capturing)


def hint_ranks_per_node(num_ranks: int) -> int:
    """Ranks per node the size hints assume: the override if set, else up to 8 (one NVLink domain)."""
    override = ranks_per_node_override()
    per_node = override if override is not None else DEFAULT_MAX_RANKS_PER_NODE
    return min(num_ranks, per_node)


class Config:
    """SMs and chunk sizes of the normal (high-throughput) kernels.

    Args (positional or keyword, as DeepEP V1):
        num_sms: SMs the kernels use; even, since each channel pairs a send and a receive block.
        num_max_nvl_chunked_send_tokens: tokens a sender moves per step into a peer's NVLink ring.
        num_max_nvl_chunked_recv_tokens: capacity of each NVLink ring, in tokens.
        num_max_rdma_chunked_send_tokens: tokens per network step (internode).
        num_max_rdma_chunked_recv_tokens: capacity of each network ring, in tokens (internode).

    The kernels here size their rounds from the buffer they are given, not from these chunk fields: the fields size
    that buffer through get_nvl_buffer_size_hint / get_rdma_buffer_size_hint (as DeepEP's do), so a config tuned for
    DeepEP gives a buffer of the size DeepEP would use, and num_sms sets the blocks of the copy kernels.
    """

    def __init__(
        self,
        num_sms: int,
        num_max_nvl_chunked_send_tokens: int,
        num_max_nvl_chunked_recv_tokens: int,
        num_max_rdma_chunked_send_tokens: int = 6,
        num_max_rdma_chunked_recv_tokens: int = 128,
    ) -> None:
        self.num_sms = _check_positive_int("num_sms", num_sms)
        if num_sms % 2 != 0:
            raise ValueError(f"num_sms: expected an even number (a send and a receive SM per channel), got {num_sms}")
        self.num_max_nvl_chunked_send_tokens = _check_positive_int(
            "num_max_nvl_chunked_send_tokens", num_max_nvl_chunked_send_tokens
        )
        self.num_max_nvl_chunked_recv_tokens = _check_positive_int(
            "num_max_nvl_chunked_recv_tokens", num_max_nvl_chunked_recv_tokens
        )
        self.num_max_rdma_chunked_send_tokens = _check_positive_int(
            "num_max_rdma_chunked_send_tokens", num_max_rdma_chunked_send_tokens
        )
        self.num_max_rdma_chunked_recv_tokens = _check_positive_int(
            "num_max_rdma_chunked_recv_tokens", num_max_rdma_chunked_recv_tokens
        )
        if num_max_nvl_chunked_send_tokens > num_max_nvl_chunked_recv_tokens:
            raise ValueError(
                "num_max_nvl_chunked_send_tokens: expected <= num_max_nvl_chunked_recv_tokens "
                f"({num_max_nvl_chunked_recv_tokens}), got {num_max_nvl_chunked_send_tokens}"
            )
        if num_max_rdma_chunked_send_tokens > num_max_rdma_chunked_recv_tokens:
            raise ValueError(
                "num_max_rdma_chunked_send_tokens: expected <= num_max_rdma_chunked_recv_tokens "
                f"({num_max_rdma_chunked_recv_tokens}), got {num_max_rdma_chunked_send_tokens}"
            )

    @property
    def num_channels(self) -> int:
        return self.num_sms // 2

    @staticmethod
    def token_slot_bytes(hidden_bytes: int) -> int:
        """Bytes one token takes in a ring: payload, FP8 scales, source index, top-k ids and weights."""
        hidden = hidden_bytes // 2  # hidden_bytes counts at least 2 bytes an element (DeepEP's convention)
        scale_bytes = math.ceil(hidden / FP8_GROUP_SIZE) * 4
        return _align(hidden_bytes + scale_bytes + 4 + MAX_TOPK * (8 + 4), 16)

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of NVLink buffer per rank for this config: one ring per (channel, peer in the node)
        of num_max_nvl_chunked_recv_tokens token slots, plus head/tail counters per ring."""
        _check_positive_int("hidden_bytes", hidden_bytes)
        _check_positive_int("num_ranks", num_ranks)
        num_nvl_ranks = hint_ranks_per_node(num_ranks)
        num_rings = self.num_channels * num_nvl_ranks
        # counters: head, tail and a per-node prefix of (2 * nodes + 2) ints per ring
        num_nodes = max(num_ranks // num_nvl_ranks, 1)
        counter_bytes = num_rings * (2 * num_nodes + 4) * 4
        ring_bytes = num_rings * self.num_max_nvl_chunked_recv_tokens * self.token_slot_bytes(hidden_bytes)
        return _align(counter_bytes + ring_bytes)

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of NVSHMEM buffer per rank for this config (0 within one node): a send and a receive
        ring per (channel, remote node) of num_max_rdma_chunked_recv_tokens token slots, plus counters."""
        _check_positive_int("hidden_bytes", hidden_bytes)
        _check_positive_int("num_ranks", num_ranks)
        num_nodes = num_ranks // hint_ranks_per_node(num_ranks)
        if num_nodes <= 1:
            return 0
        num_rings = self.num_channels * num_nodes
        counter_bytes = 2 * num_rings * (hint_ranks_per_node(num_ranks) + 4) * 4
        ring_bytes = 2 * num_rings * self.num_max_rdma_chunked_recv_tokens * self.token_slot_bytes(hidden_bytes)
        return _align(counter_bytes + ring_bytes)

    def as_dict(self) -> dict[str, int]:
        return {
            "num_sms": self.num_sms,
            "num_max_nvl_chunked_send_tokens": self.num_max_nvl_chunked_send_tokens,
            "num_max_nvl_chunked_recv_tokens": self.num_max_nvl_chunked_recv_tokens,
            "num_max_rdma_chunked_send_tokens": self.num_max_rdma_chunked_send_tokens,
            "num_max_rdma_chunked_recv_tokens": self.num_max_rdma_chunked_recv_tokens,
        }

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Config) and self.as_dict() == other.as_dict()

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.as_dict().items())
        return f"Config({args})"


# (nvl send, nvl recv, rdma send, rdma recv) chunk sizes by group size; the SM count comes from Buffer.num_sms.
# Rank counts not listed take the entry of the next larger listed size (or the largest).
_DISPATCH_CHUNKS = {
    2: (24, 256, 6, 128),
    4: (6, 256, 6, 128),
    8: (6, 256, 6, 128),
    16: (36, 288, 20, 128),
    32: (32, 288, 32, 128),
    64: (20, 288, 28, 128),
    128: (20, 560, 32, 128),
}
_COMBINE_CHUNKS = {
    2: (10, 256, 6, 128),
    4: (9, 256, 6, 128),
    8: (4, 256, 6, 128),
    16: (4, 288, 12, 128),
    32: (1, 288, 8, 128),
    64: (1, 288, 20, 128),
    128: (1, 560, 12, 128),
}


def _chunks_for(table: dict[int, tuple[int, int, int, int]], num_ranks: int) -> tuple[int, int, int, int]:
    _check_positive_int("num_ranks", num_ranks)
    for size in sorted(table):
        if num_ranks <= size:
            return table[size]
    return table[max(table)]


def default_dispatch_config(num_ranks: int, num_sms: int) -> Config:
    return Config(num_sms, *_chunks_for(_DISPATCH_CHUNKS, num_ranks))


def default_combine_config(num_ranks: int, num_sms: int) -> Config:
    return Config(num_sms, *_chunks_for(_COMBINE_CHUNKS, num_ranks))


def low_latency_rdma_size_hint(
    num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int
) -> int:
    """Bytes of NVSHMEM buffer per rank the low-latency kernels need: two alternating halves, each with

    - send area:  max(M * dispatch_msg, E * M * combine_msg)  (tokens out, or expert outputs going back: the
                  zero-copy combine buffer bf16 [L, R*M, H])
    - recv area:  S * M * max(dispatch_msg, combine_msg), S = max(E, MAX_TOPK)  (dispatch: one slot per
                  (local expert, source rank, token); combine: one row per (token, top-k slot < S))
    - signals:    2 * E * 8                                    (uint64 arrival signals, dispatch and combine)

    each rounded up to 128 bytes, where dispatch_msg = 16 + max(2 * H, H + 4 * H / 128) (a header, then bf16 or
    fp8 + scales) and combine_msg = 2 * H, each rounded up to 16 bytes. csrc/low_latency/buffer_layout.hpp lays the
    buffer out by the same formula.
    """
    m = _check_positive_int("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank)
    h = _check_positive_int("hidden", hidden)
    r = _check_positive_int("num_ranks", num_ranks)
    e = _check_positive_int("num_experts", num_experts)
    if e % r != 0:
        raise ValueError(f"num_experts: expected a multiple of num_ranks ({r}), got {e}")
    dispatch_msg = _align(16 + max(2 * h, h + 4 * math.ceil(h / FP8_GROUP_SIZE)), 16)
    combine_msg = _align(2 * h, 16)
    send_bytes = max(m * dispatch_msg, e * m * combine_msg)
    recv_bytes = max(e, MAX_TOPK) * m * max(dispatch_msg, combine_msg)
    signal_bytes = 2 * e * 8
    half = _align(send_bytes) + _align(recv_bytes) + _align(signal_bytes)
    return 2 * half


# Each tensor of a receive-arena block starts on this boundary (deep_ep_py/recv_arena.py ALIGNMENT).
RECV_ARENA_PART_ALIGNMENT = 256
NUM_RECV_ARENA_PARTS = 5  # recv_x, its scales, source indices, top-k ids, top-k weights


def recv_arena_size_hint(
    num_max_tokens_per_rank: int, hidden: int, num_ranks: int, num_topk: int, num_results: int
) -> int:
    """Bytes of receive arena per rank (Buffer's num_recv_arena_bytes) that hold num_results dispatch results alive
    at once, each of the most rows a rank can receive (every token of every rank routed to it): a row is the larger
    of a bf16 row and an fp8 row with its scales, plus its source index, top-k ids and weights, and each of a
    block's five tensors starts 256-byte aligned. Routing that spreads tokens over the ranks needs less; results
    that do not fit take the two-copy path, so a smaller arena is never wrong, only slower."""
    t = _check_positive_int("num_max_tokens_per_rank", num_max_tokens_per_rank)
    h = _check_positive_int("hidden", hidden)
    r = _check_positive_int("num_ranks", num_ranks)
    k = _check_positive_int("num_topk", num_topk)
    n = _check_positive_int("num_results", num_results)
    num_scales = math.ceil(h / FP8_GROUP_SIZE)
    row_bytes = max(2 * h, h + 4 * num_scales) + 4 + (8 + 4) * k
    block = t * r * row_bytes + NUM_RECV_ARENA_PARTS * RECV_ARENA_PART_ALIGNMENT
    return n * block
