"""deep_ep_py.device, the one place that knows whether the kernels' device is a CUDA GPU or the CPU emulator
(DEEP_EP_PY_EMULATE_DEVICE=1), and what it changes in _ext, events, the receive arena, runtime and Buffer. Runs
without a GPU and without deep_ep_py._C_emu built: the emulator's own kernels are not exercised here."""

from __future__ import annotations

import ctypes
import gc
import sys

import pytest
import torch
import torch.distributed as dist

from deep_ep_py import _ext, device, events, recv_arena, runtime
from deep_ep_py.errors import DeepEPError
from deep_ep_py.testing import launch

EMULATE = "DEEP_EP_PY_EMULATE_DEVICE"


@pytest.fixture
def emulated(monkeypatch):
    monkeypatch.setenv(EMULATE, "1")


# ---- _ext ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [(None, False), ("", False), ("0", False), ("1", True), ("yes", True)])
def test_emulated_reads_the_environment_at_every_call(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv(EMULATE, raising=False)
    else:
        monkeypatch.setenv(EMULATE, value)
    assert _ext.emulated() is expected
    assert _ext.extension_name() == ("deep_ep_py._C_emu" if expected else "deep_ep_py._C")


def test_a_missing_emulator_is_explained(monkeypatch, emulated):
    # Whether or not _C_emu is built in this tree: make its import fail as if it were not.
    monkeypatch.setattr(_ext, "_loaded", {})
    monkeypatch.setitem(sys.modules, "deep_ep_py._C_emu", None)
    monkeypatch.setattr(_ext, "_installed_extension_path", lambda name: None)
    assert _ext.load_extension() is None
    assert not _ext.has_kernels() and not _ext.gpu_available()
    reason = _ext.kernels_unavailable_reason()
    assert "no deep_ep_py._C_emu in" in reason and "-DDEEP_EP_PY_BUILD_EMULATOR=ON" in reason, reason


def test_the_cuda_extension_is_cached_apart_from_the_emulator(monkeypatch):
    monkeypatch.delenv(EMULATE, raising=False)
    cuda_extension, cuda_reason = _ext.load_extension(), _ext.kernels_unavailable_reason()
    # As if the emulator had never been tried (the GPU tier may have loaded it earlier in this session).
    monkeypatch.setattr(_ext, "_loaded", {name: v for name, v in _ext._loaded.items() if name != "deep_ep_py._C_emu"})
    monkeypatch.setitem(sys.modules, "deep_ep_py._C_emu", None)  # its import fails without loading anything
    monkeypatch.setattr(_ext, "_installed_extension_path", lambda name: None)
    monkeypatch.setenv(EMULATE, "1")
    assert _ext.load_extension() is None and _ext.kernels_unavailable_reason()
    monkeypatch.delenv(EMULATE)
    assert _ext.load_extension() is cuda_extension and _ext.kernels_unavailable_reason() == cuda_reason


class _FakeEmulator:
    def __init__(self, num_devices: int) -> None:
        self.num_devices = num_devices

    def device_count(self) -> int:
        return self.num_devices


@pytest.mark.parametrize("num_devices", [0, 1])
def test_gpu_available_under_emulation_is_the_emulators_device_count(monkeypatch, emulated, num_devices):
    monkeypatch.setattr(_ext, "load_extension", lambda: _FakeEmulator(num_devices))
    assert _ext.gpu_available() is (num_devices > 0)
    assert device.device_count() == num_devices


# ---- the facade ---------------------------------------------------------------------------------------------------


def test_without_emulation_the_facade_is_torch_cuda(monkeypatch):
    monkeypatch.delenv(EMULATE, raising=False)
    assert device.available() is torch.cuda.is_available()
    assert not device.is_kernel_tensor(torch.zeros(1))
    assert not device.is_stream(device.CpuStream())
    assert device.device_count() == torch.cuda.device_count()
    if not torch.cuda.is_available():
        assert events.EventHandle().event is None
        assert events.EventHandle.recorded_on(events.CpuStream()).event is None


def test_under_emulation_the_kernels_device_is_the_cpu(emulated):
    assert device.available()
    assert device.kernel_device() == torch.device("cpu")
    assert device.is_kernel_tensor(torch.zeros(1))
    assert not device.is_current_stream_capturing()
    device.synchronize()
    device.record_stream(torch.zeros(2), device.current_stream())  # CPU memory: nothing to record


def test_emulated_streams_are_cpu_streams_with_a_null_handle(emulated):
    default = device.current_stream()
    assert isinstance(default, events.CpuStream) and device.is_stream(default)
    assert default.cuda_stream == 0 and default.query()
    side = device.new_stream()
    assert side is not default and isinstance(side, events.CpuStream)
    with device.stream(side):
        assert device.current_stream() is side
        assert device.current_stream(torch.device("cpu")) is side
    assert device.current_stream() is default
    side.wait_stream(default)
    side.synchronize()
    assert side.record_event().query()


def test_a_deferred_call_runs_on_the_stream_current_when_it_was_made(emulated):
    """A low-latency hook launches its receive on its call's stream, whichever stream is current at hook()."""
    call_stream, hook_stream = device.new_stream(), device.new_stream()
    seen = []
    with device.stream(call_stream):
        deferred = device.on_stream_of_now(lambda: seen.append(device.current_stream()), torch.device("cpu"))
    with device.stream(hook_stream):
        deferred()
        assert device.current_stream() is hook_stream
    assert seen == [call_stream]


def test_a_deferred_call_on_cpu_tensors_outside_the_emulator_is_the_call_itself(monkeypatch):
    monkeypatch.delenv("DEEP_EP_PY_EMULATE_DEVICE", raising=False)

    def call() -> None:
        return None

    assert device.on_stream_of_now(call, torch.device("cpu")) is call


def test_emulated_events_are_complete_once_recorded(emulated):
    start, end = device.new_event(enable_timing=True), device.new_event(enable_timing=True)
    start.record()
    end.record(device.current_stream())
    assert start.query() and end.query()
    start.wait(device.current_stream())
    end.synchronize()
    assert start.elapsed_time(end) >= 0.0
    with pytest.raises(RuntimeError, match="recorded"):
        device.new_event().elapsed_time(end)


def test_event_handles_under_emulation_carry_cpu_events(emulated):
    handle = events.EventHandle()
    assert isinstance(handle.event, device.CpuEvent)
    on_stream = events.EventHandle.recorded_on(device.new_stream())
    assert isinstance(on_stream.event, device.CpuEvent)
    on_stream.current_stream_wait()
    on_stream.stream_wait(device.current_stream())
    with events.EventOverlap(handle, extra_tensors=[torch.zeros(1)]) as overlap:
        pass
    assert overlap.extra_tensors is None


# ---- what uses it -------------------------------------------------------------------------------------------------


def test_runtime_names_the_missing_emulator(monkeypatch, emulated):
    monkeypatch.setattr(_ext, "load_extension", lambda: None)
    monkeypatch.setattr(_ext, "kernels_unavailable_reason", lambda: "no deep_ep_py._C_emu in /somewhere")
    with pytest.raises(DeepEPError, match=r"needs the CPU emulator deep_ep_py\._C_emu: no deep_ep_py\._C_emu in"):
        runtime.PeerMappedBuffer(None, 1024)


def test_device_bytes_view_under_emulation_is_a_cpu_view(emulated):
    memory = (ctypes.c_uint8 * 32)()
    view = runtime.device_bytes_view(ctypes.addressof(memory), 32)
    assert view.device == torch.device("cpu") and view.dtype == torch.uint8 and view.numel() == 32
    view[5] = 9
    assert memory[5] == 9


def test_the_receive_arena_under_emulation_hands_out_cpu_blocks(monkeypatch, emulated):
    """The arena's defaults (DLPack wrap, streams, events) on the emulator's CPU memory; the DLPack view comes from
    deep_ep_py._C, which has the same dlpack_view as the emulator."""
    monkeypatch.delenv(EMULATE)
    cuda_extension = _ext.load_extension()
    monkeypatch.setenv(EMULATE, "1")
    if cuda_extension is None:
        pytest.skip(f"the DLPack view is in the extension: {_ext.kernels_unavailable_reason()}")
    monkeypatch.setattr(_ext, "load_extension", lambda: cuda_extension)
    num_bytes = 4 * recv_arena.ALIGNMENT
    backing = torch.zeros(num_bytes + recv_arena.ALIGNMENT, dtype=torch.uint8)
    skip = (-backing.data_ptr()) % recv_arena.ALIGNMENT
    base = backing[skip : skip + num_bytes]
    arena = recv_arena.RecvArena(base.data_ptr(), num_bytes, device.kernel_device())
    parts = [recv_arena.Part((4, 8), torch.float32), None]
    first, absent = arena.allocate(parts, device.current_stream())
    assert absent is None and first.device == torch.device("cpu") and first.data_ptr() == base.data_ptr()
    first.fill_(1.5)
    assert torch.equal(base[:128].view(torch.float32), torch.full((32,), 1.5))
    recv_arena.record_stream(first, device.new_stream())
    recv_arena.record_stream(torch.zeros(1), device.new_stream())  # not arena memory: nothing to do
    del first
    gc.collect()
    assert arena.num_live_blocks == 0
    (again, _) = arena.allocate(parts, device.current_stream())
    assert again.data_ptr() == base.data_ptr()  # the released block, reused: its fences are complete
    freed = []
    assert arena.close(lambda: freed.append(True)) is False
    del again
    gc.collect()
    assert freed == [True]


def _buffer_under_emulation(rank: int, num_ranks: int) -> dict:
    """A Buffer on CPU tensors with DEEP_EP_PY_EMULATE_DEVICE=1: they are the kernels' tensors, so calls take the
    stream path (stand-in streams and events) and give the reference's results."""
    import deep_ep_py
    from deep_ep_py import device as ep_device
    from deep_ep_py._ext import gpu_available
    from deep_ep_py.backends.reference import ReferenceBackend

    group = dist.group.WORLD
    chosen = deep_ep_py.Buffer(group).backend
    buffer = deep_ep_py.Buffer(group, 1 << 22, backend="reference")
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(12, 64, generator=gen).to(torch.bfloat16)
    topk_idx = torch.randn(12, 4, generator=gen).topk(2).indices
    weights = torch.rand(12, 2, generator=gen)
    per_rank, _, per_expert, in_rank, layout_event = buffer.get_dispatch_layout(topk_idx, 4, async_finish=True)
    recv_x, _, recv_w, _, handle, event = buffer.dispatch(
        x,
        num_tokens_per_rank=per_rank,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        topk_idx=topk_idx,
        topk_weights=weights,
        previous_event=layout_event,
        async_finish=True,
    )
    event.current_stream_wait()
    combined, _, _ = buffer.combine(recv_x, handle, recv_w)
    reference = ReferenceBackend(group, buffer.topology)
    config = buffer.get_dispatch_config(num_ranks)
    want = reference.dispatch(x, None, None, in_rank, per_rank, per_expert, topk_idx, weights, 1, 0, config=config)
    want_combined, _ = reference.combine(want[0], want[5], want[3], (), config=config)
    return {
        "backend": chosen,
        "expected_backend": "cuda" if gpu_available() else "reference",
        "stream": type(buffer.get_comm_stream()).__name__,
        "events": [type(e.event.event).__name__ for e in (layout_event, event)],
        "same": torch.equal(recv_x, want[0]) and torch.equal(combined, want_combined),
        "kernel_tensor": ep_device.is_kernel_tensor(recv_x),
    }


def test_buffer_under_emulation_runs_cpu_tensors_on_stand_in_streams():
    for result in launch(_buffer_under_emulation, 2, env={EMULATE: "1"}, timeout_s=120.0):
        assert result["backend"] == result["expected_backend"], result
        assert result["stream"] == "CpuStream" and result["events"] == ["CpuEvent", "CpuEvent"], result
        assert result["same"] and result["kernel_tensor"], result
