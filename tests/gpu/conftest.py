"""GPU tier: options shared by tests/gpu.

Every test here is marked ``gpu`` and skips unless the kernels are built and a CUDA device is visible
(``deep_ep_py._ext.gpu_available()``); with DEEP_EP_PY_EXPECT_GPU=1 (scripts/gpu_check.sh sets it) a missing GPU
fails instead, so a broken build cannot pass as "all skipped". Multi-rank tests take a ``num_ranks`` argument,
parametrized from DEEP_EP_PY_GPU_TEST_RANKS (rank counts separated by spaces or commas; default "2"); the ranks
run on one GPU under MPS through ``launch(device="cuda")``, which starts the MPS daemon when it can.
"""

from __future__ import annotations

import contextlib
import os

import pytest

from deep_ep_py import _ext
from deep_ep_py.testing import mps


def gpu_test_ranks() -> list[int]:
    text = os.environ.get("DEEP_EP_PY_GPU_TEST_RANKS", "2")
    try:
        ranks = [int(part) for part in text.replace(",", " ").split()]
    except ValueError as exc:
        raise pytest.UsageError(f"DEEP_EP_PY_GPU_TEST_RANKS: expected rank counts like '2 4 8', got {text!r}") from exc
    if not ranks or any(r < 1 for r in ranks):
        raise pytest.UsageError(f"DEEP_EP_PY_GPU_TEST_RANKS: expected positive rank counts, got {text!r}")
    return ranks


def _parametrizes(metafunc, name: str) -> bool:
    for marker in metafunc.definition.iter_markers("parametrize"):
        argnames = marker.args[0] if marker.args else marker.kwargs.get("argnames", "")
        names = argnames.replace(" ", "").split(",") if isinstance(argnames, str) else list(argnames)
        if name in names:
            return True
    return False


def pytest_generate_tests(metafunc):
    # A test that parametrizes num_ranks itself (a kernel argument, not a process count) keeps its own values.
    if "num_ranks" in metafunc.fixturenames and not _parametrizes(metafunc, "num_ranks"):
        metafunc.parametrize("num_ranks", gpu_test_ranks(), ids=lambda n: f"{n}ranks")


@pytest.fixture(scope="session", autouse=True)
def _mps_before_any_cuda_context():
    """Bring MPS up (when ranks will share a GPU and this process may start it) before any test of this session
    creates a CUDA context in this process: the daemon must be there before the GPU's first context. Failing here
    is left to the multi-rank launches, which raise with the reason."""
    extension = _ext.load_extension()
    if extension is None or not _ext.gpu_available():
        return
    if max(gpu_test_ranks()) > extension.device_count():
        with contextlib.suppress(mps.MPSUnavailableError):
            mps.ensure_mps(allowed=True)


@pytest.fixture
def require_gpu():
    """Skip (or fail, under DEEP_EP_PY_EXPECT_GPU=1) unless the kernels are built and a GPU is visible."""
    if not _ext.gpu_available():
        reason = _ext.kernels_unavailable_reason() or "no CUDA device"
        extension = _ext.load_extension()
        if extension is not None:
            reason = extension.gpu_status()
        if os.environ.get("DEEP_EP_PY_EXPECT_GPU") == "1":
            pytest.fail(f"DEEP_EP_PY_EXPECT_GPU=1 but the GPU tier cannot run: {reason}")
        pytest.skip(f"GPU tier: {reason}")
