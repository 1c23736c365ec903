"""The receive arena's bookkeeping (deep_ep_py/recv_arena.py) on the CPU: blocks over a CPU byte tensor through the
extension's DLPack view, streams and events replaced by recorders. What runs on the GPU (the arena's tensors as
dispatch results, peers writing into them) is in tests/gpu/test_intranode_gpu.py."""

from __future__ import annotations

import gc
import threading
import warnings

import pytest

from deep_ep_py import _ext
from deep_ep_py.recv_arena import ALIGNMENT, Part, RecvArena

torch = pytest.importorskip("torch")

ARENA_BYTES = 16 * ALIGNMENT


class FakeStream:
    def __init__(self, name: str, capturing: bool = False) -> None:
        self.name = name
        self.capturing = capturing
        self.waited: list[FakeEvent] = []

    def wait_event(self, event: FakeEvent) -> None:
        self.waited.append(event)


class FakeEvent:
    def __init__(self) -> None:
        self.stream: FakeStream | None = None
        self.done = False

    def record(self, stream: FakeStream) -> None:
        self.stream = stream

    def query(self) -> bool:
        return self.done


class Rig:
    """An arena over a CPU byte tensor; `current` is the stream a release sees as current."""

    def __init__(self, num_bytes: int = ARENA_BYTES) -> None:
        if not _ext.has_kernels():
            pytest.skip(f"the DLPack view is in the extension: {_ext.kernels_unavailable_reason()}")
        ext = _ext.load_extension()
        # Over-allocate so that the arena's base is ALIGNMENT-aligned, as device allocations are.
        self.backing = torch.zeros(num_bytes + ALIGNMENT, dtype=torch.uint8)
        skip = (-self.backing.data_ptr()) % ALIGNMENT
        self.memory = self.backing[skip : skip + num_bytes]
        self.current = FakeStream("compute")
        self.events: list[FakeEvent] = []

        def new_event() -> FakeEvent:
            event = FakeEvent()
            self.events.append(event)
            return event

        def wrap(ptr, num_bytes, on_release):
            return torch.from_dlpack(ext.dlpack_view(ptr, num_bytes, 1, 0, on_release))

        self.arena = RecvArena(
            self.memory.data_ptr(),
            num_bytes,
            torch.device("cpu"),
            wrap=wrap,
            current_stream=lambda: self.current,
            is_capturing=lambda stream: stream.capturing,
            new_event=new_event,
        )

    def offset(self, tensor: torch.Tensor) -> int:
        return tensor.data_ptr() - self.memory.data_ptr()


def dispatch_parts(rows: int, hidden: int = 64, topk: int = 4, scales: bool = True, src: bool = True):
    return [
        Part((rows, hidden), torch.bfloat16),
        Part((rows, hidden // 32), torch.float32) if scales else None,
        Part((rows,), torch.int32) if src else None,
        Part((rows, topk), torch.int64),
        Part((rows, topk), torch.float32),
    ]


def test_a_block_holds_every_part_aligned_in_the_arena_memory():
    rig = Rig()
    comm = FakeStream("comm")
    parts = dispatch_parts(5, scales=False)
    tensors = rig.arena.allocate(parts, comm)
    assert tensors[1] is None
    offsets = []
    for part, tensor in zip(parts, tensors):
        if part is None:
            continue
        assert (tuple(tensor.shape), tensor.dtype) == (part.shape, part.dtype)
        assert tensor.is_contiguous()
        offsets.append(rig.offset(tensor))
    assert offsets == sorted(offsets) and all(offset % ALIGNMENT == 0 for offset in offsets)
    assert offsets[0] == 0 and rig.arena.contains(tensors[0])
    # The tensors are the arena's memory, not copies.
    tensors[3].fill_(-1)
    assert bool((rig.memory[offsets[2] : offsets[2] + 5 * 4 * 8] == 0xFF).all())
    assert rig.arena.num_live_blocks == 1 and rig.arena.live_bytes == sum(
        (p.num_bytes + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT for p in parts if p is not None
    )


def test_a_block_returns_when_its_last_view_dies_fenced_on_both_streams():
    rig = Rig()
    comm = FakeStream("comm")
    tensors = rig.arena.allocate(dispatch_parts(3), comm)
    keep = tensors[2]  # the handle keeps recv_src_idx: the whole block stays
    del tensors
    gc.collect()
    assert rig.arena.num_live_blocks == 1 and rig.events == []
    del keep
    gc.collect()
    assert rig.arena.num_live_blocks == 0
    assert sorted(event.stream.name for event in rig.events) == ["comm", "compute"]

    # The next block reuses the range: its stream waits for both releases, as long as they are pending.
    rig.events[0].done = True
    stream = FakeStream("comm2")
    again = rig.arena.allocate(dispatch_parts(3), stream)
    assert rig.offset(again[0]) == 0
    assert stream.waited == [rig.events[1]]


def test_a_release_on_the_allocating_stream_records_one_event():
    rig = Rig()
    tensors = rig.arena.allocate(dispatch_parts(2), rig.current)
    del tensors
    gc.collect()
    assert len(rig.events) == 1 and rig.events[0].stream is rig.current


def test_first_fit_skips_live_blocks_and_merges_freed_neighbours():
    rig = Rig()
    stream = FakeStream("comm")
    one = [Part((ALIGNMENT,), torch.uint8)]
    blocks = [rig.arena.allocate(one, stream) for _ in range(4)]
    assert [rig.offset(b[0]) for b in blocks] == [0, ALIGNMENT, 2 * ALIGNMENT, 3 * ALIGNMENT]
    del blocks[1:3]  # two neighbours in the middle
    gc.collect()
    two = rig.arena.allocate([Part((2 * ALIGNMENT,), torch.uint8)], stream)
    assert rig.offset(two[0]) == ALIGNMENT, "the freed neighbours were not merged into one range"
    assert {id(event) for event in stream.waited} == {id(event) for event in rig.events}


def test_no_room_gives_none_and_warns_once():
    rig = Rig(num_bytes=4 * ALIGNMENT)
    stream = FakeStream("comm")
    held = rig.arena.allocate([Part((3 * ALIGNMENT,), torch.uint8)], stream)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert rig.arena.allocate([Part((2 * ALIGNMENT,), torch.uint8)], stream) is None
        assert rig.arena.allocate([Part((2 * ALIGNMENT,), torch.uint8)], stream) is None
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "num_recv_arena_bytes" in messages[0] and "1 earlier" in messages[0]
    assert rig.arena.num_blocks_allocated == 1  # the calls that got None took nothing
    # What fits still fits.
    assert rig.arena.allocate([Part((ALIGNMENT,), torch.uint8)], stream) is not None
    del held


def test_a_call_that_receives_nothing_still_gets_a_block():
    rig = Rig()
    tensors = rig.arena.allocate(dispatch_parts(0), FakeStream("comm"))
    assert tensors is not None and tensors[0].shape == (0, 64)
    assert rig.arena.num_live_blocks == 1


def test_close_frees_now_or_when_the_last_block_dies():
    rig = Rig()
    freed = []
    assert rig.arena.close(lambda: freed.append("now")) is True and freed == ["now"]
    assert rig.arena.allocate(dispatch_parts(1), FakeStream("comm")) is None

    rig = Rig()
    tensors = rig.arena.allocate(dispatch_parts(1), FakeStream("comm"))
    assert rig.arena.close(lambda: freed.append("later")) is False
    assert freed == ["now"]
    del tensors
    gc.collect()
    assert freed == ["now", "later"]


def test_dlpack_view_calls_back_once_even_when_never_consumed():
    if not _ext.has_kernels():
        pytest.skip(f"the DLPack view is in the extension: {_ext.kernels_unavailable_reason()}")
    ext = _ext.load_extension()
    backing = torch.arange(64, dtype=torch.uint8)
    calls = []
    capsule = ext.dlpack_view(backing.data_ptr(), 64, 1, 0, lambda: calls.append("unused"))
    del capsule
    assert calls == ["unused"]
    view = torch.from_dlpack(ext.dlpack_view(backing.data_ptr(), 64, 1, 0, lambda: calls.append("used")))
    assert view.data_ptr() == backing.data_ptr() and torch.equal(view, backing)
    del view
    gc.collect()
    assert calls == ["unused", "used"]
    with pytest.raises(Exception, match="device_type"):
        ext.dlpack_view(backing.data_ptr(), 64, 7, 0, lambda: None)


def _in_thread(fn, timeout_s: float = 10.0) -> None:
    """Run fn in a thread; fail (instead of hanging the suite) when it does not finish: a deadlock."""
    errors = []

    def run():
        try:
            fn()
        except BaseException as exc:  # reported below
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert not thread.is_alive(), "deadlock: the arena's lock was taken twice by one thread"
    if errors:
        raise errors[0]


def test_a_release_inside_the_arenas_own_locked_section_is_applied_when_it_ends():
    """The garbage collector can free an arena tensor while this thread is inside a locked section (allocate makes
    objects): the release must neither deadlock nor change the free ranges under the section's feet."""
    rig = Rig()
    tensors = rig.arena.allocate(dispatch_parts(2), FakeStream("comm"))

    def release_while_locked():
        with rig.arena._locked():
            free_before = [(r.start, r.end) for r in rig.arena._free]
            del tensors[:]
            gc.collect()
            assert [(r.start, r.end) for r in rig.arena._free] == free_before, "released inside the section"
            assert len(rig.arena._released) == 1

    _in_thread(release_while_locked)
    assert rig.arena.num_live_blocks == 0 and len(rig.arena._free) == 1


def test_a_release_from_another_thread_returns_the_block():
    rig = Rig()
    holder = {"tensors": rig.arena.allocate(dispatch_parts(2), FakeStream("comm"))}
    _in_thread(lambda: holder.clear() or gc.collect())
    assert rig.arena.num_live_blocks == 0


def test_a_block_released_during_capture_is_never_reused():
    rig = Rig()
    comm = FakeStream("comm")
    tensors = rig.arena.allocate(dispatch_parts(2), comm)
    size = rig.arena.live_bytes
    rig.current = FakeStream("compute", capturing=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del tensors
        gc.collect()
    assert any("captured" in str(w.message) for w in caught), [str(w.message) for w in caught]
    assert rig.events == [], "events recorded on a capturing stream cannot be queried later"
    assert rig.arena.num_live_blocks == 0 and rig.arena.quarantined_bytes == size
    rig.current = FakeStream("compute")
    again = rig.arena.allocate(dispatch_parts(2), comm)
    assert rig.offset(again[0]) >= size, "a block released during capture was handed out again"


def test_record_stream_adds_a_fence_stream():
    rig = Rig()
    comm, side = FakeStream("comm"), FakeStream("side")
    tensors = rig.arena.allocate(dispatch_parts(2), comm)
    assert rig.arena.record_stream(tensors[3], side) is True
    assert rig.arena.record_stream(tensors[3], side) is True  # once only
    assert rig.arena.record_stream(torch.zeros(4), side) is False  # not arena memory
    del tensors
    gc.collect()
    assert sorted(event.stream.name for event in rig.events) == ["comm", "compute", "side"]


@pytest.mark.parametrize("hidden, num_topk", [(256, 4), (7168, 8), (128, 1), (384, 16)])
def test_the_size_hint_holds_that_many_worst_case_results(hidden, num_topk):
    """Buffer.get_recv_arena_size_hint(T, H, R, K, n) holds n results of T * R rows (every token of every rank),
    bf16 or fp8, and no third one (it is a bound, not a guess)."""
    import deep_ep_py

    num_tokens, num_ranks, num_results = 6, 3, 2
    rows = num_tokens * num_ranks
    hint = deep_ep_py.Buffer.get_recv_arena_size_hint(num_tokens, hidden, num_ranks, num_topk, num_results)
    rig = Rig(num_bytes=hint)
    stream = FakeStream("comm")
    bf16 = dispatch_parts(rows, hidden, num_topk, scales=False)
    fp8 = [Part((rows, hidden), torch.float8_e4m3fn), *dispatch_parts(rows, hidden, num_topk)[1:]]
    fp8[1] = Part((rows, (hidden + 127) // 128), torch.float32)
    held = [rig.arena.allocate(parts, stream) for parts in (bf16, fp8)[:num_results]]
    assert all(block is not None for block in held), "the hint does not hold its results"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert rig.arena.allocate(bf16, stream) is None, "the hint holds a third worst-case result: not a bound"
    with pytest.raises(ValueError, match="num_results"):
        deep_ep_py.Buffer.get_recv_arena_size_hint(num_tokens, hidden, num_ranks, num_topk, 0)


def test_close_from_a_finaliser_inside_the_locked_section_is_applied_when_it_ends():
    rig = Rig()
    freed = []

    def close_while_locked():
        with rig.arena._locked():
            assert rig.arena.close(lambda: freed.append("freed")) is False  # queued, not a deadlock
            assert freed == []

    _in_thread(close_while_locked)
    assert freed == ["freed"]
    assert rig.arena.allocate(dispatch_parts(1), FakeStream("comm")) is None  # closed


def test_a_release_while_another_thread_holds_the_lock_waits_and_lands():
    rig = Rig()
    holder = {"tensors": rig.arena.allocate(dispatch_parts(2), FakeStream("comm"))}
    entered, leave = threading.Event(), threading.Event()

    def hold_the_lock():
        with rig.arena._locked():
            entered.set()
            leave.wait(10)

    holder_thread = threading.Thread(target=hold_the_lock, daemon=True)
    holder_thread.start()
    assert entered.wait(10)
    releaser = threading.Thread(target=lambda: holder.clear() or gc.collect(), daemon=True)
    releaser.start()
    releaser.join(0.5)
    assert releaser.is_alive(), "the release did not wait for the lock"
    leave.set()
    holder_thread.join(10)
    releaser.join(10)
    assert not releaser.is_alive() and rig.arena.num_live_blocks == 0


def test_a_release_survives_warnings_made_errors():
    rig = Rig()
    tensors = rig.arena.allocate(dispatch_parts(2), FakeStream("comm"))
    rig.current = FakeStream("compute", capturing=True)  # the release warns
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        del tensors
        gc.collect()
    assert rig.arena.num_live_blocks == 0 and rig.arena.quarantined_bytes > 0


def test_a_block_whose_tensor_cannot_be_made_goes_back():
    rig = Rig()

    def broken_wrap(ptr, num_bytes, on_release):
        raise RuntimeError("no tensor today")

    rig.arena._wrap = broken_wrap
    with pytest.raises(RuntimeError, match="no tensor today"):
        rig.arena.allocate(dispatch_parts(2), FakeStream("comm"))
    assert rig.arena.num_live_blocks == 0
    assert [(r.start, r.end) for r in rig.arena._free] == [(0, ARENA_BYTES)]


def test_memory_a_graph_may_read_is_never_freed():
    rig = Rig()
    tensors = rig.arena.allocate(dispatch_parts(2), FakeStream("comm"))
    rig.current = FakeStream("compute", capturing=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        del tensors
        gc.collect()
    freed = []
    assert rig.arena.close(lambda: freed.append("freed")) is False
    assert freed == [], "freed memory that a captured graph may still read"


def test_no_free_while_a_graph_is_being_captured():
    """The free a closed arena's last release runs (test_close_frees_now_or_when_the_last_block_dies) is skipped
    when the stream current there is capturing: a free would break the capture."""
    rig = Rig()
    freed = []
    rig.current = FakeStream("compute", capturing=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rig.arena._run_on_drained(lambda: freed.append("freed"))
    assert freed == [] and any("capture" in str(w.message) for w in caught)
    rig.current = FakeStream("compute")
    rig.arena._run_on_drained(lambda: freed.append("freed"))
    assert freed == ["freed"]


def test_record_stream_finds_the_arena_of_any_result():
    from deep_ep_py import recv_arena

    rig = Rig()
    tensors = rig.arena.allocate(dispatch_parts(2), FakeStream("comm"))
    recv_arena.record_stream(tensors[0], FakeStream("other_buffer_comm"))
    del tensors
    gc.collect()
    assert "other_buffer_comm" in {event.stream.name for event in rig.events}
