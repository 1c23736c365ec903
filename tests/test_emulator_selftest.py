"""The CPU emulator's NVSHMEM on its own (csrc/emu/tests/nvshmem_emu_selftest.cpp): allocation, puts, signals,
barriers, device faults, and late network writes (a put across P2P domains is visible only after the target's
NVSHMEM test or a barrier), compiled with the host compiler and run in forked PEs. The GPU tier's network cases
lean on that model, so it is checked here directly."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _cuda_include() -> Path | None:
    """The CUDA toolkit headers (cuda_bf16.h and cuda_fp8.h, which the emulator's kernels use), or None."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "include" / "cuda_fp8.h").exists():
            return Path(home) / "include"
    return None


def test_nvshmem_emulator_selftest(tmp_path: Path) -> None:
    compiler = shutil.which("g++")
    include = _cuda_include()
    if compiler is None or include is None:
        pytest.skip("needs g++ and the CUDA toolkit headers (as the emulator's build does)")
    binary = tmp_path / "nvshmem_emu_selftest"
    sources = ["csrc/emu/tests/nvshmem_emu_selftest.cpp", "csrc/emu/nvshmem_emu.cpp", "csrc/emu/device_emu.cpp"]
    flags = ["-std=c++17", "-O1", "-DDEEP_EP_PY_EMULATE", "-I", "csrc/emu/include", "-I", str(include), "-I", "csrc"]
    build = subprocess.run(
        [compiler, *flags, *sources, "-pthread", "-o", str(binary)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-4000:]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEEP_EP_PY_")}
    run = subprocess.run([str(binary)], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0 and "ALL PASSED" in run.stdout, run.stdout[-4000:] + run.stderr[-4000:]
    assert "2 PEs, no P2P: a put is visible after a test or barrier" in run.stdout
