"""deep_ep_py.runtime and the _C runtime on N ranks sharing the GPU (launch(device="cuda"), under MPS), or on the CPU
emulator of the kernels (launch(device="emulated"): _C_emu's runtime, IPC and NVSHMEM on host memory).

Each test runs its whole check sequence in one launch; a rank raises AssertionError with the values seen. A
failing rank raises at once rather than entering a collective, so the launcher reports it instead of a hang.
"""

from __future__ import annotations

import os
import threading
import time

import pytest
from kernel_device import tier_device

from deep_ep_py import device as ep_device
from deep_ep_py.testing import launch

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")

# Seconds a device or host wait may take before the tests expect a timeout error; and the bound on how long the
# error may take to surface (spawned ranks share the GPU, so generous).
WAIT_TIMEOUT_S = 0.5
SURFACE_BOUND_S = 10.0


def _expect_raises(exc_type, fn, *args, match: str = ""):
    try:
        fn(*args)
    except exc_type as exc:
        assert match in str(exc), f"expected {match!r} in the message of {exc_type.__name__}: {exc}"
        return exc
    raise AssertionError(f"{getattr(fn, '__name__', fn)}{args} did not raise {exc_type.__name__}")


def _pattern(rank: int, num_ints: int) -> torch.Tensor:
    """int32 [num_ints] on the kernels' device (the current CUDA device), different for every rank and every
    position."""
    return torch.arange(num_ints, dtype=torch.int32, device=ep_device.kernel_device()) * 7 + rank * 1_000_003


def _check_cuda_usable() -> None:
    """The CUDA context still works after the test (a torch op on the GPU). Nothing under the emulator: it has no
    CUDA context."""
    if ep_device.emulated():
        return
    values = torch.arange(1000, dtype=torch.float32, device="cuda")
    total = values.sum().item()
    assert total == 499500.0, f"a torch op after the test gave {total}, expected 499500"


def _peer_mapped_worker(rank: int, num_ranks: int, num_ranks_per_node: int) -> list[int]:
    import torch.distributed as dist

    from deep_ep_py.errors import DeepEPError
    from deep_ep_py.runtime import PeerMappedBuffer

    node_start = rank // num_ranks_per_node * num_ranks_per_node
    node_ranks = list(range(node_start, min(node_start + num_ranks_per_node, num_ranks)))
    num_ints = 4099  # not a power of two
    num_bytes = num_ints * 4
    buffer = PeerMappedBuffer(None, num_bytes, node_ranks)
    assert buffer.num_bytes == num_bytes and buffer.rank == rank and buffer.num_ranks == num_ranks
    assert buffer.local_ptr != 0 and buffer.peer_ptrs[rank] == buffer.local_ptr, (buffer.local_ptr, buffer.peer_ptrs)
    for peer, peer_ptr in enumerate(buffer.peer_ptrs):
        assert (peer_ptr != 0) == (peer in node_ranks), f"rank {rank}: peer_ptrs {buffer.peer_ptrs}, node {node_ranks}"
    mapped = [ptr for ptr in buffer.peer_ptrs if ptr]
    assert len(set(mapped)) == len(mapped), f"rank {rank}: two peers mapped at one address: {buffer.peer_ptrs}"

    # ipc_malloc zeroes: every mapped buffer reads zero before anyone writes.
    for peer in node_ranks:
        num_nonzero = buffer.view(peer).count_nonzero().item()
        assert num_nonzero == 0, f"rank {rank}: rank {peer}'s fresh buffer has {num_nonzero} non-zero bytes"
    dist.barrier()
    buffer.view().view(torch.int32).copy_(_pattern(rank, num_ints))
    ep_device.synchronize()
    dist.barrier()
    for peer in node_ranks:
        seen = buffer.view(peer).view(torch.int32).cpu()
        expected = _pattern(peer, num_ints).cpu()
        if not torch.equal(seen, expected):
            bad = (seen != expected).nonzero().flatten()[:8].tolist()
            raise AssertionError(
                f"rank {rank} reading rank {peer}'s buffer: mismatch at int32 {bad}: {seen[bad].tolist()} "
                f"!= {expected[bad].tolist()}"
            )
    buffer.close()
    buffer.close()  # idempotent
    assert buffer.local_ptr == 0 and not any(buffer.peer_ptrs), (buffer.local_ptr, buffer.peer_ptrs)

    # Ranks that disagree on the size all fail, with a message naming the mismatch, and nobody hangs.
    _expect_raises(DeepEPError, PeerMappedBuffer, None, 1024 + 4 * (rank == 0), None, match="passed other")
    dist.barrier()
    _check_cuda_usable()
    return node_ranks


@pytest.mark.parametrize("layout", ["one_node", "pairs"])
def test_peer_mapped_buffer(require_gpu, num_ranks, layout, launch_timeout_s):
    num_ranks_per_node = num_ranks if layout == "one_node" else 2
    results = launch(
        _peer_mapped_worker, num_ranks, num_ranks_per_node, device=tier_device(), timeout_s=launch_timeout_s
    )
    for rank, node_ranks in enumerate(results):
        # Nodes of num_ranks_per_node consecutive ranks; with an odd rank count the last "pair" is one rank.
        node_start = rank // num_ranks_per_node * num_ranks_per_node
        assert node_ranks == list(range(node_start, min(node_start + num_ranks_per_node, num_ranks))), node_ranks


def _host_counters_worker(rank: int, num_ranks: int) -> float:
    from deep_ep_py import _ext
    from deep_ep_py.errors import DeepEPError, DeepEPTimeoutError

    ext = _ext.load_extension()
    counters = ext.HostCounters(4)
    assert len(counters) == 4 and counters.device_ptr != 0 and counters.host_ptr != 0
    assert [counters.get(i) for i in range(4)] == [0, 0, 0, 0]
    counters.set(2, 5 + rank)
    assert counters.get(2) == 5 + rank
    assert counters.get_range(1, 3) == [0, 5 + rank, 0] and counters.get_range(4, 0) == []
    _expect_raises(DeepEPError, counters.get_range, 2, 3, match="out of range")
    counters.wait_eq(2, 5 + rank, 1.0, "counter 2")  # already there: returns at once
    # Equality, not >=: a counter past the value (a sequence number from before a wrap) is not it.
    _expect_raises(DeepEPTimeoutError, counters.wait_eq, 2, 4 + rank, WAIT_TIMEOUT_S, "counter 2", match="counter 2")

    start = time.monotonic()
    what = f"counter 3 of rank {rank}"
    _expect_raises(DeepEPTimeoutError, counters.wait_eq, 3, 1, WAIT_TIMEOUT_S, what, match=what)
    elapsed = time.monotonic() - start
    assert WAIT_TIMEOUT_S <= elapsed < SURFACE_BOUND_S, f"rank {rank}: timeout after {elapsed:.2f} s"

    # Released by another host thread while waiting (wait_eq lets go of the GIL).
    setter = threading.Timer(0.1, counters.set, (1, 7))
    start = time.monotonic()
    setter.start()
    counters.wait_eq(1, 7, SURFACE_BOUND_S, "counter 1")
    setter.join()
    released_after = time.monotonic() - start
    _expect_raises(DeepEPError, counters.get, 4, match="out of range")
    _check_cuda_usable()
    return released_after


def test_host_counters(require_gpu, num_ranks, launch_timeout_s):
    results = launch(_host_counters_worker, num_ranks, device=tier_device(), timeout_s=launch_timeout_s)
    assert all(0.05 <= released_after < SURFACE_BOUND_S for released_after in results), results


def _device_timeout_worker(rank: int, num_ranks: int) -> float:
    from deep_ep_py import _ext
    from deep_ep_py.errors import DeepEPTimeoutError

    ext = _ext.load_extension()
    record = ext.ErrorRecord()
    assert not record.has_error()
    record.check("before the launch")  # nothing recorded: no raise
    channel = 10 + rank
    start = time.monotonic()
    ext.launch_timeout_self_test(
        record.device_ptr, WAIT_TIMEOUT_S, rank, channel, ep_device.current_stream().cuda_stream
    )
    ep_device.synchronize()
    elapsed = time.monotonic() - start
    assert elapsed < SURFACE_BOUND_S, f"rank {rank}: the device wait took {elapsed:.2f} s to time out"
    assert record.has_error(), f"rank {rank}: the self-test kernel finished without recording a timeout"
    exc = _expect_raises(DeepEPTimeoutError, record.check, "the GPU test", match=f"rank {rank}, channel {channel}")
    assert "noticed by the GPU test" in str(exc), str(exc)
    record.reset()
    assert not record.has_error()
    _check_cuda_usable()  # a timed-out wait leaves the context usable
    return elapsed


def test_device_timeout_becomes_an_exception(require_gpu, num_ranks, launch_timeout_s):
    # Under 10 timeouts: the kernel's second wait, given 100, drained with the first.
    results = launch(_device_timeout_worker, num_ranks, device=tier_device(), timeout_s=launch_timeout_s)
    assert all(WAIT_TIMEOUT_S * 0.5 <= elapsed < WAIT_TIMEOUT_S * 10 for elapsed in results), results


def _wait_after_capacity_record_worker(rank: int, num_ranks: int) -> float:
    from deep_ep_py import _ext
    from deep_ep_py.errors import DeepEPError, DeepEPTimeoutError

    ext = _ext.load_extension()
    record = ext.ErrorRecord()
    start = time.monotonic()
    ext.launch_timeout_self_test(
        record.device_ptr, WAIT_TIMEOUT_S, rank, 0, ep_device.current_stream().cuda_stream, capacity_record_first=True
    )
    ep_device.synchronize()
    elapsed = time.monotonic() - start
    # The first failure is what the host reports: the capacity record, not the timeout that followed it.
    exc = _expect_raises(DeepEPError, record.check, "the GPU test", match="num_worst_tokens")
    assert not isinstance(exc, DeepEPTimeoutError), str(exc)
    assert f"rank {rank} receives 2 rows, more than the 1 given" in str(exc), str(exc)
    assert "a device wait timed out after it too" in str(exc), str(exc)
    return elapsed


def test_capacity_record_does_not_cut_device_waits_short(require_gpu, num_ranks, launch_timeout_s):
    """A rank whose notify found num_worst_tokens too small goes on within the capacity: its later waits for its
    peers must still wait (until the timeout here, since nothing comes), not give up at the record's first poll, or
    it would leave a barrier before its peers and write into staging they are still reading. And once one wait
    times out, the kernel's other (100 times longer) wait drains with it although the capacity record holds the
    record's code."""
    results = launch(_wait_after_capacity_record_worker, num_ranks, device=tier_device(), timeout_s=launch_timeout_s)
    assert all(WAIT_TIMEOUT_S * 0.9 <= elapsed < WAIT_TIMEOUT_S * 10 for elapsed in results), results


# A process of its own that makes one kernel record an error with trap_on_error set, then reports what its host saw.
# `failure` picks the recorder: a device wait that times out, or a top-k id out of range (a value record).
_TRAP_CHILD = """
import os
import sys
import torch
from deep_ep_py import _ext, device as ep_device
from deep_ep_py.errors import DeepEPError

ext = _ext.load_extension()
record = ext.ErrorRecord()
stream = ep_device.current_stream().cuda_stream
if sys.argv[1] == "timeout":
    ext.launch_timeout_self_test(record.device_ptr, 0.2, 3, 5, stream, trap_on_error=True)
else:
    device = ep_device.kernel_device()
    topk_idx = torch.tensor([[0, 1], [2, 99]], dtype=torch.int64, device=device)
    outputs = [torch.empty(n, dtype=dtype, device=device) for n, dtype in ((2, torch.int32), (4, torch.int32),
                                                                           (4, torch.bool))]
    ext.get_dispatch_layout(topk_idx.data_ptr(), 2, 2, 4, 2, 2, outputs[0].data_ptr(), 0, outputs[1].data_ptr(),
                            outputs[2].data_ptr(), stream, record.device_ptr, 3, trap_on_error=True)
try:
    ep_device.synchronize()
    print("synchronize returned", flush=True)
except RuntimeError as exc:  # the trap ended the CUDA context
    print("synchronize raised:", str(exc).splitlines()[0], flush=True)
try:
    record.check("the trap test")
except DeepEPError as exc:  # the host-mapped record outlives the context
    print("record says:", exc, flush=True)
    os._exit(3)  # not sys.exit: no teardown that touches the dead context
os._exit(0)
"""


@pytest.mark.parametrize(
    "failure, printed",
    [
        ("timeout", "a wait timed out (or gave up after an earlier timeout) (rank 3, channel 5, wait site 1,"),
        ("invalid_id", "an input value is out of range (rank 3, channel 1, wait site 42, value 99, bound 4)"),
    ],
)
def test_trap_on_device_error_ends_the_process(require_gpu, tmp_path, failure, printed):
    """trap_on_error (what a launch captured into a CUDA graph gets, DEEP_EP_PY_TRAP_ON_DEVICE_ERROR): the kernel
    prints what it recorded and traps, so no replay returns a drained kernel's rows unseen. On a GPU the context ends
    (synchronize raises) and the host-mapped record still names the failure; the emulator ends the process. The child
    runs outside MPS (an empty pipe directory), since a fatal fault under MPS reaches every client of the GPU."""
    import subprocess
    import sys

    env = dict(os.environ, CUDA_MPS_PIPE_DIRECTORY=str(tmp_path))
    child = subprocess.run(
        [sys.executable, "-c", _TRAP_CHILD, failure], env=env, capture_output=True, text=True, timeout=120
    )
    output = child.stdout + child.stderr
    assert f"deep_ep_py: {printed}" in output and "trapping" in output, output
    assert "synchronize returned" not in output, output
    if ep_device.emulated():
        assert child.returncode < 0, (child.returncode, output)  # the emulator's trap: abort()
        return
    assert child.returncode == 3, (child.returncode, output)
    assert "synchronize raised" in output, output
    named = "rank 3, channel 5" if failure == "timeout" else "topk_idx of get_dispatch_layout"
    assert named in output.split("record says:", 1)[-1], output


def _check_heap_grows(open_context, context_type, bytes_view, num_ranks: int) -> None:
    """Where CUDA VMM is on, NVSHMEM maps more memory into the heap on demand: a context that asks for the whole
    heap NVSHMEM started with, beside one already open, gets it, zeroed, and every PE reaches its last bytes (which
    lie past the start size) through nvshmem_ptr. That is why the library checks room against
    NVSHMEM_MAX_MEMORY_PER_GPU there, not NVSHMEM_SYMMETRIC_SIZE."""
    from deep_ep_py.runtime import NVSHMEM_DEFAULT_SYMMETRIC_BYTES, parse_nvshmem_size

    start_bytes = parse_nvshmem_size(os.environ.get("NVSHMEM_SYMMETRIC_SIZE", str(NVSHMEM_DEFAULT_SYMMETRIC_BYTES)))
    assert start_bytes is not None
    grown = context_type(None, num_symmetric_bytes=start_bytes)
    ptr = grown.malloc(start_bytes)
    num_nonzero = bytes_view(ptr, start_bytes).count_nonzero().item()
    assert num_nonzero == 0, f"PE {open_context.rank}: a heap grown by {start_bytes} bytes has {num_nonzero} non-zero"
    tail_ints = 1024
    tail_offset = start_bytes - 4 * tail_ints
    bytes_view(ptr + tail_offset, 4 * tail_ints).view(torch.int32).copy_(_pattern(open_context.rank, tail_ints))
    ep_device.synchronize()
    grown.barrier()
    for pe in range(num_ranks):
        seen = bytes_view(grown.peer_ptr(ptr, pe) + tail_offset, 4 * tail_ints).view(torch.int32).cpu()
        if not torch.equal(seen, _pattern(pe, tail_ints).cpu()):
            raise AssertionError(f"PE {open_context.rank}: PE {pe}'s bytes past the heap's start size differ")
    grown.barrier()
    grown.finalize()


def _nvshmem_worker(rank: int, num_ranks: int) -> dict:
    import torch.distributed as dist

    from deep_ep_py import _ext, runtime
    from deep_ep_py.errors import DeepEPError
    from deep_ep_py.runtime import (
        NvshmemContext,
        device_bytes_view,
        finalize_nvshmem,
    )

    ext = _ext.load_extension()
    num_ints = 1 << 18  # 1 MiB
    num_bytes = num_ints * 4
    context = NvshmemContext(None, num_symmetric_bytes=num_bytes)
    assert ext.nvshmem_is_initialized()
    assert (context.rank, context.num_ranks) == (rank, num_ranks)
    assert (ext.nvshmem_my_pe(), ext.nvshmem_n_pes()) == (rank, num_ranks)
    assert "NVSHMEM_IB_ENABLE_IBGDA" not in context.env_set, context.env_set
    for key, value in context.env_set.items():
        assert os.environ[key] == value

    ptr = context.malloc(num_bytes)
    peer_ptrs = [context.peer_ptr(ptr, pe) for pe in range(num_ranks)]
    assert peer_ptrs[rank] == ptr, f"rank {rank}: nvshmem_ptr(own) {peer_ptrs[rank]:#x} != {ptr:#x}"
    assert all(peer_ptrs), f"rank {rank}: a peer on the same GPU is not P2P-mapped: {peer_ptrs}"

    num_nonzero = device_bytes_view(ptr, num_bytes).count_nonzero().item()
    assert num_nonzero == 0, f"rank {rank}: nvshmem_malloc left {num_nonzero} non-zero bytes"
    context.barrier()
    device_bytes_view(ptr, num_bytes).view(torch.int32).copy_(_pattern(rank, num_ints))
    ep_device.synchronize()
    context.barrier()
    for pe, peer_ptr in enumerate(peer_ptrs):
        seen = device_bytes_view(peer_ptr, num_bytes).view(torch.int32).cpu()
        if not torch.equal(seen, _pattern(pe, num_ints).cpu()):
            raise AssertionError(f"rank {rank}: PE {pe}'s symmetric buffer read through nvshmem_ptr differs")
    context.barrier()

    context.finalize()
    context.finalize()  # idempotent
    _expect_raises(DeepEPError, context.malloc, 64, match="finalized")
    # NVSHMEM stays up: it cannot start twice in one process (an init after a finalize reuses the first init's
    # bootstrap, undefined; the emulator refuses it). A later context over the same ranks, on another group object,
    # joins it with its heap and variables.
    assert ext.nvshmem_is_initialized()
    env_set = dict(context.env_set)
    for key, value in env_set.items():
        assert os.environ[key] == value
    again = NvshmemContext(dist.new_group(list(range(num_ranks))), num_symmetric_bytes=num_bytes)
    assert again.env_set == env_set, (again.env_set, env_set)
    ptr = again.malloc(num_bytes)
    assert device_bytes_view(ptr, num_bytes).count_nonzero().item() == 0, f"rank {rank}: a reused heap is not zeroed"
    again.barrier()
    if ep_device.emulated():  # NVSHMEM's own answer to a request past its heap is not ours to test on a GPU
        _expect_raises(DeepEPError, again.malloc, 1 << 40, match="The heap is sized once")
    if runtime._world.heap_grows:
        _check_heap_grows(again, NvshmemContext, device_bytes_view, num_ranks)
    # A context whose bytes do not fit beside the open ones' in the heap NVSHMEM sized at its start: refused on
    # every rank before any NVSHMEM call, not left to nvshmem_align.
    heap_bytes = runtime._world.heap_bytes
    if heap_bytes is not None:
        _expect_raises(DeepEPError, NvshmemContext, None, heap_bytes, match="do not fit")
    _expect_raises(DeepEPError, finalize_nvshmem, match="1 NvshmemContext(s) are still open")
    # A context over other ranks would get the running NVSHMEM's PE numbering: refused, naming both sets.
    subset = list(range(num_ranks - 1))
    subgroup = dist.new_group(subset)
    if rank in subset:
        _expect_raises(
            DeepEPError, NvshmemContext, subgroup, match=f"run it over global ranks {list(range(num_ranks))}"
        )
    again.finalize()

    assert finalize_nvshmem()
    assert not ext.nvshmem_is_initialized()
    assert not finalize_nvshmem()  # idempotent
    # The variables are taken back with NVSHMEM, so that they do not pass for the user's.
    left = {key: os.environ[key] for key in env_set if key in os.environ}
    assert not left, f"rank {rank}: finalize_nvshmem left the variables it set: {left}"
    # Every rank raises, before any NVSHMEM call.
    _expect_raises(DeepEPError, NvshmemContext, None, match="ended it (finalize_nvshmem)")
    _check_cuda_usable()
    return {"share_gpu": context.share_gpu, "env_set": env_set}


def test_nvshmem_context(require_gpu, num_ranks, launch_timeout_s):
    results = launch(_nvshmem_worker, num_ranks, device=tier_device(), timeout_s=launch_timeout_s)
    # The GPUs of this host, or under emulation (require_gpu selects it here too) the emulator's device.
    share_gpu = num_ranks > ep_device.device_count()
    for result in results:
        assert result["share_gpu"] == share_gpu, result
        assert "NVSHMEM_IB_ENABLE_IBGDA" not in result["env_set"], result
        if share_gpu and "NVSHMEM_IGNORE_CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" not in os.environ:
            assert result["env_set"]["NVSHMEM_IGNORE_CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "1", result
