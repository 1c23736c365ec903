"""GPU tier: options shared by tests/gpu.

Where the tier runs (``tier_device()``): on the GPU when the kernels are built and a CUDA device is visible
(``deep_ep_py._ext.gpu_available()``); else on the CPU emulator of the same kernels (``deep_ep_py._C_emu``, built next
to ``_C``; ranks launched with ``device="emulated"``, in-process tests with DEEP_EP_PY_EMULATE_DEVICE=1 for their
duration), where what a CPU cannot do (CUDA graphs, timings, the CUDA runtime itself) skips; else every test skips.
With DEEP_EP_PY_EXPECT_GPU=1 (scripts/gpu_check.sh sets it) anything but the GPU fails instead, so a broken build
cannot pass as "all skipped" or as emulated. DEEP_EP_PY_GPU_TIER=emulated picks the emulator even where a GPU is.
On the emulator each rank count's batches run a block's threads in its own order (emulated_schedule).

Multi-rank tests take a ``num_ranks`` argument, parametrized from DEEP_EP_PY_GPU_TEST_RANKS (rank counts separated
by spaces or commas; default "2"); on the GPU the ranks share it under MPS through ``launch(device="cuda")``, which
starts the MPS daemon when it can.

Table-driven cases run batched (deep_ep_py.testing.batch): every selected case of one module at one rank count (and
one environment) in one launch, fetched through the ``gpu_batch`` fixture; each pytest test asserts its own case's
outcome; a case that fails, hangs or breaks the CUDA context is reported on its own, by name and rank. Batches run
with DEEP_EP_PY_TIMEOUT_S=30 unless the environment sets it (scripts/gpu_check.sh sets 10 under MPS, else 30), so a
rank whose peer left a case gives up after that many seconds of waiting rather than the default 100. Tests that need a process of their own (an
absent peer with a short timeout) keep a launch each. A timing line per batch is printed at the end of the run.
"""

from __future__ import annotations

import contextlib
import functools
import os

import pytest

from deep_ep_py import _ext
from deep_ep_py.testing import mps
from deep_ep_py.testing.batch import TIMEOUT_ENV, BatchResult, launch_batch, selected_param_values

# Device wait timeout of batched cases when the environment does not set DEEP_EP_PY_TIMEOUT_S.
BATCH_DEVICE_TIMEOUT_S = "30"
TIER_ENV = "DEEP_EP_PY_GPU_TIER"
EMULATE_DEVICE_ENV = "DEEP_EP_PY_EMULATE_DEVICE"


@functools.cache
def tier_device() -> str | None:
    """ "cuda", "emulated" (the CPU emulator of the kernels), or None when neither can run the tier here. Decided
    once per session, before require_gpu sets DEEP_EP_PY_EMULATE_DEVICE (under which gpu_available() answers for
    the emulator)."""
    wants_emulator = os.environ.get(TIER_ENV) == "emulated" or _ext.emulated()
    if not wants_emulator and _ext.gpu_available():
        return "cuda"
    if _ext.emulator_available():
        return "emulated"
    return None


def emulated_tier() -> bool:
    """Whether this session's GPU tier runs on the CPU emulator (what it cannot do then skips)."""
    return tier_device() == "emulated"


def _tier_unavailable_reason() -> str:
    if os.environ.get(TIER_ENV) == "emulated":
        return f"{TIER_ENV}=emulated but the CPU emulator is not built: {_ext.emulator_unavailable_reason()}"
    reason = _ext.kernels_unavailable_reason() or "no CUDA device"
    extension = _ext.load_extension()
    if extension is not None:
        reason = extension.gpu_status()
    return f"{reason}; and the CPU emulator: {_ext.emulator_unavailable_reason()}"


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
    from deep_ep_py.testing.launcher import mps_wanted

    if tier_device() != "cuda" or not mps_wanted(None):
        return
    extension = _ext.load_extension()
    if max(gpu_test_ranks()) > extension.device_count():
        with contextlib.suppress(mps.MPSUnavailableError):
            mps.ensure_mps(allowed=True)


@pytest.fixture
def require_gpu(monkeypatch):
    """Skip (or fail, under DEEP_EP_PY_EXPECT_GPU=1) unless the tier can run here (tier_device()). On the emulator
    the test itself runs with DEEP_EP_PY_EMULATE_DEVICE=1, so what it does in this process uses the emulator too."""
    device = tier_device()
    if os.environ.get("DEEP_EP_PY_EXPECT_GPU") == "1" and device != "cuda":
        pytest.fail(f"DEEP_EP_PY_EXPECT_GPU=1 but the GPU tier cannot run on a GPU: {_tier_unavailable_reason()}")
    if device is None:
        pytest.skip(f"GPU tier: {_tier_unavailable_reason()}")
    if device == "emulated":
        monkeypatch.setenv(EMULATE_DEVICE_ENV, "1")


@pytest.fixture
def require_gpu_hardware(require_gpu):
    """For what the CPU emulator cannot do (CUDA graphs, the CUDA runtime itself): skip on the emulator."""
    if emulated_tier():
        pytest.skip("needs a GPU: not something the CPU emulator of the kernels can do")


SCHEDULE_ENV = "DEEP_EP_PY_EMULATE_SCHEDULE"


def emulated_schedule(num_ranks: int) -> dict[str, str]:
    """On the emulator, the order a block's threads run in between barriers, by rank count, where the environment
    does not set it: forward at 2 ranks, reverse at 4, random (seeded by the rank count) beyond. Each rank count
    then also checks the kernels against a missing __syncthreads from another side, at no extra cost."""
    if tier_device() != "emulated" or os.environ.get(SCHEDULE_ENV):
        return {}
    if num_ranks <= 2:
        return {SCHEDULE_ENV: "forward"}
    if num_ranks <= 4:
        return {SCHEDULE_ENV: "reverse"}
    return {SCHEDULE_ENV: "random", "DEEP_EP_PY_EMULATE_SEED": str(num_ranks)}


def gpu_batch_env(extra: dict[str, str] | None = None, num_ranks: int = 0) -> dict[str, str]:
    """The environment of a batch launch: DEEP_EP_PY_TIMEOUT_S (the environment's, else 30), the emulator's thread
    order for num_ranks, and `extra`."""
    return {
        TIMEOUT_ENV: os.environ.get(TIMEOUT_ENV) or BATCH_DEVICE_TIMEOUT_S,
        **emulated_schedule(num_ranks),
        **(extra or {}),
    }


# (module, key, BatchResult) of every batch this session launched, for the timing summary at the end.
_BATCHES_RUN: list[tuple[str, object, BatchResult]] = []


@pytest.fixture(scope="module")
def _gpu_batch_results() -> dict:
    return {}


def pytest_terminal_summary(terminalreporter):
    """One line per batch: cases, outcomes and time (what the GPU session's time budget is spent on)."""
    if not _BATCHES_RUN:
        return
    terminalreporter.section("GPU batches")
    for module, key, result in _BATCHES_RUN:
        statuses = [outcome.status for outcome in result.outcomes.values()]
        counts = ", ".join(f"{statuses.count(s)} {s}" for s in ("passed", "failed", "not_run") if statuses.count(s))
        slowest = sorted(result.outcomes.values(), key=lambda o: -o.seconds)[:3]
        terminalreporter.write_line(
            f"{module} {key}: {len(statuses)} cases ({counts}) in {result.seconds:.1f} s; slowest: "
            + ", ".join(f"{o.name} {o.seconds:.1f} s" for o in slowest)
            + (f"; launch error: {result.launch_error.strip().splitlines()[-1]}" if result.launch_error else "")
        )


@pytest.fixture
def gpu_batch(request, _gpu_batch_results, launch_timeout_s):
    """gpu_batch(key, make_cases, num_ranks, env=None, **launch_batch_kwargs) -> BatchResult, launched once per
    module and key. make_cases(selected) builds the BatchCase list, where selected(test_name, argname, **fixed)
    gives the values of `argname` among this module's selected tests of that name (so -k runs only what it picks)."""

    def selected(test_name: str, argname: str, **fixed):
        return selected_param_values(request.session.items, request.module, test_name, argname, fixed)

    def run(key, make_cases, num_ranks: int, env: dict[str, str] | None = None, **kwargs) -> BatchResult:
        if key not in _gpu_batch_results:
            cases = make_cases(selected)
            kwargs.setdefault("startup_s", launch_timeout_s)
            env = gpu_batch_env(env, num_ranks)
            result = launch_batch(cases, num_ranks, device=tier_device(), env=env, **kwargs)
            _gpu_batch_results[key] = result
            _BATCHES_RUN.append((request.module.__name__, key, result))
        return _gpu_batch_results[key]

    return run
