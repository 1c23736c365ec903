"""The kernels' device for the GPU tier: a CUDA GPU, or the CPU emulator of the kernels (deep_ep_py.device).

Rank side (what runs in a launch's ranks, which have DEEP_EP_PY_EMULATE_DEVICE=1 set when the tier is emulated):
:func:`on_kernel_device` and :func:`delay_this_rank`; for the device itself, streams, events and synchronize, the rank
functions call deep_ep_py.device. On a GPU each is the torch.cuda call the tests made before.

pytest side: :func:`tier_device`, :func:`emulated_tier` and :func:`skip_on_emulator`, from tests/gpu/conftest.py,
imported when called: the ranks import this module too (the test modules' rank functions travel to them pickled by
module name, and tests/gpu is on their sys.path), and they have no business importing a conftest. Its name keeps
pytest from collecting it.
"""

from __future__ import annotations

import time

import torch

from deep_ep_py import device as ep_device

# How late delay_this_rank() makes a rank: torch.cuda._sleep cycles on the GPU (about a millisecond), seconds on the
# host under the emulator.
DELAY_CYCLES = 2_000_000
DELAY_S = 1e-3


def on_kernel_device(tensor: torch.Tensor) -> torch.Tensor:
    """tensor on the kernels' device: tensor.cuda() on a GPU; under the emulator the CPU (the tensor itself)."""
    return tensor.to(ep_device.kernel_device())


def delay_this_rank() -> None:
    """Make this rank enter its next kernel call about a millisecond late: on a GPU a sleep kernel on the current
    stream (the host goes on issuing work behind it); under the emulator, whose launches run synchronously, on the
    host."""
    if ep_device.emulated():
        time.sleep(DELAY_S)
    else:
        torch.cuda._sleep(DELAY_CYCLES)


# ------------------------------------------------------------------------------------------------ pytest side


def tier_device() -> str:
    """launch(device=...) of this session's GPU tier: "cuda", or "emulated" (conftest.tier_device)."""
    from conftest import tier_device as conftest_tier_device

    return conftest_tier_device()


def emulated_tier() -> bool:
    """Whether this session's GPU tier runs its ranks on the CPU emulator (conftest.emulated_tier)."""
    from conftest import emulated_tier as conftest_emulated_tier

    return conftest_emulated_tier()


def skip_on_emulator(what: str) -> None:
    """Skip the calling test when the tier is emulated: `what` is something only a GPU does (e.g. "CUDA graphs")."""
    __tracebackhide__ = True  # pytest: report the skip at the test's line, not here
    if emulated_tier():
        import pytest

        pytest.skip(f"{what}: not in the CPU emulator of the kernels")
