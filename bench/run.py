"""``python -m bench``: dispatch and combine on N ranks, normal and low-latency mode, one table and one JSON.

Paths (each a row per rank count):
- normal mode, ``--tokens`` per rank: dispatch bf16, dispatch fp8, combine bf16;
- low-latency mode, ``--ll-tokens`` per rank: dispatch fp8 and combine bf16, each with and without
  ``return_recv_hook`` (with the hook, the timed region is the call plus ``hook()``; "send us" is the call alone).

Routing is random: topk_idx = randn(T, E).topk(K), x random bf16. Normal dispatch is timed with the handle of a
first dispatch (cached mode), as DeepEP's own test times it; ``--dispatch-handle fresh`` times the full call
with the layout and top-k instead. Low-latency combine is timed after an untimed dispatch each iteration.

Bandwidth is DeepEP's count: bytes received per rank over time, a received token (normal) or a received
(token, expert) row (low latency) counting H * 2 bytes in bf16 and H * (1 + 4/128) in fp8; combine counts the
bf16 bytes each rank sends back. Across ranks: the slowest rank's median time, the mean of the ranks' GB/s.

``--device cuda`` puts every rank on the GPU (rank % device_count); several ranks on one GPU need the MPS daemon
running (the GPU check script starts it), since the kernels of all ranks spin-wait on each other. There, rank 0
also measures the device-to-device copy roof in the same run, and each row is shown as a fraction of it
(see bench/report.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import sys
import time
from collections.abc import Sequence
from typing import Callable

import torch
import torch.distributed as dist

from bench import report, timing

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


def _log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Per-rank side: runs inside each launched process.


def _cast_to_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn [T, H], float32 scales [T, H/128]); the library's cast when it has one."""
    try:
        from deep_ep_py.fp8 import per_token_cast_to_fp8
    except ImportError:
        groups = x.float().view(x.shape[0], -1, 128)
        scales = groups.abs().amax(dim=-1).clamp(min=1e-4) / 448.0
        values = (groups / scales.unsqueeze(-1)).view_as(x).to(torch.float8_e4m3fn)
        return values, scales
    return per_token_cast_to_fp8(x)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _backend_name(buffer: object, requested: str | None) -> str:
    for attr in ("backend_name", "backend", "_backend"):
        value = getattr(buffer, attr, None)
        if isinstance(value, str):
            return value
        name = getattr(value, "name", None)
        if isinstance(name, str):
            return name
    return requested or "default"


def _kernel_status() -> tuple[bool, str]:
    """(whether the compiled kernels can run here, why not when they cannot)."""
    try:
        from deep_ep_py import _ext
    except ImportError:
        return False, "deep_ep_py._ext not found"
    if _ext.has_kernels() and _ext.gpu_available():
        return True, ""
    return False, _ext.kernels_unavailable_reason() or "no GPU"


def _hbm_bytes_per_payload_byte(buffer: object, path: str) -> float | None:
    """The backend's own HBM traffic per payload byte for a path, where it reports one (else None)."""
    value = getattr(buffer, "hbm_bytes_per_payload_byte", None)
    if callable(value):
        try:
            value = value(path)
        except (TypeError, ValueError, KeyError):
            return None
    return float(value) if isinstance(value, (int, float)) else None


def _make_buffer(cfg: BenchConfig, num_ranks: int, mode: str):
    import deep_ep_py

    kwargs = {"backend": cfg.backend} if cfg.backend else {}
    group = dist.group.WORLD
    if mode == LOW_LATENCY:
        num_rdma_bytes = deep_ep_py.Buffer.get_low_latency_rdma_size_hint(
            cfg.ll_tokens, cfg.hidden, num_ranks, cfg.experts
        )
        return deep_ep_py.Buffer(
            group,
            0,
            num_rdma_bytes,
            low_latency_mode=True,
            num_qps_per_rank=cfg.experts // num_ranks,
            explicitly_destroy=True,
            **kwargs,
        )
    hidden_bytes = cfg.hidden * 2
    num_nvl_bytes = max(
        deep_ep_py.Buffer.get_dispatch_config(num_ranks).get_nvl_buffer_size_hint(hidden_bytes, num_ranks),
        deep_ep_py.Buffer.get_combine_config(num_ranks).get_nvl_buffer_size_hint(hidden_bytes, num_ranks),
    )
    return deep_ep_py.Buffer(group, num_nvl_bytes, 0, explicitly_destroy=True, **kwargs)


def _random_routing(num_tokens: int, cfg: BenchConfig, device: torch.device):
    """x bf16 [T, H], topk_idx int64 [T, K] from random scores, topk_weights float32 [T, K] (positive)."""
    x = torch.randn(num_tokens, cfg.hidden, dtype=torch.bfloat16, device=device)
    scores = torch.randn(num_tokens, cfg.experts, dtype=torch.float32, device=device)
    topk_idx = scores.topk(cfg.topk, dim=-1).indices.to(torch.int64)
    topk_weights = torch.randn(num_tokens, cfg.topk, dtype=torch.float32, device=device).abs()
    return x, topk_idx, topk_weights


def _normal_paths(buffer, cfg: BenchConfig, num_ranks: int, device: torch.device) -> dict:
    """(path, dtype, hook) -> (fn, setup or None, payload rows this rank receives) for normal mode."""
    x, topk_idx, topk_weights = _random_routing(cfg.tokens, cfg, device)
    x_fp8 = _cast_to_fp8(x)
    x_fp8 = (x_fp8[0], x_fp8[1].T.contiguous().T)  # column-major scales, as DeepEP's test sends them
    dispatch_config = buffer.get_dispatch_config(num_ranks)
    combine_config = buffer.get_combine_config(num_ranks)
    num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, _ = (
        buffer.get_dispatch_layout(topk_idx, cfg.experts)
    )
    layout = {
        "num_tokens_per_rank": num_tokens_per_rank,
        "num_tokens_per_rdma_rank": num_tokens_per_rdma_rank,
        "is_token_in_rank": is_token_in_rank,
        "num_tokens_per_expert": num_tokens_per_expert,
        "topk_idx": topk_idx,
        "topk_weights": topk_weights,
    }
    recv_x, _, _, _, handle, _ = buffer.dispatch(x, config=dispatch_config, **layout)
    num_recv_tokens = int(recv_x.shape[0])

    def dispatch_fn(payload) -> Callable[[], None]:
        def run() -> None:
            if cfg.dispatch_handle == "cached":
                buffer.dispatch(payload, handle=handle, config=dispatch_config)
            else:
                buffer.dispatch(payload, config=dispatch_config, **layout)

        return run

    def combine() -> None:
        buffer.combine(recv_x, handle, config=combine_config)

    return {
        ("dispatch", "bf16", False): (dispatch_fn(x), None, num_recv_tokens),
        ("dispatch", "fp8", False): (dispatch_fn(x_fp8), None, num_recv_tokens),
        ("combine", "bf16", False): (combine, None, num_recv_tokens),
    }


def _low_latency_paths(buffer, cfg: BenchConfig, num_ranks: int, device: torch.device) -> dict:
    """(path, dtype, hook) -> (fn, setup or None, payload rows this rank receives) for low-latency mode."""
    num_max_tokens = cfg.ll_tokens
    x, topk_idx, topk_weights = _random_routing(num_max_tokens, cfg, device)
    num_local_experts = cfg.experts // num_ranks

    def dispatch(return_recv_hook: bool):
        return buffer.low_latency_dispatch(
            x,
            topk_idx,
            num_max_tokens,
            cfg.experts,
            use_fp8=True,
            async_finish=False,
            return_recv_hook=return_recv_hook,
        )

    _, recv_count, _, _, _ = dispatch(False)
    num_recv_rows = int(recv_count.sum().item())
    # Expert outputs going back: bf16 [L, R*M, H], as the experts' GEMM would write them.
    expert_out = torch.randn(
        num_local_experts, num_ranks * num_max_tokens, cfg.hidden, dtype=torch.bfloat16, device=device
    )

    def dispatch_fn(hook: bool) -> Callable[[], Callable | None]:
        def run() -> Callable | None:
            recv_hook = dispatch(hook)[4]
            return recv_hook if hook else None  # without the hook the data has arrived: nothing more to time

        return run

    def combine_fn(hook: bool) -> Callable[[object], Callable | None]:
        def run(handle) -> Callable | None:
            _, _, recv_hook = buffer.low_latency_combine(
                expert_out, topk_idx, topk_weights, handle, async_finish=False, return_recv_hook=hook
            )
            return recv_hook if hook else None

        return run

    def combine_setup():
        return dispatch(False)[2]

    return {
        ("ll_dispatch", "fp8", False): (dispatch_fn(False), None, num_recv_rows),
        ("ll_dispatch+hook", "fp8", True): (dispatch_fn(True), None, num_recv_rows),
        ("ll_combine", "bf16", False): (combine_fn(False), combine_setup, num_recv_rows),
        ("ll_combine+hook", "bf16", True): (combine_fn(True), combine_setup, num_recv_rows),
    }


def bench_worker(rank: int, num_ranks: int, cfg: BenchConfig) -> dict:
    """One rank: build each mode's Buffer, time its paths, return this rank's figures (picklable)."""
    torch.manual_seed(cfg.seed + rank)
    if cfg.device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
        device_name = torch.cuda.get_device_name(device)
    else:
        device = torch.device("cpu")
        device_name = _cpu_name()

    # The roof is measured by rank 0 alone while the others wait: ranks share the GPU.
    copy_roof = timing.measure_copy_roof_gbps(device, cfg.roof_bytes) if rank == 0 else None
    dist.barrier()

    has_kernels, no_kernels_reason = _kernel_status()
    out = {
        "device_name": device_name,
        "has_kernels": has_kernels,
        "no_kernels_reason": no_kernels_reason,
        "backend": None,
        "copy_roof_gbps": copy_roof,
        "results": {},
    }
    for mode in cfg.modes:
        buffer = _make_buffer(cfg, num_ranks, mode)
        out["backend"] = _backend_name(buffer, cfg.backend)
        make_paths = _normal_paths if mode == NORMAL else _low_latency_paths
        paths = make_paths(buffer, cfg, num_ranks, device)
        for key, (fn, setup, num_recv_rows) in paths.items():
            path, dtype, _ = key
            if rank == 0:
                _log(f"ranks={num_ranks} {path} {dtype}: {cfg.warmup} warmup + {cfg.iters} timed iters")
            times = timing.time_iters(fn, setup=setup, warmup=cfg.warmup, iters=cfg.iters, device=device)
            recv_bytes = num_recv_rows * cfg.hidden * BYTES_PER_CHANNEL[dtype]
            result = timing.RankResult(
                median_s=times.median_total_s(),
                recv_bytes=recv_bytes,
                median_send_s=times.median_send_s(),
                iter_s=times.total_s,
            )
            out["results"][key] = (dataclasses.asdict(result), _hbm_bytes_per_payload_byte(buffer, path))
        # No try/finally: a rank that raised must not wait in a barrier its peers never reach; the launcher
        # reports its traceback and stops the others.
        del paths
        dist.barrier()
        buffer.destroy()
    return out


# ---------------------------------------------------------------------------------------------------------------
# Driver side: parses options, launches each rank count, reduces and reports.


def _rows_for(num_ranks: int, cfg: BenchConfig, per_rank: list[dict]) -> list[report.Row]:
    first = per_rank[0]
    copy_roof = first["copy_roof_gbps"]
    ranks_per_gpu = None
    if cfg.device == "cuda":
        num_gpus = max(torch.cuda.device_count(), 1)
        ranks_per_gpu = -(-num_ranks // num_gpus)
    rows = []
    for path, mode, dtype, hook in CASES:
        key = (path, dtype, hook)
        if key not in first["results"]:
            continue
        rank_results = [timing.RankResult(**r["results"][key][0]) for r in per_rank]
        reduced = timing.reduce_ranks(rank_results)
        row = report.Row(
            path=path,
            mode=mode,
            ranks=num_ranks,
            backend=first["backend"],
            dtype=dtype,
            tokens=cfg.tokens if mode == NORMAL else cfg.ll_tokens,
            hidden=cfg.hidden,
            topk=cfg.topk,
            experts=cfg.experts,
            time_us=reduced["time_us"],
            gbps=reduced["gbps"],
            warmup=cfg.warmup,
            iters=cfg.iters,
            send_time_us=reduced["send_time_us"],
            copy_roof_gbps=copy_roof,
            ranks_per_gpu=ranks_per_gpu,
            hbm_bytes_per_payload_byte=first["results"][key][1],
            per_rank_time_us=reduced["per_rank_time_us"],
            per_rank_gbps=reduced["per_rank_gbps"],
            per_rank_recv_bytes=reduced["per_rank_recv_bytes"],
            extra={"per_rank_iter_us": [[t * 1e6 for t in r.iter_s] for r in rank_results]},
        )
        row.fill_roof()
        rows.append(row)
    return rows


def _notes(cfg: BenchConfig, backends: Sequence[str], has_kernels: bool) -> list[str]:
    on_kernels = cfg.device == "cuda" and has_kernels and all(b == "cuda" for b in backends)
    notes = []
    if not on_kernels:
        where = "CPU, gloo" if cfg.device == "cpu" else "CUDA tensors, no kernels"
        notes.append(f"reference backend ({where}): figures measure the reference all-to-all, not kernels")
    if cfg.device != "cuda":
        notes.append("copy roof: - (no GPU)")
    else:
        notes.append(
            "% of roof = ranks sharing the GPU x GB/s x 2 B (one read + one write per payload byte) / copy roof"
        )
    notes.append(
        f"time: slowest rank's median of {cfg.iters} iters ({cfg.warmup} warmup); GB/s: mean over ranks of received"
        " bytes / time (fp8: H*(1+4/128) B a row, bf16: H*2 B)"
    )
    notes.append(f"normal dispatch timed with a {cfg.dispatch_handle} handle; ll_combine after an untimed dispatch")
    return notes


def _parse_ranks(text: str, parser: argparse.ArgumentParser) -> list[int]:
    try:
        ranks = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        parser.error(f"--ranks: expected a comma-separated list of ints, got {text!r}")
    if not ranks or any(r < 1 for r in ranks):
        parser.error(f"--ranks: expected positive ints, got {text!r}")
    return ranks


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes and few iters (README example, < 1 min on CPU)")
    p.add_argument("--ranks", default=None, help="rank counts, comma-separated (default: 2 on CPU, 2,4,8 on CUDA)")
    p.add_argument("--tokens", type=int, default=None, help=f"normal-mode tokens per rank ({STANDARD['tokens']})")
    p.add_argument("--hidden", type=int, default=None, help=f"hidden size ({STANDARD['hidden']})")
    p.add_argument("--topk", type=int, default=None, help=f"experts per token ({STANDARD['topk']})")
    p.add_argument("--experts", type=int, default=None, help=f"experts in all ({STANDARD['experts']})")
    p.add_argument("--ll-tokens", type=int, default=None, help=f"low-latency tokens per rank ({STANDARD['ll_tokens']})")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations per path")
    p.add_argument("--iters", type=int, default=None, help="timed iterations per path")
    p.add_argument("--paths", default=f"{NORMAL},{LOW_LATENCY}", help="modes to run: normal,low_latency")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--backend", choices=("auto", "reference", "cuda"), default=None, help="Buffer(backend=...)")
    p.add_argument("--dist-backend", default="gloo", help="torch.distributed backend of the group (gloo)")
    p.add_argument(
        "--dispatch-handle",
        choices=("cached", "fresh"),
        default="cached",
        help="time normal dispatch with a cached handle (DeepEP's test) or the full call",
    )
    p.add_argument("--roof-bytes", type=int, default=1 << 30, help="bytes of the copy-roof tensor (CUDA only)")
    p.add_argument("--timeout-s", type=float, default=None, help="per rank-count launch timeout (default scales)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="output JSON (default bench/results/<timestamp>.json)")
    return p


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[BenchConfig, list[int]]:
    preset = dict(STANDARD, **QUICK) if args.quick else dict(STANDARD)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False")
    warmup_default, iters_default = DEFAULT_ITERS[device]

    def pick(name: str, fallback=None):
        value = getattr(args, name)
        return value if value is not None else preset.get(name, fallback)

    ranks = _parse_ranks(pick("ranks", "2" if device == "cpu" else "2,4,8"), parser)
    modes = tuple(m.strip() for m in args.paths.split(",") if m.strip())
    bad = [m for m in modes if m not in (NORMAL, LOW_LATENCY)]
    if bad or not modes:
        parser.error(f"--paths: expected a subset of {NORMAL},{LOW_LATENCY}, got {args.paths!r}")
    cfg = BenchConfig(
        tokens=pick("tokens"),
        hidden=pick("hidden"),
        topk=pick("topk"),
        experts=pick("experts"),
        ll_tokens=pick("ll_tokens"),
        warmup=pick("warmup", warmup_default),
        iters=pick("iters", iters_default),
        modes=modes,
        device=device,
        backend=args.backend,
        dispatch_handle=args.dispatch_handle,
        roof_bytes=args.roof_bytes,
        seed=args.seed,
    )
    for name in ("tokens", "hidden", "topk", "experts", "ll_tokens", "iters"):
        if getattr(cfg, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(cfg, name)}")
    if cfg.warmup < 0:
        parser.error(f"--warmup: expected >= 0, got {cfg.warmup}")
    if cfg.hidden % 128 != 0:
        parser.error(f"--hidden: expected a multiple of 128 (one fp8 scale per 128 channels), got {cfg.hidden}")
    if cfg.topk > cfg.experts:
        parser.error(f"--topk: expected <= --experts ({cfg.experts}), got {cfg.topk}")
    for num_ranks in ranks:
        if cfg.experts % num_ranks != 0:
            parser.error(
                f"--experts: expected a multiple of every rank count, got {cfg.experts} with {num_ranks} ranks"
            )
    return cfg, ranks


def _default_timeout_s(cfg: BenchConfig, num_ranks: int) -> float:
    """Seconds one rank count may take: generous, since the CPU reference pushes every byte through gloo."""
    if cfg.device == "cuda":
        per_iter_s = 1.0
    else:
        # bf16 bytes each rank moves per call in either mode, at a pessimistic 50 MB/s on a small CPU box
        num_bytes = (cfg.tokens + cfg.ll_tokens * cfg.topk) * cfg.hidden * 2 * num_ranks
        per_iter_s = max(1.0, num_bytes / 50e6)
    return 120.0 + per_iter_s * (cfg.warmup + cfg.iters + 2) * len(CASES)


def run(argv: Sequence[str] | None = None) -> dict:
    """Parse argv, run every rank count, print the table, write the JSON; return the JSON document's parts."""
    from deep_ep_py.testing import launch

    parser = build_parser()
    args = parser.parse_args(argv)
    cfg, rank_counts = config_from_args(args, parser)
    json_path = args.json or os.path.join(
        REPO_DIR, "bench", "results", datetime.datetime.now().strftime("%Y%m%d-%H%M%S") + ".json"
    )

    rows: list[report.Row] = []
    first_rank: dict = {}
    start = time.perf_counter()
    for num_ranks in rank_counts:
        timeout_s = args.timeout_s or _default_timeout_s(cfg, num_ranks)
        _log(
            f"ranks={num_ranks} device={cfg.device} backend={cfg.backend or 'default'} paths={','.join(cfg.modes)} "
            f"tokens={cfg.tokens} ll_tokens={cfg.ll_tokens} hidden={cfg.hidden} topk={cfg.topk}/{cfg.experts} "
            f"(timeout {timeout_s:.0f} s)"
        )
        launch_start = time.perf_counter()
        per_rank = launch(bench_worker, num_ranks, cfg, timeout_s=timeout_s, backend=args.dist_backend)
        _log(f"ranks={num_ranks} done in {time.perf_counter() - launch_start:.1f} s")
        first_rank = first_rank or per_rank[0]
        rows += _rows_for(num_ranks, cfg, per_rank)

    backends = sorted({row.backend for row in rows})
    has_kernels = bool(first_rank.get("has_kernels"))
    notes = _notes(cfg, backends, has_kernels)
    env = report.environment(
        device_name=first_rank.get("device_name", cfg.device),
        backend=",".join(backends),
        has_kernels=has_kernels,
        repo_dir=REPO_DIR,
        extra={
            "device": cfg.device,
            "no_kernels_reason": first_rank.get("no_kernels_reason", ""),
            "dist_backend": args.dist_backend,
            "wall_s": time.perf_counter() - start,
        },
    )
    settings = dict(dataclasses.asdict(cfg), ranks=rank_counts, argv=list(argv if argv is not None else sys.argv[1:]))
    report.write_json(json_path, rows, env, settings, notes)
    print(report.format_table(rows, notes))
    _log(f"wrote {json_path} ({env['wall_s']:.1f} s)")
    return {"rows": rows, "environment": env, "settings": settings, "notes": notes, "json_path": json_path}


def main(argv: Sequence[str] | None = None) -> int:
    run(argv)
    return 0
