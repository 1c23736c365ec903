"""Timing helpers shared by every benchmark path: per-iteration timers, the copy roof, cross-rank reduction.

A timed call may return a callable (a low-latency ``hook``): the timer then marks the moment the call returned
("send" phase) and runs the callable inside the timed region, so one measurement gives both the send time and
the total time (send + receive).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from deep_ep_py import device as kernel_dev

# Bytes of a token's hidden vector on the wire, as DeepEP's tests count them.
FP8_BYTES_PER_CHANNEL = 1.0 + 4.0 / 128.0  # one float8 byte per channel + one float32 scale per 128 channels
BF16_BYTES_PER_CHANNEL = 2.0


@dataclass
class IterTimes:
    """Per-iteration wall times of one rank, in seconds.

    total_s[i]: the whole timed region of iteration i. send_s[i]: time until the call returned, only when the
    call returned a hook (return_recv_hook=True); empty otherwise.
    """

    total_s: list[float] = field(default_factory=list)
    send_s: list[float] = field(default_factory=list)

    def median_total_s(self) -> float:
        return statistics.median(self.total_s)

    def median_send_s(self) -> float | None:
        return statistics.median(self.send_s) if self.send_s else None


def on_kernel_device(device: torch.device) -> bool:
    """Whether ``device`` is the kernels' device: a CUDA device, or the CPU in a process that runs the CPU emulator
    of the kernels (DEEP_EP_PY_EMULATE_DEVICE=1, ``--device emulated``). There the timers and the copy roof take
    the kernels' path, through deep_ep_py.device (CUDA events, or their wall-clock stand-ins under emulation)."""
    return device.type == ("cpu" if kernel_dev.emulated() else "cuda")


def _barrier(group: dist.ProcessGroup | None) -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier(group=group)


def time_iters(
    fn: Callable[..., object],
    *,
    setup: Callable[[], object] | None = None,
    warmup: int,
    iters: int,
    device: torch.device,
    group: dist.ProcessGroup | None = None,
) -> IterTimes:
    """Run ``fn`` ``warmup`` times untimed, then ``iters`` times timed, with a group barrier before each.

    setup: when given, called untimed before each iteration's barrier; its result is ``fn``'s one argument
    (a low-latency combine needs the handle of a fresh dispatch). On the kernels' device (on_kernel_device) the
    device is synchronised before each barrier (so every rank starts with an idle stream) and the region is timed
    with its events on the current stream (CUDA events; under the CPU emulator, wall-clock stand-ins); on the CPU
    with ``time.perf_counter``. If ``fn`` returns a callable, it is called inside the timed region
    and the return point is recorded too.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    use_events = on_kernel_device(device)
    call = fn if setup is None else None

    def prepare() -> Callable[[], object]:
        if call is not None:
            return call
        state = setup()
        return lambda: fn(state)

    for _ in range(warmup):
        _call_with_hook(prepare())
    if use_events:
        kernel_dev.synchronize(device)
    _barrier(group)

    times = IterTimes()
    if use_events:
        marks = []
        for _ in range(iters):
            step = prepare()
            kernel_dev.synchronize(device)
            _barrier(group)
            start, sent, end = (kernel_dev.new_event(enable_timing=True) for _ in range(3))
            start.record()
            hook = step()
            sent.record()
            if callable(hook):
                hook()
            end.record()
            marks.append((start, sent, end, callable(hook)))
        kernel_dev.synchronize(device)
        for start, sent, end, has_hook in marks:
            times.total_s.append(start.elapsed_time(end) * 1e-3)
            if has_hook:
                times.send_s.append(start.elapsed_time(sent) * 1e-3)
    else:
        for _ in range(iters):
            step = prepare()
            _barrier(group)
            start = time.perf_counter()
            hook = step()
            sent = time.perf_counter()
            if callable(hook):
                hook()
            end = time.perf_counter()
            times.total_s.append(end - start)
            if callable(hook):
                times.send_s.append(sent - start)
    _barrier(group)
    return times


def _call_with_hook(fn: Callable[[], object]) -> None:
    hook = fn()
    if callable(hook):
        hook()


def measure_copy_roof_gbps(device: torch.device, num_bytes: int = 1 << 30, iters: int = 20) -> float | None:
    """Device-to-device copy rate in GB/s (1e9 B/s), counting bytes read plus bytes written.

    Returns None off the kernels' device (on_kernel_device): there is no HBM roof to compare a CPU reference run
    against. Under the CPU emulator it is the host's memcpy rate, measured the same way.
    """
    if not on_kernel_device(device):
        return None
    num_elems = num_bytes // 2
    src = torch.empty(num_elems, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    kernel_dev.synchronize(device)
    start, end = kernel_dev.new_event(enable_timing=True), kernel_dev.new_event(enable_timing=True)
    start.record()
    for _ in range(iters):
        dst.copy_(src)
    end.record()
    kernel_dev.synchronize(device)
    seconds = start.elapsed_time(end) * 1e-3 / iters
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return 2.0 * num_elems * 2 / seconds / 1e9


@dataclass
class RankResult:
    """What one rank measured for one path: its median time and the payload bytes it received."""

    median_s: float
    recv_bytes: float
    median_send_s: float | None = None
    iter_s: list[float] = field(default_factory=list)


def reduce_ranks(per_rank: Sequence[RankResult]) -> dict:
    """Combine the ranks' figures the way DeepEP's test reports them.

    time: the slowest rank's median (the collective is done only when every rank is). GB/s: the mean over ranks
    of each rank's received bytes over its own median time.
    """
    if not per_rank:
        raise ValueError("reduce_ranks needs at least one rank")
    gbps = [r.recv_bytes / r.median_s / 1e9 for r in per_rank]
    send = [r.median_send_s for r in per_rank if r.median_send_s is not None]
    return {
        "time_us": max(r.median_s for r in per_rank) * 1e6,
        "gbps": sum(gbps) / len(gbps),
        "send_time_us": max(send) * 1e6 if send else None,
        "per_rank_time_us": [r.median_s * 1e6 for r in per_rank],
        "per_rank_gbps": gbps,
        "per_rank_recv_bytes": [r.recv_bytes for r in per_rank],
    }
