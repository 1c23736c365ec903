"""The receive arena of the one-copy intranode dispatch: blocks of one IPC-mapped allocation per rank, handed out as
the torch tensors a dispatch returns, so that every peer can write its rows straight into them.

Lifetime: a block goes back to the arena when the last tensor viewing it dies (the tensors come from a DLPack
capsule whose deleter calls back here). Memory that a stream may still be reading is not written again too early:
a release records an event on the stream current at that moment, on the stream the block was allocated for and on
every stream record_stream() named (Buffer names its compute stream), and the dispatch that next takes any byte of
the range makes its stream wait for those events first. That is the rule torch's caching allocator applies, which
the arena's tensors cannot use: torch's own Tensor.record_stream ignores memory torch did not allocate.

A block released while the current stream is being captured into a CUDA graph is never handed out again: the graph
may read it on every replay, and the arena cannot know when the graph dies. (The arena warns once when that
happens.) Blocks are not handed out during capture either: the dispatch then uses ordinary torch tensors.

The arena never hands out memory it does not have: a call whose results do not fit gets None, and the dispatch then
takes the two-copy path into ordinary torch tensors.

Releases can run anywhere: in any thread, and inside the arena's own locked sections when Python's garbage collector
runs there and frees a cycle holding an arena tensor. So a release only queues the block; the queue is drained
under the lock, by the releasing thread when it does not already hold the lock, else by the locked section itself
before it lets go.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from . import device as ep_device
from .config import RECV_ARENA_PART_ALIGNMENT

__all__ = ["Part", "RecvArena", "record_stream"]

# Every part of a block starts on this boundary: 16-byte row copies need 16, and 256 keeps each part on its own
# cache lines. (config.recv_arena_size_hint counts with it.)
ALIGNMENT = RECV_ARENA_PART_ALIGNMENT


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
        return count * self.dtype.itemsize


@dataclasses.dataclass
class _FreeRange:
    start: int
    end: int
    fences: list[Any]  # events every later user of a byte of this range waits for


@dataclasses.dataclass
class _LiveBlock:
    end: int
    streams: list[Any]  # the stream it was allocated for, then those record_stream() named


# Every arena alive in this process, so that record_stream finds a result's arena whichever Buffer the tensor is
# passed to.
_ARENAS: weakref.WeakSet[RecvArena] = weakref.WeakSet()


def _align(value: int) -> int:
    return (value + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


class RecvArena:
    """Blocks of [base_ptr, base_ptr + num_bytes) on `device` as torch tensors.

    `wrap(ptr, num_bytes, on_release)` -> uint8 tensor [num_bytes] over that memory whose death calls on_release()
    (the extension's dlpack_view through torch.from_dlpack by default). `current_stream()` -> the stream current where
    a block is released. `is_capturing(stream)` -> whether that stream is being captured into a CUDA graph.
    `new_event()` -> an object with record(stream) and query() that a stream can wait_event() on (torch.cuda.Event).
    The last three exist so that tests can run the bookkeeping on the CPU; their defaults are deep_ep_py.device's,
    which are the CPU emulator's where it runs the kernels.
    """

    def __init__(
        self,
        base_ptr: int,
        num_bytes: int,
        device: torch.device,
        *,
        wrap: Callable[[int, int, Callable[[], None]], torch.Tensor] | None = None,
        current_stream: Callable[[], Any] | None = None,
        is_capturing: Callable[[Any], bool] | None = None,
        new_event: Callable[[], Any] | None = None,
    ) -> None:
        if base_ptr % ALIGNMENT != 0:
            raise ValueError(f"RecvArena: base_ptr must be {ALIGNMENT}-byte aligned, got {base_ptr:#x}")
        self.base_ptr = base_ptr
        self.num_bytes = num_bytes
        self.device = device
        self._wrap = wrap if wrap is not None else functools.partial(_wrap_device_memory, device)
        self._current_stream = current_stream or functools.partial(ep_device.current_stream, device)
        self._is_capturing = is_capturing or _stream_is_capturing
        self._new_event = new_event or ep_device.new_event
        self._lock = threading.Lock()
        # Per thread: inside a locked section of this arena (set before the lock is taken, cleared after it is let
        # go), where a release or close that the garbage collector runs may only queue.
        self._inside = threading.local()
        self._pending_close: Callable[[], None] | None = None
        self._released: collections.deque[tuple[int, list[Any] | None]] = collections.deque()  # (start, fences)
        self._free: list[_FreeRange] = [_FreeRange(0, num_bytes, [])] if num_bytes >= ALIGNMENT else []
        self._live: dict[int, _LiveBlock] = {}  # start -> block some tensor still views
        self._num_quarantined_bytes = 0
        self._num_blocks_allocated = 0
        self._closed = False
        self._on_drained: Callable[[], None] | None = None
        self._warned: set[str] = set()
        _ARENAS.add(self)

    # ----------------------------------------------------------------------------------------------- locking

    def _is_inside(self) -> bool:
        return getattr(self._inside, "active", False)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The lock, with the releases (and a close) queued meanwhile, also by the garbage collector inside the
        section, applied before it is let go; then on_drained() if close() waits for the last block and it is gone."""
        self._inside.active = True
        on_drained = None
        try:
            with self._lock:
                try:
                    self._drain()
                    yield
                finally:
                    while True:  # what the collector queued while this loop ran is applied too
                        self._drain()
                        on_drained = on_drained or self._take_on_drained()
                        if not self._released and self._pending_close is None:
                            break
        finally:
            self._inside.active = False
        if on_drained is not None:
            self._run_on_drained(on_drained)

    def _drain(self) -> None:
        if self._pending_close is not None:
            self._closed, self._on_drained, self._pending_close = True, self._pending_close, None
        while self._released:
            start, fences = self._released.popleft()
            block = self._live.pop(start)
            if fences is None:
                self._num_quarantined_bytes += block.end - start
            else:
                self._insert_free(_FreeRange(start, block.end, fences))

    def _take_on_drained(self) -> Callable[[], None] | None:
        # Quarantined blocks may still be read by a CUDA graph's replays: their memory is never freed.
        if self._closed and not self._live and self._on_drained is not None and not self._num_quarantined_bytes:
            on_drained, self._on_drained = self._on_drained, None
            return on_drained
        return None

    def _run_on_drained(self, on_drained: Callable[[], None]) -> None:
        """Free the arena's memory, unless a CUDA graph is being captured here (a free would break the capture);
        then it stays allocated until the process ends."""
        if self._is_capturing(self._current_stream()):
            self._warn_once(
                "free_in_capture",
                "deep_ep_py: the last receive-arena result of a destroyed Buffer died during CUDA-graph capture; "
                "freeing there would break the capture, so the arena's memory stays allocated.",
            )
            return
        on_drained()

    # ---------------------------------------------------------------------------------------------- queries

    @property
    def live_bytes(self) -> int:
        with self._locked():
            return sum(block.end - start for start, block in self._live.items())

    @property
    def num_live_blocks(self) -> int:
        with self._locked():
            return len(self._live)

    @property
    def num_blocks_allocated(self) -> int:
        """Blocks handed out since the arena was made (for tests: which calls took one)."""
        with self._locked():
            return self._num_blocks_allocated

    @property
    def quarantined_bytes(self) -> int:
        """Bytes released during CUDA-graph capture, never handed out again."""
        with self._locked():
            return self._num_quarantined_bytes

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
        with self._locked():
            if self._closed:
                return None
            start, fences = self._take(total)
            if start is not None:
                self._live[start] = _LiveBlock(start + total, [stream])
                self._num_blocks_allocated += 1
            else:
                live = sum(block.end - s for s, block in self._live.items())
                num_live, quarantined = len(self._live), self._num_quarantined_bytes
        if start is None:
            self._warn_once(
                "full",
                f"deep_ep_py: the receive arena ({self.num_bytes} bytes: {live} held by {num_live} earlier results "
                f"still alive, {quarantined} set aside after CUDA-graph capture) has no room for a {total}-byte "
                "dispatch result or combine input; such calls move their rows through the staging buffer until "
                "room frees up. A larger num_recv_arena_bytes, or dropping dispatch results sooner, keeps them on "
                "the one-copy path.",
            )
            return None
        try:
            for event in fences:
                stream.wait_event(event)
            block = self._wrap(self.base_ptr + start, total, functools.partial(self._release, start))
        except BaseException:
            # No capsule owns the block (a capsule that existed released it already): give it back here.
            with self._locked():
                if start in self._live:
                    del self._live[start]
                    self._insert_free(_FreeRange(start, start + total, fences))
            raise
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

    def record_stream(self, tensor: torch.Tensor, stream: Any) -> bool:
        """Tensor.record_stream for arena memory: the block holding `tensor` is also fenced on `stream` when it is
        released. False (nothing done) when the tensor is not in a live block of this arena."""
        offset = tensor.data_ptr() - self.base_ptr
        with self._locked():
            for start, block in self._live.items():
                if start <= offset < block.end:
                    if all(stream != known for known in block.streams):
                        block.streams.append(stream)
                    return True
        return False

    def _warn_once(self, what: str, message: str, quiet: bool = False) -> None:
        """warnings.warn once per arena. quiet: swallow what the warning raises (warnings made errors), where the
        caller is a deleter that must not fail."""
        if what in self._warned:
            return
        self._warned.add(what)
        try:
            warnings.warn(message + " (Said once per Buffer.)", RuntimeWarning, stacklevel=4)
        except Exception:
            if not quiet:
                raise

    # ----------------------------------------------------------------------------------------------- release

    def _release(self, start: int) -> None:
        """The DLPack deleter of the block at `start`: queued back to the free ranges, fenced by events on the
        streams that may still read it; set aside for good when released during capture."""
        block = self._live[start]  # a dict read: safe without the lock under the GIL; only this release removes it
        current = self._current_stream()
        streams = [current] + [s for s in block.streams if s != current]
        warning = None
        try:
            if any(self._is_capturing(stream) for stream in streams):
                fences = None
                warning = (
                    "captured",
                    "deep_ep_py: a dispatch result from the receive arena was freed while a CUDA graph was being "
                    "captured; the graph may read it on every replay, so its memory is never reused. Keep eager "
                    "results alive until capture ends, or drop them before it starts, to keep the arena's room.",
                )
            else:
                fences = []
                for stream in streams:
                    event = self._new_event()
                    event.record(stream)
                    fences.append(event)
        except Exception as exc:  # a deleter must not fail; without its fences the block is never safe to reuse
            fences = None
            warning = ("fence", f"deep_ep_py: fencing a freed receive-arena block failed ({exc}); set aside.")
        self._released.append((start, fences))
        if warning is not None:
            self._warn_once(*warning, quiet=True)
        if self._is_inside():
            return  # the garbage collector, inside this thread's locked section: that section drains the queue
        with self._locked():
            pass

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
        """No more blocks. on_drained() (which frees the memory) runs now when no block is alive, and close returns
        True; else it runs when the last live block is released (never, while blocks released during capture are
        set aside), and close returns False."""
        if self._is_inside():
            # A finaliser the garbage collector runs inside this thread's locked section: the section applies it.
            self._pending_close = on_drained
            return False
        with self._locked():
            self._closed = True
            self._on_drained = on_drained
            drained_now = not self._live and not self._num_quarantined_bytes
        return drained_now


def record_stream(tensor: torch.Tensor, stream: Any) -> None:
    """Tensor.record_stream for any tensor: through the arena that holds it (torch's own ignores arena memory, and
    fails on it with the cudaMallocAsync allocator), else torch's (nothing for CPU memory: see device.record_stream)."""
    if _ARENAS:  # none in a process without one-copy Buffers (every low-latency call records its outputs)
        for arena in list(_ARENAS):
            if arena.contains(tensor) and arena.record_stream(tensor, stream):
                return
    ep_device.record_stream(tensor, stream)


def _stream_is_capturing(stream: Any) -> bool:
    with ep_device.stream(stream):
        return ep_device.is_current_stream_capturing()


# DLPack's device types: the arena is device memory on a GPU, host memory under the CPU emulator.
_DLPACK_DEVICE_TYPES = {"cpu": 1, "cuda": 2}


def _wrap_device_memory(device: torch.device, ptr: int, num_bytes: int, on_release: Callable[[], None]) -> torch.Tensor:
    from ._ext import load_extension

    device_type = _DLPACK_DEVICE_TYPES[device.type]
    capsule = load_extension().dlpack_view(ptr, num_bytes, device_type, device.index or 0, on_release)
    return torch.from_dlpack(capsule)
