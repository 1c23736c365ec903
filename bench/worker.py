"""The per-rank side of the benchmark: builds the Buffer, times each path, returns the figures."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
import platform
import sys
import traceback
from collections.abc import Iterator
from typing import Callable

import torch
import torch.distributed as dist

from bench import timing
from bench.settings import (
    BYTES_PER_CHANNEL,
    EMULATED,
    EMULATOR_DEVICE_NAME,
    GRAPH_DTYPE,
    GRAPH_PATH,
    INTERNODE,
    INTERNODE_PUTS,
    LOW_LATENCY,
    LOW_LATENCY_MODES,
    LOW_LATENCY_PUTS,
    NODE_MODES,
    NORMAL,
    NORMAL_PATH_PREFIXES,
    ONE_COPY,
    BenchConfig,
    log,
    num_sms_for,
)

# The environment variable that makes one machine play several nodes (deep_ep_py.config.RANKS_PER_NODE_ENV).
RANKS_PER_NODE_ENV = "DEEP_EP_PY_RANKS_PER_NODE"
# The one that makes the internode kernels reach other nodes through NVSHMEM puts only (csrc/internode/notify.cu).
EMULATE_NETWORK_ENV = "DEEP_EP_PY_EMULATE_NETWORK"
# The Buffer backend's kernel module that runs each mode (None on it: the mode takes the reference fallback).
KERNEL_MODULES = {
    NORMAL: "intranode",
    ONE_COPY: "intranode",
    INTERNODE: "internode",
    INTERNODE_PUTS: "internode",
    LOW_LATENCY: "low_latency",
    LOW_LATENCY_PUTS: "low_latency",
}

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


def _kernels_active(buffer: object, mode: str, device: torch.device) -> bool:
    """Whether the Buffer's backend runs this mode's kernels (else its calls take the reference fallback): backend
    "cuda" with its kernel module for the mode loaded (KERNEL_MODULES: ``_backend.intranode`` for normal mode,
    ``_backend.internode`` for the emulated nodes, ``_backend.low_latency`` for low latency; None unless
    DEEP_EP_PY_UNVERIFIED_KERNELS=1), and tensors on the kernels' device (CUDA tensors; CPU tensors under the CPU
    emulator of the kernels)."""
    if not timing.on_kernel_device(device) or getattr(buffer, "backend", None) != "cuda":
        return False
    return getattr(getattr(buffer, "_backend", None), KERNEL_MODULES[mode], None) is not None


def internode_skip_reason(cfg: BenchConfig, num_ranks: int) -> str | None:
    """Why this rank count gets no internode rows (None: it gets them)."""
    if num_ranks % cfg.nodes != 0:
        return f"{num_ranks} ranks do not split into {cfg.nodes} nodes (--nodes)"
    return None


@contextlib.contextmanager
def _mode_env(mode: str, cfg: BenchConfig, num_ranks: int) -> Iterator[None]:
    """The variables a mode runs under, set for it only (a rank runs its modes one after the other): for the modes
    that play nodes, DEEP_EP_PY_RANKS_PER_NODE (the Buffer's size hints and its config checks then assume the
    emulated nodes, as the Buffer's topology does), and for the puts rows DEEP_EP_PY_EMULATE_NETWORK (the low-latency
    ones with every rank its own node)."""
    updates = {}
    if mode in NODE_MODES:
        updates[RANKS_PER_NODE_ENV] = str(num_ranks // cfg.nodes)
    if mode == LOW_LATENCY_PUTS:
        updates[RANKS_PER_NODE_ENV] = "1"
    if mode in (INTERNODE_PUTS, LOW_LATENCY_PUTS):
        updates[EMULATE_NETWORK_ENV] = "1"
    previous = {key: os.environ.get(key) for key in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                del os.environ[key]
            else:
                os.environ[key] = value


def _all_ranks_agree(ok: bool) -> bool:
    """True when ``ok`` on every rank (a collective: every rank must call it)."""
    on_gpu = dist.get_backend() == "nccl"
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device="cuda" if on_gpu else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _buffer_bytes(cfg: BenchConfig, num_ranks: int, mode: str) -> tuple[int, int]:
    """(num_nvl_bytes, num_rdma_bytes) of the mode's Buffer, from the size hints (run under _mode_env(mode))."""
    import deep_ep_py

    if mode in LOW_LATENCY_MODES:
        return 0, deep_ep_py.Buffer.get_low_latency_rdma_size_hint(cfg.ll_tokens, cfg.hidden, num_ranks, cfg.experts)
    hidden_bytes = cfg.hidden * 2
    configs = (deep_ep_py.Buffer.get_dispatch_config(num_ranks), deep_ep_py.Buffer.get_combine_config(num_ranks))
    num_nvl_bytes = max(config.get_nvl_buffer_size_hint(hidden_bytes, num_ranks) for config in configs)
    if mode not in NODE_MODES:
        return num_nvl_bytes, 0
    # The NVSHMEM bytes DeepEP's size hints ask for on the emulated nodes (_mode_env sets the ranks per node).
    return num_nvl_bytes, max(config.get_rdma_buffer_size_hint(hidden_bytes, num_ranks) for config in configs)


def _size_nvshmem_heap(cfg: BenchConfig, num_ranks: int) -> None:
    """Every Buffer of the process shares the heap NVSHMEM starts with the first one, and where that heap cannot
    grow (no CUDA VMM, and the emulator) it is the first one's size: start it at the largest of the modes' Buffers
    (one at a time), unless the environment sets it (the low-latency Buffer at the standard sizes needs more than an
    internode one). Where the heap grows this only maps up front what the largest mode maps anyway."""
    from deep_ep_py.runtime import nvshmem_env_updates

    largest = 0
    for mode in cfg.modes:
        with _mode_env(mode, cfg, num_ranks):
            largest = max(largest, _buffer_bytes(cfg, num_ranks, mode)[1])
    heap_size = nvshmem_env_updates(os.environ, num_symmetric_bytes=largest).get("NVSHMEM_SYMMETRIC_SIZE")
    if heap_size is not None:
        os.environ["NVSHMEM_SYMMETRIC_SIZE"] = heap_size


def _make_buffer(cfg: BenchConfig, num_ranks: int, mode: str):
    import deep_ep_py

    kwargs = {"backend": cfg.backend} if cfg.backend else {}
    group = dist.group.WORLD
    num_nvl_bytes, num_rdma_bytes = _buffer_bytes(cfg, num_ranks, mode)
    if mode in LOW_LATENCY_MODES:
        return deep_ep_py.Buffer(
            group,
            0,
            num_rdma_bytes,
            low_latency_mode=True,
            num_qps_per_rank=cfg.experts // num_ranks,
            explicitly_destroy=True,
            **kwargs,
        )
    if mode == NORMAL:
        return deep_ep_py.Buffer(group, num_nvl_bytes, 0, explicitly_destroy=True, **kwargs)
    if mode == ONE_COPY:
        return deep_ep_py.Buffer(
            group,
            num_nvl_bytes,
            0,
            explicitly_destroy=True,
            num_recv_arena_bytes=_one_copy_arena_bytes(cfg, num_ranks),
            **kwargs,
        )
    return deep_ep_py.Buffer(
        group,
        num_nvl_bytes,
        num_rdma_bytes,
        explicitly_destroy=True,
        num_ranks_per_node=num_ranks // cfg.nodes,
        **kwargs,
    )


def _one_copy_arena_bytes(cfg: BenchConfig, num_ranks: int) -> int:
    """Room for two dispatch results of the most rows a rank can receive: the one that _normal_paths keeps for its
    handle and the timed call's, which goes back to the arena before the next call takes it (the results of a timed
    call die when it returns)."""
    import deep_ep_py

    return deep_ep_py.Buffer.get_recv_arena_size_hint(cfg.tokens, cfg.hidden, num_ranks, cfg.topk, num_results=2)


def _check_one_copy(buffer, paths: dict, out: dict) -> None:
    """A note when the one-copy rows may time the rounds instead: the first dispatch, or an untimed combine of its
    recv_x, found a rank without room in its receive arena."""
    intranode = buffer._backend.intranode
    for call, run in (("dispatch", None), ("combine", paths[("one_copy_combine", "bf16", False)][0])):
        if run is not None:
            run()
        if not intranode.debug_one_copy_note():
            out["notes"].append(
                f"one_copy rows: the first {call} did not go by the one-copy path (a rank's receive arena had no "
                "room), so these rows may time the rounds"
            )
            return


def _random_routing(num_tokens: int, cfg: BenchConfig, device: torch.device):
    """x bf16 [T, H], topk_idx int64 [T, K] from random scores, topk_weights float32 [T, K] (positive)."""
    x = torch.randn(num_tokens, cfg.hidden, dtype=torch.bfloat16, device=device)
    scores = torch.randn(num_tokens, cfg.experts, dtype=torch.float32, device=device)
    topk_idx = scores.topk(cfg.topk, dim=-1).indices.to(torch.int64)
    topk_weights = torch.randn(num_tokens, cfg.topk, dtype=torch.float32, device=device).abs()
    return x, topk_idx, topk_weights


@dataclasses.dataclass
class NodeTraffic:
    """One rank's normal-mode tokens counted per destination node (internode rows only)."""

    num_node_rows: int  # (token, destination node) pairs, the source's own node included
    num_net_rows: int  # the same, other nodes only: rows that cross the network


def _node_traffic(is_token_in_rank: torch.Tensor, num_nodes: int, rank: int) -> NodeTraffic:
    """is_token_in_rank bool [T, R] -> this rank's tokens per destination node (nodes are contiguous rank blocks)."""
    num_tokens, num_ranks = is_token_in_rank.shape
    in_node = is_token_in_rank.view(num_tokens, num_nodes, num_ranks // num_nodes).any(dim=-1)
    own_node = rank // (num_ranks // num_nodes)
    num_node_rows = int(in_node.sum().item())
    return NodeTraffic(num_node_rows, num_node_rows - int(in_node[:, own_node].sum().item()))


def _normal_paths(
    buffer, cfg: BenchConfig, num_ranks: int, device: torch.device, mode: str
) -> tuple[dict, NodeTraffic | None]:
    """(path, dtype, hook) -> (fn, setup or None, payload rows this rank receives) for normal mode (paths
    "dispatch" / "combine") or the internode mode (the same calls, paths "internode_dispatch" /
    "internode_combine"); with the internode mode also this rank's tokens per destination node."""
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
    traffic = _node_traffic(is_token_in_rank, cfg.nodes, dist.get_rank()) if mode in NODE_MODES else None

    def dispatch_fn(payload) -> Callable[[], None]:
        def run() -> None:
            if cfg.dispatch_handle == "cached":
                buffer.dispatch(payload, handle=handle, config=dispatch_config)
            else:
                buffer.dispatch(payload, config=dispatch_config, **layout)

        return run

    def combine() -> None:
        buffer.combine(recv_x, handle, config=combine_config)

    prefix = NORMAL_PATH_PREFIXES.get(mode, "")
    paths = {
        (f"{prefix}dispatch", "bf16", False): (dispatch_fn(x), None, num_recv_tokens),
        (f"{prefix}dispatch", "fp8", False): (dispatch_fn(x_fp8), None, num_recv_tokens),
        (f"{prefix}combine", "bf16", False): (combine, None, num_recv_tokens),
    }
    return paths, traffic


@dataclasses.dataclass
class LowLatencyInputs:
    """One rank's low-latency inputs: routing of ll_tokens tokens and the expert outputs going back."""

    x: torch.Tensor  # bf16 [T, H]
    topk_idx: torch.Tensor  # int64 [T, K]
    topk_weights: torch.Tensor  # float32 [T, K]
    expert_out: torch.Tensor | None = None  # bf16 [L, R*M, H], set by _low_latency_paths
    num_recv_rows: int = 0  # (token, expert) rows this rank receives, set by _low_latency_paths


def _low_latency_paths(buffer, cfg: BenchConfig, num_ranks: int, device: torch.device, inputs: LowLatencyInputs):
    """(path, dtype, hook) -> (fn, setup or None, payload rows this rank receives) for low-latency mode."""
    num_max_tokens = cfg.ll_tokens
    x, topk_idx, topk_weights = inputs.x, inputs.topk_idx, inputs.topk_weights
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
    inputs.expert_out = expert_out
    inputs.num_recv_rows = num_recv_rows

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


def _short_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= 300 else line[:297] + "..."


def _graph_round_trip(
    buffer, cfg: BenchConfig, device: torch.device, inputs: LowLatencyInputs, rank: int
) -> tuple[timing.IterTimes | None, str | None]:
    """Capture one low_latency_dispatch (fp8, no hook) + low_latency_combine in a CUDA graph; time its replays.

    Collective (every rank calls it, the kernels active on all alike). The graph runs on static copies of the
    inputs, refreshed with copy_ before each replay in time_iters' untimed setup. Returns (times, None); or
    (None, "graph replay: <error>") on the rank where the warm-up, the capture or the replays' device check failed
    and (None, None) on the others: the error goes to stderr, not up, so the other rows stand. A replay that raises
    (a CUDA error) does go up, since its peers wait in time_iters' barriers: the launcher then stops them, and the
    rows saved before this one (_run_mode's checkpoint) are reported.
    """
    static_x = inputs.x.clone()
    static_topk_idx = inputs.topk_idx.clone()
    static_topk_weights = inputs.topk_weights.clone()
    static_expert_out = inputs.expert_out  # read by the combine only, never written
    static_out = torch.empty_like(static_x)

    def step() -> None:
        handle = buffer.low_latency_dispatch(
            static_x,
            static_topk_idx,
            cfg.ll_tokens,
            cfg.experts,
            use_fp8=True,
            async_finish=False,
            return_recv_hook=False,
        )[2]
        buffer.low_latency_combine(
            static_expert_out,
            static_topk_idx,
            static_topk_weights,
            handle,
            async_finish=False,
            return_recv_hook=False,
            out=static_out,
        )

    def failed(stage: str, exc: BaseException) -> str:
        print(f"[bench] rank {rank}: graph replay {stage} failed:", file=sys.stderr, flush=True)
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
        return f"graph replay: {_short_error(exc)} ({stage}, rank {rank})"

    graph = None
    note = None
    try:
        # Warm-up on a side stream, as torch requires before a capture (the kernels run: every rank does it).
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.synchronize(device)
        # A capture begins on low-latency buffer half 0; the timed paths left an odd number of calls behind.
        buffer.clean_low_latency_buffer(cfg.ll_tokens, cfg.hidden, cfg.experts)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # records only: nothing runs, no peer is waited for
            step()
        torch.cuda.synchronize(device)
    except Exception as exc:
        note = failed("capture", exc)
    if not _all_ranks_agree(note is None):
        graph = None  # a graph some rank could not capture is never replayed: every rank drops its own
        return None, note

    def refresh():
        static_x.copy_(inputs.x)
        static_topk_idx.copy_(inputs.topk_idx)
        static_topk_weights.copy_(inputs.topk_weights)
        return graph

    if rank == 0:
        log(f"{GRAPH_PATH} {GRAPH_DTYPE}: {cfg.warmup} warmup + {cfg.iters} timed replays")
    # Replays: time_iters syncs and barriers between them; a failure here is a CUDA error or a device wait that
    # timed out (its record is checked below, since a replay goes through no Python check).
    times = timing.time_iters(lambda g: g.replay(), setup=refresh, warmup=cfg.warmup, iters=cfg.iters, device=device)
    try:
        torch.cuda.synchronize(device)
        buffer._backend.low_latency.check_device_errors("ll_dispatch+combine graph replays")
    except Exception as exc:
        note = failed("replays", exc)
    graph = None  # freed before the Buffer is destroyed (it holds pointers into the Buffer's memory)
    if not _all_ranks_agree(note is None):
        return None, note
    return times, None


# For tests of a launch that fails part way: every rank raises when it comes to the mode of this name.
FAIL_MODE_ENV = "DEEP_EP_PY_BENCH_FAIL_MODE"


def _save_partial(partial_dir: str, rank: int, out: dict) -> None:
    """This rank's figures of every mode it finished, in partial_dir/rank{rank}.pkl (replaced whole, never half
    written): what the driver still reports when a later mode fails or the launch is cut short."""
    path = os.path.join(partial_dir, f"rank{rank}.pkl")
    with open(path + ".tmp", "wb") as f:
        pickle.dump(out, f)
    os.replace(path + ".tmp", path)


def bench_worker(rank: int, num_ranks: int, cfg: BenchConfig, partial_dir: str | None = None) -> dict:
    """One rank: build each mode's Buffer, time its paths, return this rank's figures (picklable). With
    partial_dir, also save them there after each mode (_save_partial)."""
    torch.manual_seed(cfg.seed + rank)
    if cfg.device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
        device_name = torch.cuda.get_device_name(device)
    elif cfg.device == EMULATED:
        from deep_ep_py import device as kernel_dev

        if not kernel_dev.emulated():
            raise RuntimeError("--device emulated: this rank was not launched with DEEP_EP_PY_EMULATE_DEVICE=1")
        device = kernel_dev.kernel_device()  # the CPU: the emulator's tensors are CPU tensors
        device_name = f"{EMULATOR_DEVICE_NAME}, {_cpu_name()}"
    else:
        device = torch.device("cpu")
        device_name = _cpu_name()

    from deep_ep_py import Buffer

    # Every Buffer of this process (Buffer.num_sms is class-wide) and so every normal-mode Config below.
    num_sms = num_sms_for(num_ranks, cfg.num_sms, Buffer.num_sms)
    Buffer.set_num_sms(num_sms)

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
        "num_sms": num_sms,
        "results": {},
        "notes": [],  # lines for the table's notes (graph replay skipped or failed)
    }
    _size_nvshmem_heap(cfg, num_ranks)
    for mode in cfg.modes:
        if mode in NODE_MODES:
            skip_reason = internode_skip_reason(cfg, num_ranks)
            if skip_reason is not None:
                out["notes"].append(f"{mode} rows: skipped ({skip_reason})")
                continue
        if os.environ.get(FAIL_MODE_ENV) == mode:
            raise RuntimeError(f"rank {rank}: {FAIL_MODE_ENV}={mode}")
        checkpoint = (lambda: _save_partial(partial_dir, rank, out)) if partial_dir is not None else None
        with _mode_env(mode, cfg, num_ranks):
            _run_mode(mode, cfg, rank, num_ranks, device, out, checkpoint)
        if partial_dir is not None:
            _save_partial(partial_dir, rank, out)
            # Every rank has saved this mode before any starts the next: a rank failing there ends the launch, and
            # a peer still saving would lose its figures of this mode, and with them the rows.
            dist.barrier()
    # Every mode's Buffer joined the NVSHMEM the first one started; it ends here, in step on every rank, rather
    # than at the process's exit.
    from deep_ep_py.runtime import finalize_nvshmem

    finalize_nvshmem()
    return out


def _run_mode(
    mode: str,
    cfg: BenchConfig,
    rank: int,
    num_ranks: int,
    device: torch.device,
    out: dict,
    checkpoint: Callable[[], None] | None = None,
) -> None:
    """Build the mode's Buffer, time its paths into out["results"], destroy the Buffer (collective). checkpoint:
    saves out, called on every rank before the CUDA-graph row, the step most likely to fail outright."""
    # The same seed for every mode: the normal and the internode rows time the same tokens and routing.
    torch.manual_seed(cfg.seed + rank)
    buffer = _make_buffer(cfg, num_ranks, mode)
    out["backend"] = _backend_name(buffer, cfg.backend)
    kernels_active = _kernels_active(buffer, mode, device)
    num_tokens = cfg.ll_tokens if mode in LOW_LATENCY_MODES else cfg.tokens
    ll_inputs = None
    traffic = None
    if mode in LOW_LATENCY_MODES:
        ll_inputs = LowLatencyInputs(*_random_routing(cfg.ll_tokens, cfg, device))
        paths = _low_latency_paths(buffer, cfg, num_ranks, device, ll_inputs)
        if mode == LOW_LATENCY_PUTS:
            # The plain calls only, and no graph: the hook and the replays run the same kernels.
            paths = {
                ("ll_puts_dispatch", "fp8", False): paths[("ll_dispatch", "fp8", False)],
                ("ll_puts_combine", "bf16", False): paths[("ll_combine", "bf16", False)],
            }
    else:
        paths, traffic = _normal_paths(buffer, cfg, num_ranks, device, mode)
        if mode == ONE_COPY and kernels_active:
            _check_one_copy(buffer, paths, out)
    for key, (fn, setup, num_recv_rows) in paths.items():
        path, dtype, _ = key
        if rank == 0:
            log(f"ranks={num_ranks} {path} {dtype}: {cfg.warmup} warmup + {cfg.iters} timed iters")
        times = timing.time_iters(fn, setup=setup, warmup=cfg.warmup, iters=cfg.iters, device=device)
        out["results"][key] = _path_result(
            buffer, path, dtype, times, num_recv_rows, num_tokens, kernels_active, cfg, traffic
        )
        if mode == ONE_COPY and kernels_active:
            # Which path the last timed call took (the one-copy path, or the rounds for want of arena room).
            out["results"][key]["one_copy_path"] = buffer._backend.intranode.debug_one_copy_note()
    del paths
    if ll_inputs is not None and mode == LOW_LATENCY:
        if device.type != "cuda":
            why = "the CPU emulator has no CUDA graphs; " if cfg.device == EMULATED else ""
            out["notes"].append(f"graph replay: skipped ({why}{GRAPH_PATH} needs --device cuda)")
        elif not kernels_active:
            out["notes"].append(
                f"graph replay: skipped (the low-latency kernels are not active on the {out['backend']} backend;"
                " they need Buffer backend cuda and DEEP_EP_PY_UNVERIFIED_KERNELS=1)"
            )
        else:
            if checkpoint is not None:
                checkpoint()
                dist.barrier()  # every rank has saved before any can fail in the graph (bench_worker says why)
            times, note = _graph_round_trip(buffer, cfg, device, ll_inputs, rank)
            if note:
                out["notes"].append(note)
            if times is not None:
                out["results"][(GRAPH_PATH, GRAPH_DTYPE, False)] = _path_result(
                    buffer, GRAPH_PATH, GRAPH_DTYPE, times, ll_inputs.num_recv_rows, num_tokens, True, cfg
                )
        del ll_inputs
    # No try/finally: a rank that raised must not wait in a barrier its peers never reach; the launcher
    # reports its traceback and stops the others.
    dist.barrier()
    buffer.destroy()


def _path_result(
    buffer,
    path: str,
    dtype: str,
    times: timing.IterTimes,
    num_recv_rows: int,
    num_tokens: int,
    kernels_active: bool,
    cfg: BenchConfig,
    traffic: NodeTraffic | None = None,
) -> dict:
    """What the driver needs of one path on this rank (picklable). Internode paths also carry the (token, node)
    rows (for the design HBM figure) and the bytes that cross nodes (combine: the partial sums coming back, one
    per token and other node, as many as the dispatch sent)."""
    result = timing.RankResult(
        median_s=times.median_total_s(),
        recv_bytes=num_recv_rows * cfg.hidden * BYTES_PER_CHANNEL[dtype],
        median_send_s=times.median_send_s(),
        iter_s=times.total_s,
    )
    return {
        "rank_result": dataclasses.asdict(result),
        "hbm_reported": _hbm_bytes_per_payload_byte(buffer, path),  # the backend's own figure, if it has one
        "kernels_active": kernels_active,
        "num_rows": num_recv_rows,
        "num_tokens": num_tokens,
        "num_node_rows": traffic.num_node_rows if traffic is not None else None,
        "num_net_rows": traffic.num_net_rows if traffic is not None else None,
        "net_bytes": traffic.num_net_rows * cfg.hidden * BYTES_PER_CHANNEL[dtype] if traffic is not None else None,
    }
