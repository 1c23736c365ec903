"""The receive arena of the one-copy intranode dispatch: blocks of one IPC-mapped allocation per rank, handed out as
the torch tensors a dispatch returns, so that every peer can write its rows straight into them.

Lifetime: a block goes back to the arena when the last tensor viewing it dies (the tensors come from a DLPack
capsule whose deleter calls back here). Memory that a stream may still be reading is not written again too early:
a release records an event on the stream current at that moment and on the communication stream, and the dispatch
that next takes any byte of the range makes its stream wait for those events first. That is the rule torch's
caching allocator applies to a tensor used on the streams record_stream named, which the arena's tensors cannot use
(record_stream ignores memory torch did not allocate).

The arena never hands out memory it does not have: a call whose results do not fit gets None, and the dispatch then
takes the two-copy path into ordinary torch tensors. Blocks are not handed out during CUDA-graph capture, since a
replay would write into a block the arena may have given to someone else by then.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["Part", "RecvArena"]

# Every part of a block starts on this boundary: 16-byte row copies need 16, and 256 keeps each part on its own
# cache lines.
ALIGNMENT = 256


@dataclasses.dataclass(frozen=True)
class Part:
    """One tensor of a block: shape and dtype (None stands for an output the call does not have)."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def num_bytes(self) -> int:
        count = 1
        for extent in self.shape:
            count *= extent
        return count * torch.empty((), dtype=self.dtype).element_size()


@dataclasses.dataclass
class _FreeRange:
    start: int
    end: int
    fences: list[Any]  # events every later user of a byte of this range waits for


def _align(value: int) -> int:
    return (value + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


class RecvArena:
    """Blocks of [base_ptr, base_ptr + num_bytes) on CUDA device `device` as torch tensors.

    `wrap(ptr, num_bytes, on_release)` -> uint8 tensor [num_bytes] over that memory whose death calls on_release()
    (deep_ep_py._C.dlpack_view through torch.from_dlpack by default). `current_stream()` -> the stream current where
    a block is released (a release fences it and the stream the block was allocated for). `new_event()` -> an
    object with record(stream) and query() that a stream can wait_event() on (torch.cuda.Event by default). The last
    two exist so that tests can run the bookkeeping on the CPU.
    """

    def __init__(
        self,
        base_ptr: int,
        num_bytes: int,
        device: torch.device,
        *,
        wrap: Callable[[int, int, Callable[[], None]], torch.Tensor] | None = None,
        current_stream: Callable[[], Any] | None = None,
        new_event: Callable[[], Any] | None = None,
    ) -> None:
        if base_ptr % ALIGNMENT != 0:
            raise ValueError(f"RecvArena: base_ptr must be {ALIGNMENT}-byte aligned, got {base_ptr:#x}")
        self.base_ptr = base_ptr
        self.num_bytes = num_bytes
        self.device = device
        self._wrap = wrap if wrap is not None else functools.partial(_wrap_cuda, device)
        self._current_stream = (
            current_stream if current_stream is not None else functools.partial(torch.cuda.current_stream, device)
        )
        self._new_event = new_event if new_event is not None else torch.cuda.Event
        self._lock = threading.Lock()
        self._free: list[_FreeRange] = [_FreeRange(0, num_bytes, [])] if num_bytes >= ALIGNMENT else []
        self._live: dict[int, tuple[int, Any]] = {}  # start -> (end, stream allocated for) of blocks in use
        self._closed = False
        self._on_drained: Callable[[], None] | None = None
        self._warned_full = False

    # ---------------------------------------------------------------------------------------------- queries

    @property
    def live_bytes(self) -> int:
        with self._lock:
            return sum(end - start for start, (end, _) in self._live.items())

    @property
    def num_live_blocks(self) -> int:
        with self._lock:
            return len(self._live)

    def contains(self, tensor: torch.Tensor) -> bool:
        """Whether tensor's memory lies in this arena."""
        ptr = tensor.data_ptr()
        return self.base_ptr <= ptr < self.base_ptr + self.num_bytes

    # ---------------------------------------------------------------------------------------------- allocate

    def allocate(self, parts: Sequence[Part | None], stream: Any) -> list[torch.Tensor | None] | None:
        """Tensors for `parts` (None where a part is None) in one block, or None when the block does not fit (or
        the arena is closed). `stream` waits for the releases of every range the block reuses; the tensors may be
        written on it (or on a stream ordered after it) at once."""
        offsets, total = [], 0
        for part in parts:
            offsets.append(total)
            total += _align(part.num_bytes) if part is not None else 0
        total = max(total, ALIGNMENT)  # a call that receives nothing still publishes a block
        with self._lock:
            if self._closed:
                return None
            start, fences = self._take(total)
            if start is None:
                self._warn_full(total)
                return None
            self._live[start] = (start + total, stream)
        for event in fences:
            stream.wait_event(event)
        block = self._wrap(self.base_ptr + start, total, functools.partial(self._release, start))
        tensors: list[torch.Tensor | None] = []
        for part, offset in zip(parts, offsets):
            if part is None:
                tensors.append(None)
                continue
            piece = block[offset : offset + part.num_bytes]
            tensors.append(piece.view(part.dtype).view(part.shape))
        return tensors

    def _take(self, num_bytes: int) -> tuple[int | None, list[Any]]:
        """First fit: (start, the events to wait for) of num_bytes taken from the free ranges, or (None, [])."""
        for index, free in enumerate(self._free):
            if free.end - free.start < num_bytes:
                continue
            fences = [event for event in free.fences if not event.query()]
            start = free.start
            if free.end - free.start == num_bytes:
                del self._free[index]
            else:
                free.start += num_bytes
                free.fences = list(fences)
            return start, fences
        return None, []

    def _warn_full(self, num_bytes: int) -> None:
        if self._warned_full:
            return
        self._warned_full = True
        live = sum(end - start for start, (end, _) in self._live.items())
        warnings.warn(
            f"deep_ep_py: the receive arena ({self.num_bytes} bytes, {live} held by {len(self._live)} earlier "
            f"results still alive) has no room for a {num_bytes}-byte dispatch result; such dispatches move their "
            "rows twice (through the staging buffer) until room frees up. A larger num_recv_arena_bytes, or "
            "dropping dispatch results sooner, keeps them on the one-copy path. (Said once per Buffer.)",
            RuntimeWarning,
            stacklevel=4,
        )

    # ----------------------------------------------------------------------------------------------- release

    def _release(self, start: int) -> None:
        """The DLPack deleter of the block at `start`: back to the free ranges, fenced by events on the streams
        that may still read it."""
        with self._lock:
            end, allocated_for = self._live[start]
        fences = []
        current = self._current_stream()
        for stream in (current, allocated_for) if allocated_for != current else (current,):
            event = self._new_event()
            event.record(stream)
            fences.append(event)
        with self._lock:
            del self._live[start]
            self._insert_free(_FreeRange(start, end, fences))
            drained = self._closed and not self._live
            on_drained, self._on_drained = (self._on_drained, None) if drained else (None, self._on_drained)
        if on_drained is not None:
            on_drained()

    def _insert_free(self, new: _FreeRange) -> None:
        """Insert keeping the ranges sorted, merged with adjacent ones (their fences together)."""
        ranges = self._free
        index = 0
        while index < len(ranges) and ranges[index].start < new.start:
            index += 1
        ranges.insert(index, new)
        if index + 1 < len(ranges) and ranges[index].end == ranges[index + 1].start:
            following = ranges.pop(index + 1)
            ranges[index].end = following.end
            ranges[index].fences += following.fences
        if index > 0 and ranges[index - 1].end == ranges[index].start:
            current = ranges.pop(index)
            ranges[index - 1].end = current.end
            ranges[index - 1].fences += current.fences

    # ------------------------------------------------------------------------------------------------- close

    def close(self, on_drained: Callable[[], None]) -> bool:
        """No more blocks. on_drained() (which frees the memory) runs now when no block is alive, and returns True;
        else it runs when the last live block is released, and close returns False."""
        with self._lock:
            self._closed = True
            if self._live:
                self._on_drained = on_drained
                return False
        on_drained()
        return True


def _wrap_cuda(device: torch.device, ptr: int, num_bytes: int, on_release: Callable[[], None]) -> torch.Tensor:
    from ._ext import load_extension

    capsule = load_extension().dlpack_view(ptr, num_bytes, 2, device.index, on_release)
    return torch.from_dlpack(capsule)
