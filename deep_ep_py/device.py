"""The kernels' device: a CUDA GPU, or the CPU emulator of the kernels (DEEP_EP_PY_EMULATE_DEVICE=1).

The emulator (``deep_ep_py._C_emu``) is the csrc/ kernels compiled for the host, with the Python API of
``deep_ep_py._C``: its "device memory" is host memory, its launches run synchronously on the host, and tensors on
its device are CPU tensors. This module is the one place that knows which of the two drives the kernel path: the
backends, Buffer, events, the receive arena and the runtime wrappers ask here for the device, its streams and events
instead of calling torch.cuda. Without emulation every function here is the torch.cuda call the code made before.

Under emulation streams are :class:`CpuStream` and events :class:`CpuEvent`: a launch has finished when it returns,
so a stream is always idle, an event is complete once recorded, and nothing is ever being captured into a graph.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from . import _ext
from ._ext import emulated

__all__ = [
    "CpuEvent",
    "CpuStream",
    "allocating_outputs",
    "available",
    "current_stream",
    "device_count",
    "emulated",
    "is_current_stream_capturing",
    "is_kernel_tensor",
    "kernel_device_type",
    "is_stream",
    "kernel_device",
    "new_event",
    "new_stream",
    "outputs_allocated_on",
    "record_stream",
    "stream",
    "synchronize",
]


class CpuEvent:
    """Stands in for torch.cuda.Event where work is done when a call returns (the emulator): complete once
    recorded. elapsed_time() measures wall-clock time between two records, in milliseconds as torch's does."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False) -> None:
        del enable_timing, blocking, interprocess  # accepted as torch.cuda.Event's; nothing to configure
        self._recorded_at: float | None = None

    def record(self, stream: Any = None) -> None:
        self._recorded_at = time.perf_counter()

    def query(self) -> bool:
        return True

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end_event: CpuEvent) -> float:
        if self._recorded_at is None or end_event._recorded_at is None:
            raise RuntimeError("CpuEvent.elapsed_time: both events must be recorded first")
        return (end_event._recorded_at - self._recorded_at) * 1000.0

    def __repr__(self) -> str:
        return "CpuEvent()"


class CpuStream:
    """Stands in for a stream where streams have nothing to order: the communication stream of the reference
    backend without CUDA, and every stream of the emulator, whose launches run synchronously (a stream is idle
    whenever a call returns). `cuda_stream` is the handle the extension's launches take: 0."""

    cuda_stream = 0

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def record_event(self, event: Any = None) -> Any:
        event = CpuEvent() if event is None else event
        event.record(self)
        return event

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def __repr__(self) -> str:
        return "CpuStream()"


# The emulator's streams: the default one, and per thread the one `stream()` made current.
_DEFAULT_CPU_STREAM = CpuStream()
_current_cpu_stream = threading.local()


def available() -> bool:
    """Whether the kernels' device has streams and events: a CUDA device torch can use, or the emulator (whose
    stand-ins always work, built or not)."""
    return emulated() or torch.cuda.is_available()


def kernel_device() -> torch.device:
    """Where the kernels' tensors live: the current CUDA device, or the CPU under emulation."""
    if emulated():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def kernel_device_type() -> str:
    """The device type of the kernels' tensors: "cuda", or "cpu" under emulation (never initialises CUDA)."""
    return "cpu" if emulated() else "cuda"


def is_kernel_tensor(tensor: torch.Tensor) -> bool:
    """Whether the kernels can take this tensor (it lives on their device): a CUDA tensor, or under emulation a CPU
    tensor. Decided on the device type alone, so that it never initialises CUDA."""
    return tensor.device.type == kernel_device_type()


def current_stream(device: torch.device | int | None = None) -> Any:
    """torch.cuda.current_stream(device), or the emulator's current CpuStream (device ignored: there is one)."""
    if emulated():
        return getattr(_current_cpu_stream, "stream", None) or _DEFAULT_CPU_STREAM
    return torch.cuda.current_stream(device)


def new_stream() -> Any:
    """torch.cuda.Stream(), or a new CpuStream under emulation."""
    if emulated():
        return CpuStream()
    return torch.cuda.Stream()


def stream(s: Any) -> contextlib.AbstractContextManager:
    """torch.cuda.stream(s): `s` is the current stream inside the with block (this thread's, under emulation)."""
    if emulated():
        return _set_in_this_thread(_current_cpu_stream, s)
    return torch.cuda.stream(s)


@contextlib.contextmanager
def _set_in_this_thread(local: threading.local, s: Any) -> Iterator[None]:
    """local.stream = s within, for this thread."""
    previous = getattr(local, "stream", None)
    local.stream = s
    try:
        yield
    finally:
        local.stream = previous


# Per thread, the stream outputs_allocated_on named (None: outputs are allocated on the current stream).
_output_stream = threading.local()


def outputs_allocated_on(s: Any) -> contextlib.AbstractContextManager:
    """Within: allocating_outputs() makes `s` current, so that a call's results come from the pool of `s` in torch's
    caching allocator (DeepEP's allocate_on_comm_stream=False: the caller's stream) while its work runs on
    another. None: on whatever stream is current."""
    return _set_in_this_thread(_output_stream, s)


def allocating_outputs() -> contextlib.AbstractContextManager:
    """Around the torch.empty calls of results handed to the caller (never around scratch memory, which the work's
    stream uses and frees, nor around launches or fills, which must stay in the work's stream order): the stream
    outputs_allocated_on named is current within; a no-op where none was named."""
    s = getattr(_output_stream, "stream", None)
    return contextlib.nullcontext() if s is None else stream(s)


def on_stream_of_now(fn: Callable[[], None], device: torch.device) -> Callable[[], None]:
    """fn, to be run later on the stream that is current now for tensors on `device`: a low-latency hook launches
    its receive on the stream of the call that made it (as DeepEP's does), whichever stream is current when hook()
    runs (vLLM's and SGLang's micro-batch overlap run one batch's hook from the other's stream). fn itself where
    `device` has no streams (a CPU tensor outside the emulator)."""
    if not emulated() and device.type != "cuda":
        return fn
    call_stream = current_stream(device)

    def run() -> None:
        with stream(call_stream):
            fn()

    return run


def is_stream(obj: Any) -> bool:
    """Whether obj is a stream of the kernels' device (a torch.cuda.Stream, or under emulation a CpuStream)."""
    return isinstance(obj, CpuStream) if emulated() else isinstance(obj, torch.cuda.Stream)


def new_event(**kwargs: Any) -> Any:
    """torch.cuda.Event(**kwargs), or a CpuEvent under emulation."""
    if emulated():
        return CpuEvent(**kwargs)
    return torch.cuda.Event(**kwargs)


def record_stream(tensor: torch.Tensor, s: Any) -> None:
    """tensor.record_stream(s) for memory of torch's CUDA allocator; nothing for other memory: a CPU tensor (the
    emulator's included) is never read by a stream after the call that used it returned."""
    if tensor.is_cuda:
        tensor.record_stream(s)


def synchronize(device: torch.device | int | None = None) -> None:
    """torch.cuda.synchronize(device); nothing under emulation (every launch has finished when it returns)."""
    if not emulated():
        torch.cuda.synchronize(device)


def is_current_stream_capturing() -> bool:
    """torch.cuda.is_current_stream_capturing(); never under emulation (it has no graphs), nor without CUDA (a
    CPU-only torch raises there)."""
    if emulated() or not torch.cuda.is_available():
        return False
    return torch.cuda.is_current_stream_capturing()


def device_count() -> int:
    """torch.cuda.device_count(), or the emulator's devices (1 when it is built, else 0)."""
    if emulated():
        extension = _ext.load_extension()
        return extension.device_count() if extension is not None else 0
    return torch.cuda.device_count()
