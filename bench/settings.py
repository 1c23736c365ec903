"""What a benchmark run measures: the cases, the sizes, and the per-rank settings every process gets."""

from __future__ import annotations

import dataclasses
import os
import sys

from bench import timing

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NORMAL = "normal"
LOW_LATENCY = "low_latency"
# (path, mode, dtype, return_recv_hook) in table order.
CASES: tuple[tuple[str, str, str, bool], ...] = (
    ("dispatch", NORMAL, "bf16", False),
    ("dispatch", NORMAL, "fp8", False),
    ("combine", NORMAL, "bf16", False),
    ("ll_dispatch", LOW_LATENCY, "fp8", False),
    ("ll_dispatch+hook", LOW_LATENCY, "fp8", True),
    ("ll_combine", LOW_LATENCY, "bf16", False),
    ("ll_combine+hook", LOW_LATENCY, "bf16", True),
)
BYTES_PER_CHANNEL = {"bf16": timing.BF16_BYTES_PER_CHANNEL, "fp8": timing.FP8_BYTES_PER_CHANNEL}

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
