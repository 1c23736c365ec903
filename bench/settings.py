"""What a benchmark run measures: the cases, the sizes, and the per-rank settings every process gets."""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import NamedTuple

from bench import timing

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NORMAL = "normal"
LOW_LATENCY = "low_latency"
# Normal mode on the same data with R ranks emulating --nodes nodes (num_ranks_per_node = R / nodes, as
# DEEP_EP_PY_RANKS_PER_NODE does): the hierarchical path, next to the intranode rows of the same rank count.
INTERNODE = "internode"
# The internode mode with every transfer between nodes through NVSHMEM puts and signals (DEEP_EP_PY_EMULATE_NETWORK=1),
# the path a NIC takes: on one host the kernels otherwise store straight through P2P mappings between "nodes" too.
INTERNODE_PUTS = "internode_puts"
# Normal mode on the same data with a receive arena (Buffer's num_recv_arena_bytes): the one-copy paths of the
# intranode kernels.
ONE_COPY = "one_copy"
# Low latency with every rank its own node and the network emulated (DEEP_EP_PY_RANKS_PER_NODE=1,
# DEEP_EP_PY_EMULATE_NETWORK=1): every delivery an NVSHMEM put and signal, the path a NIC takes, though nvshmem_ptr
# maps every PE of one host.
LOW_LATENCY_PUTS = "low_latency_puts"
MODES = (NORMAL, ONE_COPY, INTERNODE, INTERNODE_PUTS, LOW_LATENCY, LOW_LATENCY_PUTS)
# Without --paths: the puts rows only differ from the internode and low-latency rows on the kernels, so they are
# asked for by name.
DEFAULT_MODES = (NORMAL, ONE_COPY, INTERNODE, LOW_LATENCY)
# The modes that time the low-latency calls (--ll-tokens per rank, no SM count).
LOW_LATENCY_MODES = (LOW_LATENCY, LOW_LATENCY_PUTS)
# The modes whose ranks play --nodes nodes.
NODE_MODES = (INTERNODE, INTERNODE_PUTS)
# Path prefixes of the modes whose rows repeat the normal-mode calls on the same data (longest first).
NORMAL_PATH_PREFIXES = {INTERNODE_PUTS: "internode_puts_", INTERNODE: "internode_", ONE_COPY: "one_copy_"}
DEFAULT_NODES = 2
GRAPH_PATH = "ll_dispatch+combine graph"
GRAPH_DTYPE = "fp8+bf16"  # fp8 dispatch, bf16 combine
# (path, mode, dtype, return_recv_hook) in table order.
CASES: tuple[tuple[str, str, str, bool], ...] = (
    ("dispatch", NORMAL, "bf16", False),
    ("dispatch", NORMAL, "fp8", False),
    ("combine", NORMAL, "bf16", False),
    ("one_copy_dispatch", ONE_COPY, "bf16", False),
    ("one_copy_dispatch", ONE_COPY, "fp8", False),
    ("one_copy_combine", ONE_COPY, "bf16", False),
    ("internode_dispatch", INTERNODE, "bf16", False),
    ("internode_dispatch", INTERNODE, "fp8", False),
    ("internode_combine", INTERNODE, "bf16", False),
    ("internode_puts_dispatch", INTERNODE_PUTS, "bf16", False),
    ("internode_puts_dispatch", INTERNODE_PUTS, "fp8", False),
    ("internode_puts_combine", INTERNODE_PUTS, "bf16", False),
    ("ll_dispatch", LOW_LATENCY, "fp8", False),
    ("ll_dispatch+hook", LOW_LATENCY, "fp8", True),
    ("ll_combine", LOW_LATENCY, "bf16", False),
    ("ll_combine+hook", LOW_LATENCY, "bf16", True),
    ("ll_puts_dispatch", LOW_LATENCY_PUTS, "fp8", False),
    ("ll_puts_combine", LOW_LATENCY_PUTS, "bf16", False),
    # One low_latency_dispatch (fp8, no hook) + low_latency_combine (bf16) captured in a CUDA graph, timed as
    # graph.replay(). CUDA and the low-latency kernels only (see bench/worker.py _graph_round_trip).
    (GRAPH_PATH, LOW_LATENCY, GRAPH_DTYPE, False),
)
# A graph row's bytes: the fp8 dispatch's received bytes plus the bf16 bytes the combine sends back, for the same
# (token, expert) rows.
BYTES_PER_CHANNEL = {
    "bf16": timing.BF16_BYTES_PER_CHANNEL,
    "fp8": timing.FP8_BYTES_PER_CHANNEL,
    GRAPH_DTYPE: timing.FP8_BYTES_PER_CHANNEL + timing.BF16_BYTES_PER_CHANNEL,
}

# HBM traffic per payload byte BY DESIGN, not measured: what the kernels' code reads and writes per payload byte,
# every access counted as HBM traffic (summed over all GPUs; L2 hits only make the real figure lower). Keyed by
# (path, whether the kernel module for that path is active on the Buffer's backend); None where unknown (the
# reference fallback: host copies and gloo, not an HBM figure). A value HbmDesign(per_row, per_token, per_node_row)
# means
#     per_row + per_token / (rows per token) + per_node_row * (node rows per row)
# bytes per payload byte, per_token and per_node_row in units of one payload row. Rows per token = rows received
# over all ranks / tokens over all ranks in the run (normal mode: destination ranks per token; low latency: top-k
# choices kept); node rows per row = (token, destination node) pairs over all ranks / rows received over all ranks
# (internode only: destination nodes per token over destination ranks per token, the source's own node counted).
# Payload row = what the bench counts as bytes (fp8: H * (1 + 4/128), bf16: H * 2).
#
# Intranode normal kernels (csrc/intranode), each payload byte copied twice:
#   dispatch: sender reads the row of x (1) and writes the peer's staging (1), receiver reads staging (1) and
#             writes recv_x (1)                                                        = 4 per row, 0 per token.
#             (fp8 alike: x is already fp8, its scales are part of the payload row.)
#   combine:  sender reads its recv_x row (1) and writes the source's staging (1); the source reads the staging
#             rows (1) and writes the reduced token once (1 row per token)             = 3 per row, 1 per token.
#             That is a combine in one round; when the staging holds fewer rows than a call moves, each further
#             round also writes and reads a float32 partial sum per token (+4 rows per token a round), not counted.
# One-copy intranode kernels (receive arena):
#   dispatch: the sender reads the row of x (1) and writes it straight into the receiver's result tensor (1)
#                                                                                      = 2 per row, 0 per token.
#   combine:  the source reads each row from the rank that holds it (1), and writes the sum once (1 per token)
#                                                                                      = 1 per row, 1 per token.
#             The bench combines recv_x, a dispatch result already in the arena; an input that is not gets copied
#             in first (+2 per row).
# Internode (hierarchical) normal kernels (csrc/internode): a token bound for node n goes once to its forwarder on n
# (the rank of n with the source's local index; on the source's own node, the source itself), by direct stores
# where the forwarder is P2P-mapped (always, on one GPU); every rank of n that needs it reads it from there.
#   dispatch: per (token, destination node): the source reads the row of x (1) and writes the forwarder's staging
#             (1), shared by the node's receivers; per received row: the receiver reads the forwarder's staging (1)
#             and writes recv_x (1)                                = 2 per row, 2 per node row, 0 per token.
#             At one destination rank per node this is the intranode 4; the more receivers share a node row, the
#             closer it gets to 2.
#   combine:  per row: the receiver reads its recv_x row (1) and writes the forwarder's staging (1), the forwarder
#             reads it (1); per (token, node): the forwarder writes one bf16 partial sum into the source's staging (1),
#             the source reads it (1); per token: the source writes the output (1)
#                                                                  = 3 per row, 2 per node row, 1 per token.
#             One round; further rounds add a float32 partial per token, not counted (as intranode).
#   internode_puts (DEEP_EP_PY_EMULATE_NETWORK=1): a row bound for another node is written into the sender's own
#             send slot (1) and put from there (1 more read) before it lands in the peer (dispatch: the source's
#             row for a forwarder; combine: the forwarder's partial sum for the source) = +2 per node row that
#             crosses nodes (a "net row"), on top of the figures above.
# Low-latency kernels (csrc/low_latency, the P2P/same-GPU path; the bench's LL dispatch is fp8, F = 1 + 4/128):
#   dispatch: per token, the cast reads x in bf16 (2H = 2/F payload rows) and writes the fp8 message into the send
#             area (1); per (token, expert) row, the sender reads the send-area message (1) and writes the peer's
#             recv area (1), the receiver reads the recv area (1) and writes recv_x + scales (1)
#                                                                    = 4 per row, 1 + 2/F (~2.94) per token.
#             At top-8: 4 + 2.94/8 ~ 4.37.
#   combine:  per row, the sender reads the expert output row (1) and writes the source's recv area (1), the
#             source reads it (1); per token it writes the weighted sum once (1)     = 3 per row, 1 per token.
#             (Not zero-copy: the bench passes its own expert-output tensor; the send area is not used.)
#   graph (dispatch + combine): the two above, weighted by their payload bytes (fp8 F*H and bf16 2H a row).
#   ll_puts_* (every delivery a put): the dispatch puts the send-area message itself, as the stores copy it
#             (4 per row, as above); the combine first stages each row in its send area (1 read, 1 write), puts
#             it from there (1 read, 1 write) and the source reads it (1)              = 5 per row, 1 per token.
# The "+hook" rows run the same kernels as their plain rows.


class HbmDesign(NamedTuple):
    """Design HBM bytes per payload byte, split by what they scale with (see the comment above)."""

    per_row: float
    per_token: float
    per_node_row: float = 0.0
    per_net_row: float = 0.0  # in units of one payload row, per (token, node) row that crosses nodes


_INTRANODE_DISPATCH = HbmDesign(4.0, 0.0)
_INTRANODE_COMBINE = HbmDesign(3.0, 1.0)
_ONE_COPY_DISPATCH = HbmDesign(2.0, 0.0)
_ONE_COPY_COMBINE = HbmDesign(1.0, 1.0)
_INTERNODE_DISPATCH = HbmDesign(2.0, 0.0, 2.0)
_INTERNODE_COMBINE = HbmDesign(3.0, 1.0, 2.0)
_INTERNODE_PUTS_DISPATCH = HbmDesign(2.0, 0.0, 2.0, 2.0)
_INTERNODE_PUTS_COMBINE = HbmDesign(3.0, 1.0, 2.0, 2.0)
_LL_DISPATCH_FP8 = HbmDesign(4.0, 1.0 + timing.BF16_BYTES_PER_CHANNEL / timing.FP8_BYTES_PER_CHANNEL)
_LL_COMBINE = HbmDesign(3.0, 1.0)
_LL_PUTS_COMBINE = HbmDesign(5.0, 1.0)
HBM_BYTES_BY_DESIGN: dict[tuple[str, bool], HbmDesign | None] = {
    ("dispatch", True): _INTRANODE_DISPATCH,
    ("combine", True): _INTRANODE_COMBINE,
    ("one_copy_dispatch", True): _ONE_COPY_DISPATCH,
    ("one_copy_combine", True): _ONE_COPY_COMBINE,
    ("internode_dispatch", True): _INTERNODE_DISPATCH,
    ("internode_combine", True): _INTERNODE_COMBINE,
    ("internode_puts_dispatch", True): _INTERNODE_PUTS_DISPATCH,
    ("internode_puts_combine", True): _INTERNODE_PUTS_COMBINE,
    ("ll_dispatch", True): _LL_DISPATCH_FP8,
    ("ll_dispatch+hook", True): _LL_DISPATCH_FP8,
    ("ll_combine", True): _LL_COMBINE,
    ("ll_combine+hook", True): _LL_COMBINE,
    ("ll_puts_dispatch", True): _LL_DISPATCH_FP8,
    ("ll_puts_combine", True): _LL_PUTS_COMBINE,
    **{(path, False): None for path, _, _, _ in CASES},
}


def hbm_bytes_per_payload_byte(
    path: str,
    kernels_active: bool,
    rows_per_token: float | None,
    node_rows_per_row: float | None = None,
    net_rows_per_row: float | None = None,
) -> float | None:
    """HBM_BYTES_BY_DESIGN evaluated for a run's rows per token (and node rows and net rows per row, for the paths
    that need them); None where not known (or no rows)."""
    if not kernels_active or not rows_per_token or rows_per_token <= 0:
        return None
    if path == GRAPH_PATH:
        dispatch = hbm_bytes_per_payload_byte("ll_dispatch", True, rows_per_token)
        combine = hbm_bytes_per_payload_byte("ll_combine", True, rows_per_token)
        if dispatch is None or combine is None:
            return None
        fp8, bf16 = BYTES_PER_CHANNEL["fp8"], BYTES_PER_CHANNEL["bf16"]
        return (dispatch * fp8 + combine * bf16) / (fp8 + bf16)
    figure = HBM_BYTES_BY_DESIGN.get((path, True))
    if figure is None:
        return None
    if (figure.per_node_row and node_rows_per_row is None) or (figure.per_net_row and net_rows_per_row is None):
        return None
    return (
        figure.per_row
        + figure.per_token / rows_per_token
        + figure.per_node_row * (node_rows_per_row or 0.0)
        + figure.per_net_row * (net_rows_per_row or 0.0)
    )


# Sizes: the standard settings (targets.md) and --quick (finishes in well under a minute on a 2-core CPU).
STANDARD = {"tokens": 4096, "hidden": 7168, "topk": 8, "experts": 256, "ll_tokens": 128}
QUICK = {
    "tokens": 256,
    "hidden": 1024,
    "topk": 8,
    "experts": 256,
    "ll_tokens": 64,
    "ranks": "2",
    "warmup": 1,
    "iters": 5,
}
# --device: "cpu" (the reference backend over gloo), "cuda" (the kernels on the GPU) or "emulated" (the kernels on
# their CPU emulator, deep_ep_py._C_emu: the kernel rows and every kernel-only path of the bench, run where no GPU
# is, timings meaningless).
EMULATED = "emulated"
DEVICES = ("cpu", "cuda", EMULATED)
DEFAULT_ITERS = {"cuda": (10, 50), "cpu": (2, 5), EMULATED: (1, 3)}  # device -> (warmup, iters)
# Bytes of the copy-roof tensor when --roof-bytes is not given: 1 GiB on a GPU, less on the emulator's host.
DEFAULT_ROOF_BYTES = {"cuda": 1 << 30, "cpu": 1 << 30, EMULATED: 1 << 26}
# What the table and the JSON call the device of an emulated run, and the note they carry: its figures are the
# CPU's wall-clock time of the emulated kernels (fibers, host memory), nothing about the kernels' speed on a GPU.
EMULATOR_DEVICE_NAME = "CPU emulator (timings not meaningful)"
EMULATOR_NOTE = (
    "CPU EMULATOR of the kernels (--device emulated, deep_ep_py._C_emu): every figure below (times, GB/s, copy"
    " roof, % of roof, vs intranode) is CPU wall-clock time of emulated kernels and means NOTHING about the"
    " kernels' speed; this run checks the bench's kernel paths, not performance"
)


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Everything a rank needs; picklable, passed to every rank by the launcher."""

    tokens: int
    hidden: int
    topk: int
    experts: int
    ll_tokens: int
    warmup: int
    iters: int
    modes: tuple[str, ...]
    device: str  # one of DEVICES: "cpu", "cuda" or "emulated"
    backend: str | None  # Buffer(backend=...) or None for the library's default
    dispatch_handle: str  # "cached" or "fresh"
    roof_bytes: int
    seed: int
    nodes: int = DEFAULT_NODES  # nodes the internode rows emulate (ranks per node = ranks / nodes)
    num_sms: int | None = None  # normal-mode kernels' SMs; None: num_sms_for's default at each rank count


# SMs per rank DeepEP V1's default configs used for the figures in ../shared/targets.md (24 at 2 and 4 ranks, 16 at
# 8): the normal-mode rows use as many by default, so that "no more SMs" compares like with like.
DEEPEP_V1_NUM_SMS = {2: 24, 4: 24, 8: 16}


def num_sms_for(num_ranks: int, requested: int | None, buffer_default: int) -> int:
    """The SMs the normal-mode kernels get at num_ranks: the requested count, else DeepEP V1's in the targets, else
    Buffer's default."""
    if requested is not None:
        return requested
    return DEEPEP_V1_NUM_SMS.get(num_ranks, buffer_default)


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)
