"""What a benchmark run measures: the cases, the sizes, and the per-rank settings every process gets."""

from __future__ import annotations

import dataclasses
import os
import sys

from bench import timing

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NORMAL = "normal"
LOW_LATENCY = "low_latency"
GRAPH_PATH = "ll_dispatch+combine graph"
GRAPH_DTYPE = "fp8+bf16"  # fp8 dispatch, bf16 combine
# (path, mode, dtype, return_recv_hook) in table order.
CASES: tuple[tuple[str, str, str, bool], ...] = (
    ("dispatch", NORMAL, "bf16", False),
    ("dispatch", NORMAL, "fp8", False),
    ("combine", NORMAL, "bf16", False),
    ("ll_dispatch", LOW_LATENCY, "fp8", False),
    ("ll_dispatch+hook", LOW_LATENCY, "fp8", True),
    ("ll_combine", LOW_LATENCY, "bf16", False),
    ("ll_combine+hook", LOW_LATENCY, "bf16", True),
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
# reference fallback: host copies and gloo, not an HBM figure). A value (per_row, per_token) means
#     per_row + per_token / (rows per token)
# bytes per payload byte, per_token in units of one payload row, rows per token = rows received over all ranks
# / tokens over all ranks in the run (normal mode: destination ranks per token; low latency: top-k choices kept).
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
# The "+hook" rows run the same kernels as their plain rows.
_INTRANODE_DISPATCH = (4.0, 0.0)
_INTRANODE_COMBINE = (3.0, 1.0)
_LL_DISPATCH_FP8 = (4.0, 1.0 + timing.BF16_BYTES_PER_CHANNEL / timing.FP8_BYTES_PER_CHANNEL)
_LL_COMBINE = (3.0, 1.0)
HBM_BYTES_BY_DESIGN: dict[tuple[str, bool], tuple[float, float] | None] = {
    ("dispatch", True): _INTRANODE_DISPATCH,
    ("combine", True): _INTRANODE_COMBINE,
    ("ll_dispatch", True): _LL_DISPATCH_FP8,
    ("ll_dispatch+hook", True): _LL_DISPATCH_FP8,
    ("ll_combine", True): _LL_COMBINE,
    ("ll_combine+hook", True): _LL_COMBINE,
    **{(path, False): None for path, _, _, _ in CASES},
}


def hbm_bytes_per_payload_byte(path: str, kernels_active: bool, rows_per_token: float | None) -> float | None:
    """HBM_BYTES_BY_DESIGN evaluated for a run's rows per token; None where not known (or no rows)."""
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
    per_row, per_token = figure
    return per_row + per_token / rows_per_token


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
DEFAULT_ITERS = {"cuda": (10, 50), "cpu": (2, 5)}  # device -> (warmup, iters)


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
    device: str  # "cpu" or "cuda"
    backend: str | None  # Buffer(backend=...) or None for the library's default
    dispatch_handle: str  # "cached" or "fresh"
    roof_bytes: int
    seed: int


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)
