"""CUDA events and the overlap wrapper that DeepEP V1's callers pass around.

On a machine without CUDA both classes keep the same interface and do nothing: the reference backend runs
synchronously there, so there is never anything to wait for. Under the CPU emulator of the kernels the events are
deep_ep_py.device's stand-ins, complete as soon as recorded.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from . import device
from .device import CpuStream  # noqa: F401  (re-exported: deep_ep_py.events.CpuStream is where callers find it)


class EventHandle:
    """A CUDA event recorded on the current stream when constructed with no argument.

    `event` is the underlying torch.cuda.Event (a device.CpuEvent under emulation), or None on a machine without
    CUDA.
    """

    def __init__(self, event: Any = None) -> None:
        if event is None and device.available():
            event = device.new_event()
            event.record(device.current_stream())
        self.event = event

    @classmethod
    def recorded_on(cls, stream: Any) -> EventHandle:
        """An event recorded on `stream` when it is a stream of the kernels' device, else on the current stream (if
        any)."""
        if device.is_stream(stream):
            event = device.new_event()
            event.record(stream)
            return cls(event)
        return cls()

    def current_stream_wait(self) -> None:
        """Make the current CUDA stream wait for this event (no-op without CUDA)."""
        if self.event is not None:
            device.current_stream().wait_event(self.event)

    def stream_wait(self, stream: Any) -> None:
        if self.event is not None and device.is_stream(stream):
            stream.wait_event(self.event)

    def __repr__(self) -> str:
        return f"EventHandle(cuda={self.event is not None})"


class EventOverlap:
    """What every communication call returns as its event.

    `event` is an EventHandle when the call ran with async_finish=True (or was captured), else None.
    `extra_tensors` are kept alive until the event is waited on, so that memory used by the communication
    stream is not reused early. `with overlap:` waits on exit.
    """

    def __init__(self, event: EventHandle | None = None, extra_tensors: Iterable[torch.Tensor] | None = None):
        self.event = event
        self.extra_tensors = tuple(extra_tensors) if extra_tensors is not None else None

    def current_stream_wait(self) -> None:
        """Make the current stream wait for the communication to finish (no-op when not async)."""
        if self.event is not None:
            self.event.current_stream_wait()
        self.extra_tensors = None

    def __enter__(self) -> EventOverlap:
        return self

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        self.current_stream_wait()

    def __repr__(self) -> str:
        return f"EventOverlap(event={self.event!r})"
