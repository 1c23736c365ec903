"""``python -m bench``: dispatch and combine on N ranks, normal and low-latency mode, one table and one JSON.

Paths (each a row per rank count):
- normal mode, ``--tokens`` per rank: dispatch bf16, dispatch fp8, combine bf16;
- internode mode: the same three calls on the same data (same seed), the ranks emulating ``--nodes`` nodes
  (``num_ranks_per_node`` = ranks / nodes, as DEEP_EP_PY_RANKS_PER_NODE does), so they run the hierarchical path
  ("internode_dispatch", "internode_combine"); rank counts that are not a multiple of ``--nodes`` get none;
- internode_puts mode (by name in ``--paths`` only): the internode rows again with every transfer between nodes an
  NVSHMEM put with signal (DEEP_EP_PY_EMULATE_NETWORK=1), the path a NIC takes, where on one host the internode
  rows store through P2P mappings ("internode_puts_dispatch", "internode_puts_combine");
- low-latency mode, ``--ll-tokens`` per rank: dispatch fp8 and combine bf16, each with and without
  ``return_recv_hook`` (with the hook, the timed region is the call plus ``hook()``; "send us" is the call alone);
- low_latency_puts mode (by name in ``--paths`` only): ll_dispatch and ll_combine again with every rank its own node
  and the network emulated, so every delivery is an NVSHMEM put and signal ("ll_puts_dispatch", "ll_puts_combine");
- with ``--device cuda`` and the low-latency kernels active (DEEP_EP_PY_UNVERIFIED_KERNELS=1): one dispatch (fp8)
  + combine captured in a CUDA graph, timed as ``graph.replay()`` ("ll_dispatch+combine graph"; bytes = dispatch
  bytes + combine bytes). Elsewhere, or when the capture fails, no row and a note saying why.

Each row's producer (the kernels, or the backend's reference fallback) is in the notes; "HBM B/payload B" is a
design figure (bench/settings.py HBM_BYTES_BY_DESIGN) for rows the kernels produced, "-" otherwise.

Routing is random: topk_idx = randn(T, E).topk(K), x random bf16. Normal dispatch is timed with the handle of a
first dispatch (cached mode), as DeepEP's own test times it; ``--dispatch-handle fresh`` times the full call
with the layout and top-k instead. Low-latency combine is timed after an untimed dispatch each iteration.

Bandwidth is DeepEP's count: bytes received per rank over time, a received token (normal) or a received
(token, expert) row (low latency) counting H * 2 bytes in bf16 and H * (1 + 4/128) in fp8; combine counts the
bf16 bytes each rank sends back. Across ranks: the slowest rank's median time, the mean of the ranks' GB/s.
Internode rows split that: "GB/s" stays the received rows, every one of which reaches its rank from a rank of
its own node (the NVLink bytes); "net GB/s" counts the rows that cross nodes, a token once per other node it goes
to (the network bytes; combine: the partial sums coming back, as many); "vs intranode" is the intranode row's
time over the internode row's time on the same data and rank count (>= 1: no slower, the target).

``--device cuda`` puts every rank on the GPU (rank % device_count); several ranks on one GPU need the MPS daemon
running (the GPU check script starts it), since the kernels of all ranks spin-wait on each other. There, rank 0
also measures the device-to-device copy roof in the same run, and each row is shown as a fraction of it
(see bench/report.py).

``--device emulated`` runs the same kernel rows on the CPU emulator of the kernels (deep_ep_py._C_emu; ranks
launched with DEEP_EP_PY_EMULATE_DEVICE=1 and, unless the environment sets it, DEEP_EP_PY_UNVERIFIED_KERNELS=1):
every kernel-only path of the bench (one-copy checks, internode and low-latency rows, vs intranode, the copy roof,
the notes) runs where no GPU is, as CI does. Its figures are CPU wall-clock time of emulated kernels and mean
nothing about the kernels' speed: the table, its notes and the JSON say so. No CUDA graphs there: no graph row.

A launch that fails (a rank raised, a timeout) or is interrupted (SIGINT) keeps the rows of the modes every rank
finished, with a note naming the failure; the JSON is written all the same, and the exit status is 1 (130 when
interrupted, which also ends the run before the next rank count).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import pickle
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence

import torch

from bench import report, timing
from bench.settings import (
    CASES,
    DEEPEP_V1_NUM_SMS,
    DEFAULT_ITERS,
    DEFAULT_MODES,
    DEFAULT_NODES,
    DEFAULT_ROOF_BYTES,
    DEVICES,
    EMULATED,
    EMULATOR_DEVICE_NAME,
    EMULATOR_NOTE,
    GRAPH_PATH,
    INTERNODE_PUTS,
    LOW_LATENCY_MODES,
    LOW_LATENCY_PUTS,
    MODES,
    NODE_MODES,
    NORMAL_PATH_PREFIXES,
    ONE_COPY,
    QUICK,
    REPO_DIR,
    STANDARD,
    BenchConfig,
    hbm_bytes_per_payload_byte,
    log,
)
from bench.worker import bench_worker

# ---------------------------------------------------------------------------------------------------------------
# Driver side: parses options, launches each rank count, reduces and reports.


KERNELS = "kernels"
REFERENCE_FALLBACK = "reference fallback"
# The environment variables a rank of --device emulated gets (deep_ep_py._ext.EMULATE_DEVICE_ENV,
# deep_ep_py.backends.cuda.UNVERIFIED_KERNELS_ENV).
EMULATE_DEVICE_ENV = "DEEP_EP_PY_EMULATE_DEVICE"
UNVERIFIED_KERNELS_ENV = "DEEP_EP_PY_UNVERIFIED_KERNELS"


def _rows_for(num_ranks: int, cfg: BenchConfig, per_rank: list[dict]) -> list[report.Row]:
    first = per_rank[0]
    copy_roof = first["copy_roof_gbps"]
    ranks_per_gpu = None
    if cfg.device == "cuda":
        num_gpus = max(torch.cuda.device_count(), 1)
        ranks_per_gpu = -(-num_ranks // num_gpus)
    elif cfg.device == EMULATED:
        ranks_per_gpu = num_ranks  # the emulator has one device, shared by every rank
    rows = []
    for path, mode, dtype, hook in CASES:
        key = (path, dtype, hook)
        if any(key not in r["results"] for r in per_rank):
            continue
        results = [r["results"][key] for r in per_rank]
        rank_results = [timing.RankResult(**result["rank_result"]) for result in results]
        reduced = timing.reduce_ranks(rank_results)
        kernels_active = all(result["kernels_active"] for result in results)
        num_tokens = sum(result["num_tokens"] for result in results)
        num_rows = sum(result["num_rows"] for result in results)
        rows_per_token = num_rows / num_tokens if num_tokens else None
        internode = _internode_figures(path, dtype, results, rank_results, per_rank, reduced["time_us"])
        hbm = results[0]["hbm_reported"]
        if hbm is None:
            node_rows_per_row = internode["num_node_rows"] / num_rows if internode and num_rows else None
            net_rows_per_row = internode["num_net_rows"] / num_rows if internode and num_rows else None
            hbm = hbm_bytes_per_payload_byte(path, kernels_active, rows_per_token, node_rows_per_row, net_rows_per_row)
        row = report.Row(
            path=path,
            mode=mode,
            ranks=num_ranks,
            backend=first["backend"],
            dtype=dtype,
            tokens=cfg.ll_tokens if mode in LOW_LATENCY_MODES else cfg.tokens,
            hidden=cfg.hidden,
            topk=cfg.topk,
            experts=cfg.experts,
            time_us=reduced["time_us"],
            gbps=reduced["gbps"],
            warmup=cfg.warmup,
            iters=cfg.iters,
            send_time_us=reduced["send_time_us"],
            num_sms=first["num_sms"] if kernels_active and mode not in LOW_LATENCY_MODES else None,
            copy_roof_gbps=copy_roof,
            ranks_per_gpu=ranks_per_gpu,
            hbm_bytes_per_payload_byte=hbm,
            per_rank_time_us=reduced["per_rank_time_us"],
            per_rank_gbps=reduced["per_rank_gbps"],
            per_rank_recv_bytes=reduced["per_rank_recv_bytes"],
            net_gbps=internode["net_gbps"] if internode else None,
            vs_intranode=internode["vs_intranode"] if internode else _vs_intranode(path, dtype, per_rank, reduced),
            extra={
                "produced_by": KERNELS if kernels_active else REFERENCE_FALLBACK,
                "one_copy_path": _one_copy_path(results),
                "rows_per_token": rows_per_token,
                **(_internode_extra(cfg, num_ranks, internode) if internode else {}),
                "hbm_by_design": results[0]["hbm_reported"] is None and hbm is not None,
                "per_rank_iter_us": [[t * 1e6 for t in r.iter_s] for r in rank_results],
                **({"emulated": True, "timings_meaningful": False} if cfg.device == EMULATED else {}),
            },
        )
        row.fill_roof()
        rows.append(row)
    return rows


def _one_copy_path(results: list[dict]) -> bool | None:
    """For a one-copy row the kernels produced: whether the last timed call took the one-copy path on every rank
    (False: the rounds, for want of arena room). None for every other row."""
    taken = [result.get("one_copy_path") for result in results]
    if any(value is None for value in taken):
        return None
    return all(taken)


def _internode_figures(
    path: str,
    dtype: str,
    results: list[dict],
    rank_results: list[timing.RankResult],
    per_rank: list[dict],
    time_us: float,
) -> dict | None:
    """For an internode row: its (token, node) rows, network GB/s (mean over ranks of each rank's bytes that cross
    nodes over its own median time) and speed against the intranode row of the same call on the same data (the
    intranode row's time over this one's; None without that row). None for every other row."""
    if any(result.get("num_node_rows") is None for result in results):
        return None
    vs_intranode = _vs_intranode(path, dtype, per_rank, {"time_us": time_us})
    net_gbps = [result["net_bytes"] / r.median_s / 1e9 for result, r in zip(results, rank_results)]
    return {
        "num_node_rows": sum(result["num_node_rows"] for result in results),
        "num_net_rows": sum(result["num_net_rows"] for result in results),
        "per_rank_net_bytes": [result["net_bytes"] for result in results],
        "net_gbps": sum(net_gbps) / len(net_gbps),
        "vs_intranode": vs_intranode,
    }


def _vs_intranode(path: str, dtype: str, per_rank: list[dict], reduced: dict) -> float | None:
    """The intranode (two-copy) row's time of the same call on the same data over this row's, for the internode and
    one-copy rows; None for the others, and where that row was not run."""
    for prefix in NORMAL_PATH_PREFIXES.values():
        if path.startswith(prefix):
            key = (path.removeprefix(prefix), dtype, False)
            break
    else:
        return None
    if not all(key in r["results"] for r in per_rank):
        return None
    intranode = [timing.RankResult(**r["results"][key]["rank_result"]) for r in per_rank]
    return timing.reduce_ranks(intranode)["time_us"] / reduced["time_us"]


def _internode_extra(cfg: BenchConfig, num_ranks: int, internode: dict) -> dict:
    return {
        "nodes": cfg.nodes,
        "ranks_per_node": num_ranks // cfg.nodes,
        "num_node_rows": internode["num_node_rows"],
        "per_rank_net_bytes": internode["per_rank_net_bytes"],
    }


def _producer_notes(rows: Sequence[report.Row]) -> list[str]:
    """One line per rank count: which rows the kernels produced and which the reference fallback did."""
    notes = []
    for num_ranks in dict.fromkeys(row.ranks for row in rows):
        by_producer: dict[str, list[str]] = {}
        for row in rows:
            if row.ranks == num_ranks:
                label = row.path if row.mode in LOW_LATENCY_MODES else f"{row.path} {row.dtype}"
                by_producer.setdefault(row.extra["produced_by"], []).append(label)
        parts = [f"{who}: {', '.join(paths)}" for who, paths in by_producer.items()]
        notes.append(f"ranks={num_ranks} rows from {'; '.join(parts)}")
    return notes


def _notes(cfg: BenchConfig, rows: Sequence[report.Row], worker_notes: Sequence[str]) -> list[str]:
    notes = [EMULATOR_NOTE] if cfg.device == EMULATED else []
    if not any(row.extra.get("produced_by") == KERNELS for row in rows):
        where = {"cpu": "CPU, gloo", EMULATED: "CPU emulator, no kernels"}.get(cfg.device, "CUDA tensors, no kernels")
        notes.append(f"reference backend ({where}): figures measure the reference all-to-all, not kernels")
    notes += _producer_notes(rows)
    if cfg.device == EMULATED:
        notes.append(
            "copy roof: the host's memcpy rate (the emulator's device memory is host memory); % of roof = ranks"
            " sharing the emulated device x GB/s x 2 B / copy roof, as on a GPU, and as meaningless as the rest"
        )
    elif cfg.device != "cuda":
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
    if any(row.mode in NODE_MODES for row in rows):
        notes.append(
            f"internode_*: the ranks play {cfg.nodes} nodes (ranks / {cfg.nodes} per node) on the normal rows' data;"
            " GB/s = received rows, all delivered inside the node (NVLink bytes); net GB/s = rows crossing nodes, a"
            " token once per other node (network bytes); vs intranode = intranode time / internode time (>= 1:"
            " no slower)"
        )
    if any(row.mode == INTERNODE_PUTS for row in rows):
        notes.append(
            "internode_puts_*: the same, with every transfer between nodes an NVSHMEM put with signal"
            " (DEEP_EP_PY_EMULATE_NETWORK=1), the path a NIC takes; internode_* stores through P2P mappings where"
            " the peer is mapped, as every PE of one host is"
        )
    if any(row.mode == LOW_LATENCY_PUTS for row in rows):
        notes.append(
            "ll_puts_*: ll_dispatch and ll_combine with every rank its own node and the network emulated"
            " (DEEP_EP_PY_RANKS_PER_NODE=1, DEEP_EP_PY_EMULATE_NETWORK=1): every delivery an NVSHMEM put and"
            " signal, the path a NIC takes; ll_* stores through P2P mappings, as every PE of one host is mapped"
        )
    if any(row.mode == ONE_COPY for row in rows):
        notes.append(
            "one_copy_*: the intranode calls on the same data with a receive arena (num_recv_arena_bytes): dispatch"
            " senders write rows straight into the receivers' results, combine sources read them straight from"
            " recv_x; vs intranode = rounds time / one-copy time"
        )
        by_path: dict[str, list[str]] = {}
        for row in rows:
            if row.extra.get("one_copy_path") is not None:
                taken = "one-copy path" if row.extra["one_copy_path"] else "rounds (no arena room)"
                by_path.setdefault(taken, []).append(f"{row.path} {row.dtype} (ranks={row.ranks})")
        if by_path:
            parts = "; ".join(f"{taken}: {', '.join(labels)}" for taken, labels in by_path.items())
            notes.append(f"one_copy_* rows, path of the last timed call on every rank: {parts}")
    if any(row.path == GRAPH_PATH for row in rows):
        notes.append(
            f"{GRAPH_PATH}: one ll_dispatch (fp8) + ll_combine (bf16) replayed from a CUDA graph, inputs copied in"
            " untimed before each replay; bytes = dispatch bytes + combine bytes"
        )
    notes.append(
        "HBM B/payload B: design figures from the kernels' code (bench/settings.py HBM_BYTES_BY_DESIGN), not"
        " measurements; - for the reference fallback"
    )
    notes += worker_notes
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
    p.add_argument(
        "--paths",
        default=",".join(DEFAULT_MODES),
        help=f"modes to run, a subset of {','.join(MODES)} (default: {','.join(DEFAULT_MODES)})",
    )
    p.add_argument(
        "--nodes",
        type=int,
        default=DEFAULT_NODES,
        help=f"nodes the internode rows emulate, ranks / nodes ranks each ({DEFAULT_NODES})",
    )
    p.add_argument(
        "--device",
        choices=DEVICES,
        default=None,
        help="cpu (reference backend), cuda (kernels) or emulated (kernels on their CPU emulator, timings not"
        " meaningful); default: emulated under DEEP_EP_PY_EMULATE_DEVICE=1, else cuda when available, else cpu",
    )
    p.add_argument(
        "--num-sms",
        type=int,
        default=None,
        help="SMs per rank of the normal-mode kernels (Buffer.set_num_sms); default: DeepEP V1's in the targets"
        f" ({', '.join(f'{n} at {r} ranks' for r, n in DEEPEP_V1_NUM_SMS.items())}), Buffer's default elsewhere",
    )
    p.add_argument("--backend", choices=("auto", "reference", "cuda"), default=None, help="Buffer(backend=...)")
    p.add_argument("--dist-backend", default="gloo", help="torch.distributed backend of the group (gloo)")
    p.add_argument(
        "--dispatch-handle",
        choices=("cached", "fresh"),
        default="cached",
        help="time normal dispatch with a cached handle (DeepEP's test) or the full call",
    )
    p.add_argument(
        "--roof-bytes",
        type=int,
        default=None,
        help=f"bytes of the copy-roof tensor, kernels' device only ({DEFAULT_ROOF_BYTES['cuda']} on CUDA,"
        f" {DEFAULT_ROOF_BYTES[EMULATED]} on the emulator)",
    )
    p.add_argument("--timeout-s", type=float, default=None, help="per rank-count launch timeout (default scales)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="output JSON (default bench/results/<timestamp>.json)")
    return p


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[BenchConfig, list[int]]:
    preset = dict(STANDARD, **QUICK) if args.quick else dict(STANDARD)
    from deep_ep_py import _ext

    device = args.device or (EMULATED if _ext.emulated() else "cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False")
    if device == EMULATED and not _ext.emulator_available():
        parser.error(f"--device emulated: the CPU emulator is not built ({_ext.emulator_unavailable_reason()})")
    warmup_default, iters_default = DEFAULT_ITERS[device]

    def pick(name: str, fallback=None):
        value = getattr(args, name)
        return value if value is not None else preset.get(name, fallback)

    ranks = _parse_ranks(pick("ranks", "2,4,8" if device == "cuda" else "2"), parser)
    modes = tuple(m.strip() for m in args.paths.split(",") if m.strip())
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        parser.error(f"--paths: expected a subset of {','.join(MODES)}, got {args.paths!r}")
    if args.nodes < 2:
        parser.error(f"--nodes: expected >= 2 (one node is the normal rows), got {args.nodes}")
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
        roof_bytes=args.roof_bytes if args.roof_bytes is not None else DEFAULT_ROOF_BYTES[device],
        seed=args.seed,
        nodes=args.nodes,
        num_sms=args.num_sms,
    )
    for name in ("tokens", "hidden", "topk", "experts", "ll_tokens", "iters", "roof_bytes"):
        if getattr(cfg, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(cfg, name)}")
    if cfg.num_sms is not None and (cfg.num_sms < 2 or cfg.num_sms % 2):
        parser.error(f"--num-sms: expected an even number >= 2 (a send and a receive SM a channel), got {cfg.num_sms}")
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
    """Seconds one rank count may take: generous, since the CPU reference pushes every byte through gloo (and the
    CPU emulator runs every CUDA thread of the kernels as a fiber on the host)."""
    if cfg.device == "cuda":
        per_iter_s = 1.0
    elif cfg.device == EMULATED:
        # bf16 bytes each rank moves per call in either mode, at a pessimistic 5 MB/s through the emulator
        num_bytes = (cfg.tokens + cfg.ll_tokens * cfg.topk) * cfg.hidden * 2 * num_ranks
        per_iter_s = max(1.0, num_bytes / 5e6)
    else:
        # bf16 bytes each rank moves per call in either mode, at a pessimistic 50 MB/s on a small CPU box
        num_bytes = (cfg.tokens + cfg.ll_tokens * cfg.topk) * cfg.hidden * 2 * num_ranks
        per_iter_s = max(1.0, num_bytes / 50e6)
    return 120.0 + per_iter_s * (cfg.warmup + cfg.iters + 2) * len(CASES)


def _launch_env(cfg: BenchConfig) -> dict[str, str] | None:
    """The environment the ranks get besides this process's: under --device emulated the emulator, and the kernels
    unless the environment says otherwise (DEEP_EP_PY_UNVERIFIED_KERNELS set, to anything); elsewhere nothing, but
    the emulator switched off where this process's environment switched it on."""
    if cfg.device == EMULATED:
        env = {EMULATE_DEVICE_ENV: "1"}
        if UNVERIFIED_KERNELS_ENV not in os.environ:
            env[UNVERIFIED_KERNELS_ENV] = "1"
        return env
    if os.environ.get(EMULATE_DEVICE_ENV, "") not in ("", "0"):
        return {EMULATE_DEVICE_ENV: "0"}
    return None


def _partial_results(partial_dir: str, num_ranks: int) -> list[dict] | None:
    """Every rank's figures of the modes it finished (bench_worker's partial_dir), or None where a rank saved none."""
    per_rank = []
    for rank in range(num_ranks):
        try:
            with open(os.path.join(partial_dir, f"rank{rank}.pkl"), "rb") as f:
                per_rank.append(pickle.load(f))
        except FileNotFoundError:
            return None
    return per_rank


def run(argv: Sequence[str] | None = None) -> dict:
    """Parse argv, run every rank count, print the table, write the JSON; return the JSON document's parts, and
    under "failures" the launches that failed. A failed launch keeps the rows of the modes every rank finished
    (its note says so) and the next rank count runs; an interrupted one (KeyboardInterrupt: SIGINT, as a step limit
    of scripts/gpu_check.sh sends it) keeps them too and ends the run, with its JSON written."""
    from deep_ep_py.testing import launch
    from deep_ep_py.testing.launcher import RankFailedError

    parser = build_parser()
    args = parser.parse_args(argv)
    cfg, rank_counts = config_from_args(args, parser)
    json_path = args.json or os.path.join(
        REPO_DIR, "bench", "results", datetime.datetime.now().strftime("%Y%m%d-%H%M%S") + ".json"
    )

    rows: list[report.Row] = []
    first_rank: dict = {}
    worker_notes: dict[str, list[int]] = {}  # note -> the rank counts that gave it
    failures: list[str] = []
    interrupted = False
    start = time.perf_counter()
    for num_ranks in rank_counts:
        timeout_s = args.timeout_s or _default_timeout_s(cfg, num_ranks)
        log(
            f"ranks={num_ranks} device={cfg.device} backend={cfg.backend or 'default'} paths={','.join(cfg.modes)} "
            f"nodes={cfg.nodes} "
            f"tokens={cfg.tokens} ll_tokens={cfg.ll_tokens} hidden={cfg.hidden} topk={cfg.topk}/{cfg.experts} "
            f"(timeout {timeout_s:.0f} s)"
        )
        launch_start = time.perf_counter()
        partial_dir = tempfile.mkdtemp(prefix="bench_partial_")
        try:
            per_rank = launch(
                bench_worker,
                num_ranks,
                cfg,
                partial_dir,
                timeout_s=timeout_s,
                backend=args.dist_backend,
                env=_launch_env(cfg),
                device=cfg.device,
            )
        except (RankFailedError, TimeoutError, KeyboardInterrupt) as exc:
            interrupted = isinstance(exc, KeyboardInterrupt)
            # The first line names the rank, the last the exception (a RankFailedError carries the traceback).
            lines = str(exc).strip().splitlines() or [""]
            reason = (lines[0] + (f" ... {lines[-1].strip()}" if len(lines) > 1 else ""))[:300]
            if interrupted:
                failure = f"ranks={num_ranks}: the launch was interrupted (SIGINT)"
            else:
                failure = f"ranks={num_ranks}: the launch failed ({type(exc).__name__}: {reason})"
            per_rank = _partial_results(partial_dir, num_ranks)
            kept = "only the rows of the modes every rank finished" if per_rank else "no mode finished on every rank"
            failures.append(f"{failure}; {kept}")
            log(failures[-1])
        finally:
            shutil.rmtree(partial_dir, ignore_errors=True)
        if per_rank is None:
            if interrupted:
                break
            continue
        log(f"ranks={num_ranks} done in {time.perf_counter() - launch_start:.1f} s")
        first_rank = first_rank or per_rank[0]
        rows += _rows_for(num_ranks, cfg, per_rank)
        for note in dict.fromkeys(note for r in per_rank for note in r.get("notes", [])):
            worker_notes.setdefault(note, []).append(num_ranks)
        if interrupted:
            break

    backends = sorted({row.backend for row in rows})
    has_kernels = bool(first_rank.get("has_kernels"))
    notes = _notes(
        cfg, rows, [f"{note} [ranks {','.join(map(str, counts))}]" for note, counts in worker_notes.items()] + failures
    )
    emulated = cfg.device == EMULATED
    env = report.environment(
        device_name=first_rank.get("device_name", EMULATOR_DEVICE_NAME if emulated else cfg.device),
        backend=",".join(backends),
        has_kernels=has_kernels,
        repo_dir=REPO_DIR,
        extra={
            "device": cfg.device,
            "emulated": emulated,
            "timings_meaningful": not emulated,
            **({"timings_note": EMULATOR_NOTE} if emulated else {}),
            "no_kernels_reason": first_rank.get("no_kernels_reason", ""),
            "dist_backend": args.dist_backend,
            "wall_s": time.perf_counter() - start,
        },
    )
    settings = dict(dataclasses.asdict(cfg), ranks=rank_counts, argv=list(argv if argv is not None else sys.argv[1:]))
    report.write_json(json_path, rows, env, settings, notes)
    if emulated:
        print(f"# {EMULATOR_NOTE}")  # above the table too: no figure of it may be read as a kernel's speed
    print(report.format_table(rows, notes))
    log(f"wrote {json_path} ({env['wall_s']:.1f} s)")
    return {
        "rows": rows,
        "environment": env,
        "settings": settings,
        "notes": notes,
        "json_path": json_path,
        "failures": failures,
        "interrupted": interrupted,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """0, or 1 where a launch failed (its rows may be missing), 130 where it was interrupted."""
    result = run(argv)
    if result["interrupted"]:
        return 130
    return 1 if result["failures"] else 0
