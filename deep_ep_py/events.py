"""CUDA events and the overlap wrapper that DeepEP V1's callers pass around.

On a machine without CUDA both classes keep the same interface and do nothing: the reference backend runs
synchronously there, so there is never anything to wait for.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def _cuda_usable() -> bool:
    return torch.cuda.is_available()


class EventHandle:
    """A CUDA event recorded on the current stream when constructed with no argument.

    `event` is the underlying torch.cuda.Event, or None on a machine without CUDA.
    """

    def __init__(self, event: torch.cuda.Event | None = None) -> None:
        if event is None and _cuda_usable():
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream())
        self.event = event

    @classmethod
    def recorded_on(cls, stream: Any) -> EventHandle:
        """An event recorded on `stream` when it is a CUDA stream, else on the current stream (if any)."""
        if isinstance(stream, torch.cuda.Stream):
            event = torch.cuda.Event()
            event.record(stream)
            return cls(event)
        return cls()

    def current_stream_wait(self) -> None:
        """Make the current CUDA stream wait for this event (no-op without CUDA)."""
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)

    def stream_wait(self, stream: Any) -> None:
        if self.event is not None and isinstance(stream, torch.cuda.Stream):
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


class CpuStream:
    """Stands in for the communication stream where there is no CUDA: the reference backend is synchronous."""

    def synchronize(self) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def __repr__(self) -> str:
        return "CpuStream()"
