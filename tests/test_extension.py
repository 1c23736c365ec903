"""The compiled extension deep_ep_py._C: loading, error translation, host-side timeouts. Runs without a GPU.

Skipped when the package was installed without its extension, unless DEEP_EP_PY_EXPECT_KERNELS=1 (CI builds with
nvcc and sets it), in which case a missing extension fails.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from deep_ep_py import _ext
from deep_ep_py.errors import DeepEPError, DeepEPTimeoutError

EXPECT_KERNELS = os.environ.get("DEEP_EP_PY_EXPECT_KERNELS") == "1"


@pytest.fixture(scope="module")
def ext():
    if not _ext.has_kernels():
        if EXPECT_KERNELS:
            pytest.fail(f"DEEP_EP_PY_EXPECT_KERNELS=1 but: {_ext.kernels_unavailable_reason()}")
        pytest.skip(f"CUDA extension not built: {_ext.kernels_unavailable_reason()}")
    return _ext.load_extension()


def test_ext_helpers_never_raise():
    assert isinstance(_ext.has_kernels(), bool)
    assert isinstance(_ext.kernels_unavailable_reason(), str)
    assert isinstance(_ext.gpu_available(), bool)
    assert (_ext.kernels_unavailable_reason() == "") == _ext.has_kernels()


def test_kernels_built_when_expected():
    if not EXPECT_KERNELS:
        pytest.skip("DEEP_EP_PY_EXPECT_KERNELS is not 1")
    assert _ext.has_kernels(), _ext.kernels_unavailable_reason()
    # Without it the GPU tier would skip on a machine with no GPU instead of running on the CPU emulator.
    assert _ext.emulator_available(), _ext.emulator_unavailable_reason()


def test_timeout_error_is_a_deep_ep_error_and_a_timeout_error():
    assert issubclass(DeepEPTimeoutError, DeepEPError)
    assert issubclass(DeepEPTimeoutError, TimeoutError)
    assert issubclass(DeepEPError, RuntimeError)


def test_no_gpu_is_reported_not_raised(ext):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert ext.device_count() == 0
    assert "no GPU" in ext.gpu_status()
    assert not _ext.gpu_available()


def test_cuda_failure_raises_deep_ep_error_without_gpu(ext):
    if ext.device_count() > 0:
        pytest.skip("a GPU is visible")
    with pytest.raises(DeepEPError, match="CUDA error"):
        ext.HostCounters(4)


def test_host_assert_message_carries_values(ext):
    with pytest.raises(DeepEPError) as info:
        ext._test_host_assert(12345, 67890)
    message = str(info.value)
    assert "12345" in message and "67890" in message
    assert "a == b" in message
    assert "csrc/" in message  # file:line of the check
    assert not isinstance(info.value, TimeoutError)
    ext._test_host_assert(7, 7)


def test_host_timeout_raises_naming_what_it_waited_for(ext):
    start = time.monotonic()
    with pytest.raises(DeepEPTimeoutError, match="counter X") as info:
        ext._test_host_timeout(0.2, "counter X")
    elapsed = time.monotonic() - start
    assert isinstance(info.value, TimeoutError)
    assert 0.2 <= elapsed < 5.0


def test_host_timeout_releases_the_gil(ext):
    errors = []

    def wait():
        try:
            ext._test_host_timeout(0.5, "gil check")
        except DeepEPTimeoutError as exc:
            errors.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    num_steps = 0
    while waiter.is_alive():  # runs only if the waiting thread let go of the GIL
        num_steps += 1
        time.sleep(0.001)
    waiter.join()
    assert len(errors) == 1
    assert num_steps > 10


# Mangled C++ namespaces of libtorch (at::, c10::, torch::): an extension that references none of them, nor links a
# torch library, works with whichever torch is installed, which is what lets one build serve every torch version.
_TORCH_SYMBOL_PREFIXES = ("_ZN2at", "_ZN3c10", "_ZN5torch", "_ZNK2at", "_ZNK3c10", "_ZNK5torch")


@pytest.mark.parametrize("name", ["deep_ep_py._C", "deep_ep_py._C_emu"])
def test_extension_does_not_link_torch(name):
    import shutil
    import subprocess

    module = _ext._load(name)
    if module is None:
        if EXPECT_KERNELS:
            pytest.fail(f"DEEP_EP_PY_EXPECT_KERNELS=1 but {name} is not built")
        pytest.skip(f"{name} is not built")
    if shutil.which("readelf") is None or shutil.which("nm") is None:
        pytest.skip("binutils (readelf, nm) not installed")
    path = module.__file__
    dynamic = subprocess.run(["readelf", "-d", path], capture_output=True, text=True, check=True).stdout
    needed = [line.split("[", 1)[1].rstrip("]") for line in dynamic.splitlines() if "(NEEDED)" in line]
    assert needed, f"readelf listed no NEEDED libraries of {path}:\n{dynamic}"
    torch_libraries = [lib for lib in needed if lib.startswith(("libtorch", "libc10"))]
    assert not torch_libraries, f"{name} links {torch_libraries}: it would be tied to one torch version"
    undefined = subprocess.run(["nm", "-D", "--undefined-only", path], capture_output=True, text=True, check=True)
    symbols = [line.split()[-1] for line in undefined.stdout.splitlines() if line.strip()]
    assert symbols, f"nm listed no undefined symbols of {path}"
    from_torch = [symbol for symbol in symbols if symbol.startswith(_TORCH_SYMBOL_PREFIXES)]
    assert not from_torch, f"{name} needs torch symbols {from_torch[:5]}: it would be tied to one torch version"


def test_build_info(ext):
    info = ext.build_info()
    for key in ("cuda_version", "cuda_archs", "nvshmem_version"):
        assert isinstance(info[key], str) and info[key], key


def test_nvshmem_versions(ext):
    def as_tuple(version):
        return tuple(int(part) for part in version.split("."))

    assert ext.nvshmem_compiled_version() == ext.build_info()["nvshmem_version"]
    # The device library linked in must not be newer than the host library loaded now.
    assert as_tuple(ext.nvshmem_compiled_version()) <= as_tuple(ext.nvshmem_host_version())
    ext.nvshmem_check_version()
    assert not ext.nvshmem_is_initialized()
    with pytest.raises(DeepEPError, match="nvshmem_init"):
        ext.nvshmem_my_pe()


@pytest.mark.parametrize(
    "num_topk, num_experts, num_ranks, num_ranks_per_node, expected",
    [
        (33, 64, 8, 8, "num_topk <= kMaxNumTopk"),
        (8, 60, 8, 8, "num_experts % num_ranks"),
        (8, 96, 12, 8, "num_ranks % num_ranks_per_node"),
    ],
)
def test_layout_rejects_bad_shapes_before_any_launch(
    ext, num_topk, num_experts, num_ranks, num_ranks_per_node, expected
):
    with pytest.raises(DeepEPError, match=expected.replace("%", ".")):
        # Fake non-null pointers: the checks run before anything touches them.
        ext.get_dispatch_layout(8, 4, num_topk, num_experts, num_ranks, num_ranks_per_node, 8, 8, 8, 8, 0)


@pytest.mark.gpu
def test_device_timeout_becomes_an_exception(ext):
    if not _ext.gpu_available():
        pytest.skip("no GPU")
    torch = pytest.importorskip("torch")
    record = ext.ErrorRecord()
    assert not record.has_error()
    record.check("before the launch")  # no error: does not raise
    ext.launch_timeout_self_test(record.device_ptr, 0.2, 3, 5, torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    assert record.has_error()
    with pytest.raises(DeepEPTimeoutError, match=r"rank 3, channel 5.*self-test.*noticed by the test"):
        record.check("the test")
    record.reset()
    assert not record.has_error()


@pytest.mark.gpu
def test_host_counters(ext):
    if not _ext.gpu_available():
        pytest.skip("no GPU")
    counters = ext.HostCounters(4)
    assert len(counters) == 4 and counters.device_ptr != 0
    assert [counters.get(i) for i in range(4)] == [0, 0, 0, 0]
    counters.set(2, 5)
    assert counters.get(2) == 5
    assert counters.get_range(1, 3) == [0, 5, 0] and counters.get_range(4, 0) == []
    counters.wait_eq(2, 5, 1.0, "counter 2")
    with pytest.raises(DeepEPTimeoutError, match="counter 3"):
        counters.wait_eq(3, 1, 0.1, "counter 3")
    # Equality, not >=: a counter past the value (a sequence number from before a wrap) is not it.
    with pytest.raises(DeepEPTimeoutError, match="counter 2"):
        counters.wait_eq(2, 4, 0.1, "counter 2")
    with pytest.raises(DeepEPError, match="out of range"):
        counters.get(4)
    with pytest.raises(DeepEPError, match="out of range"):
        counters.get_range(2, 3)


@pytest.mark.parametrize(
    ("num_ranks", "num_nodes", "hidden", "num_topk"),
    [(4, 2, 256, 4), (8, 2, 7168, 8), (8, 4, 128, 16), (2, 2, 8, 1), (16, 2, 4096, 24)],
)
def test_internode_buffer_sizes_agree(ext, num_ranks, num_nodes, hidden, num_topk):
    """The internode size functions (csrc/internode/buffer_layout.hpp) agree with one another: the bytes that
    internode_min_bytes gives for B rows per round hold exactly B rows, one byte less holds B - 1, and every
    dispatch row (bf16 or fp8) and combine row of this hidden and top-k fits the strides a handle reserves."""
    layout = ext.internode_layout(num_ranks, num_nodes)
    for rows in (1, 3, 64):
        num_bytes = ext.internode_min_bytes(num_ranks, num_nodes, hidden, num_topk, rows)
        assert num_bytes > layout["control_bytes"]
        assert ext.internode_rows_per_round(num_bytes, num_ranks, num_nodes, hidden, num_topk) == rows
        assert ext.internode_rows_per_round(num_bytes - 1, num_ranks, num_nodes, hidden, num_topk) == rows - 1
    assert ext.internode_rows_per_round(layout["control_bytes"], num_ranks, num_nodes, hidden, num_topk) == 0
    dispatch_stride, combine_stride = ext.internode_strides(hidden, num_topk, num_ranks // num_nodes)
    # A bf16 row: payload, fp8 scales (reserved for a cached fp8 dispatch), source index, mask, P ordinals, top-k.
    num_scales = -(-hidden // 128)
    reserved_topk = max(num_topk, 16)
    assert dispatch_stride >= 2 * hidden + 4 * num_scales + 8 + 4 * (num_ranks // num_nodes) + 12 * reserved_topk
    assert dispatch_stride % 16 == 0
    assert ext.internode_combine_row_bytes(hidden, reserved_topk) == combine_stride
    assert ext.internode_combine_row_bytes(hidden, num_topk) <= combine_stride
