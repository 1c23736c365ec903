"""The CPU-checkable parts of the GPU runtime: launcher device checks, MPS control, NVSHMEM environment defaults,
and the errors PeerMappedBuffer and NvshmemContext raise without a GPU. The GPU behaviour is in tests/gpu."""

from __future__ import annotations

import os
import stat
import textwrap

import pytest
import torch

from deep_ep_py import _ext, runtime
from deep_ep_py.errors import DeepEPError
from deep_ep_py.testing import launch
from deep_ep_py.testing import mps as mps_control


def _noop(rank: int, num_ranks: int) -> int:
    return rank


# ---- launcher ----------------------------------------------------------------------------------------------------


def test_launch_cuda_without_cuda_raises_before_spawning():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    with pytest.raises(RuntimeError, match=r"device='cuda'.*no CUDA device visible.*device='cpu'"):
        launch(_noop, 2, device="cuda", timeout_s=30)


def test_launch_rejects_an_unknown_device():
    with pytest.raises(ValueError, match="device must be one of"):
        launch(_noop, 1, device="tpu")


def test_launch_cpu_is_the_default_and_still_works():
    assert launch(_noop, 2, timeout_s=60) == [0, 1]
    assert launch(_noop, 2, device="cpu", timeout_s=60) == [0, 1]


# ---- MPS -----------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_daemon(tmp_path, monkeypatch):
    """An empty pipe directory (no daemon there) and no daemon started by this process."""
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path / "pipe"))
    monkeypatch.setenv("CUDA_MPS_LOG_DIRECTORY", str(tmp_path / "log"))
    monkeypatch.setattr(mps_control, "_started_pipe_directory", None)
    return tmp_path


@pytest.fixture
def fake_control(no_daemon, monkeypatch):
    """A stand-in nvidia-cuda-mps-control on PATH: `-d` marks a daemon running in the pipe directory, the front end
    answers get_server_list while it runs (else says "Cannot find MPS control daemon process", exit 1) and quit
    stops it."""
    bin_dir = no_daemon / "bin"
    bin_dir.mkdir()
    script = bin_dir / mps_control.CONTROL_BINARY
    script.write_text(
        textwrap.dedent(
            """\
            #!/bin/bash
            marker="$CUDA_MPS_PIPE_DIRECTORY/fake_daemon"
            if [ "${1:-}" = "-d" ]; then mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" && touch "$marker"; exit 0; fi
            read -r command
            if [ ! -e "$marker" ]; then echo "Cannot find MPS control daemon process"; exit 1; fi
            if [ "$command" = quit ]; then rm -f "$marker"; fi
            exit 0
            """
        )
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setattr(mps_control.os, "geteuid", lambda: 0)
    return no_daemon / "pipe" / "fake_daemon"


def test_ensure_mps_not_allowed_names_why_and_what_to_do(no_daemon):
    with pytest.raises(mps_control.MPSUnavailableError) as info:
        mps_control.ensure_mps(allowed=False)
    message = str(info.value)
    assert "allowed=False" in message
    assert str(no_daemon / "pipe") in message  # where it looked
    assert "nvidia-cuda-mps-control -d" in message  # what to do
    assert "mps=False" in message


def test_ensure_mps_without_the_binary_names_it(no_daemon, monkeypatch):
    monkeypatch.setenv("PATH", str(no_daemon))
    with pytest.raises(mps_control.MPSUnavailableError, match="not found on PATH"):
        mps_control.ensure_mps(allowed=True)


def test_ensure_mps_not_root_says_so(fake_control, monkeypatch):
    monkeypatch.setattr(mps_control.os, "geteuid", lambda: 1000)
    with pytest.raises(mps_control.MPSUnavailableError, match=r"not root \(euid 1000\)"):
        mps_control.ensure_mps(allowed=True)
    assert not fake_control.exists()


def test_ensure_mps_starts_then_finds_then_stops(fake_control):
    assert "started by this process" in mps_control.ensure_mps(allowed=True)
    assert fake_control.exists()
    assert os.path.isdir(os.environ["CUDA_MPS_LOG_DIRECTORY"])
    assert "MPS running" in mps_control.ensure_mps(allowed=False)  # found, not started again
    assert mps_control.stop_mps()
    assert not fake_control.exists()
    assert not mps_control.stop_mps()  # nothing left that this process started


def test_ensure_mps_leaves_a_daemon_it_did_not_start(fake_control):
    fake_control.parent.mkdir(parents=True, exist_ok=True)
    fake_control.touch()  # someone else's daemon
    assert "MPS running" in mps_control.ensure_mps(allowed=True)
    assert not mps_control.stop_mps()
    assert fake_control.exists()


def test_mps_status_without_binary_reads_the_control_pipe(no_daemon, monkeypatch):
    monkeypatch.setenv("PATH", str(no_daemon))
    pipe_dir = no_daemon / "pipe"
    assert not mps_control.mps_status(str(pipe_dir))[0]
    pipe_dir.mkdir()
    os.mkfifo(pipe_dir / "control")
    reachable, how = mps_control.mps_status(str(pipe_dir))
    assert reachable and "control pipe" in how


# ---- NVSHMEM environment -------------------------------------------------------------------------------------------


def test_nvshmem_env_defaults_apply_on_an_empty_environment():
    updates = runtime.nvshmem_env_updates({})
    assert updates == {"NVSHMEM_DISABLE_NCCL": "1"}
    updates = runtime.nvshmem_env_updates({}, share_gpu=True, single_host=True)
    assert updates["NVSHMEM_IGNORE_CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "1"
    assert updates["NVSHMEM_REMOTE_TRANSPORT"] == "none"


@pytest.mark.parametrize("share_gpu", [False, True])
@pytest.mark.parametrize("single_host", [False, True])
@pytest.mark.parametrize("num_symmetric_bytes", [0, 1 << 20, 3 << 30])
def test_nvshmem_env_never_overrides_the_user(share_gpu, single_host, num_symmetric_bytes):
    every_key = runtime.nvshmem_env_updates(
        {}, num_symmetric_bytes=num_symmetric_bytes, share_gpu=share_gpu, single_host=single_host
    )
    user = {key: "user value" for key in every_key}
    assert (
        runtime.nvshmem_env_updates(
            user, num_symmetric_bytes=num_symmetric_bytes, share_gpu=share_gpu, single_host=single_host
        )
        == {}
    )
    for key in every_key:  # one user value at a time: only that one is left out
        partial = runtime.nvshmem_env_updates(
            {key: "x"}, num_symmetric_bytes=num_symmetric_bytes, share_gpu=share_gpu, single_host=single_host
        )
        assert partial == {k: v for k, v in every_key.items() if k != key}
    assert ("NVSHMEM_IGNORE_CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" in every_key) == share_gpu
    assert ("NVSHMEM_REMOTE_TRANSPORT" in every_key) == single_host
    assert "NVSHMEM_IB_ENABLE_IBGDA" not in every_key


def test_nvshmem_env_is_pure():
    environ = {"NVSHMEM_DISABLE_NCCL": "0"}
    before_os = dict(os.environ)
    runtime.nvshmem_env_updates(environ, num_symmetric_bytes=1 << 20, share_gpu=True, single_host=True)
    assert environ == {"NVSHMEM_DISABLE_NCCL": "0"}
    assert dict(os.environ) == before_os


@pytest.mark.parametrize(
    "num_symmetric_bytes, expected",
    [
        (0, None),  # nothing asked: NVSHMEM's default stands
        (1 << 20, 1 << 30),  # fits the default: the default, stated
        (2 << 30, (2 << 30) + (256 << 20)),  # requested + margin
        ((3 << 30) + 1, (3 << 30) + (258 << 20)),  # rounded up to 2 MiB
    ],
)
def test_nvshmem_symmetric_size(num_symmetric_bytes, expected):
    updates = runtime.nvshmem_env_updates({}, num_symmetric_bytes=num_symmetric_bytes)
    if expected is None:
        assert "NVSHMEM_SYMMETRIC_SIZE" not in updates
    else:
        assert int(updates["NVSHMEM_SYMMETRIC_SIZE"]) == expected
        assert int(updates["NVSHMEM_SYMMETRIC_SIZE"]) >= num_symmetric_bytes


@pytest.mark.parametrize(
    "environ, machine, emulated, expected",
    [
        ({}, "x86_64", False, True),  # CUDA VMM, NVSHMEM's default: the heap grows
        ({}, "aarch64", False, True),
        ({}, "ppc64le", False, False),  # VMM off by default on POWER
        ({"NVSHMEM_DISABLE_CUDA_VMM": "1"}, "x86_64", False, False),
        ({"NVSHMEM_DISABLE_CUDA_VMM": "true"}, "x86_64", False, False),
        ({"NVSHMEM_DISABLE_CUDA_VMM": "0"}, "x86_64", False, True),
        ({"NVSHMEM_DISABLE_CUDA_VMM": "0"}, "ppc64le", False, True),  # the user's setting wins
        ({}, "x86_64", True, False),  # the emulator's heap is fixed
    ],
)
def test_nvshmem_heap_grows(environ, machine, emulated, expected):
    assert runtime.nvshmem_heap_grows(environ, machine, emulated) is expected


@pytest.mark.parametrize(
    "num_local_ranks, num_devices, expected", [(1, 1, False), (2, 1, True), (8, 8, False), (8, 4, True), (2, 0, True)]
)
def test_ranks_share_gpu(num_local_ranks, num_devices, expected):
    assert runtime.ranks_share_gpu(num_local_ranks, num_devices) == expected


# ---- runtime objects without a GPU --------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [lambda: runtime.PeerMappedBuffer(None, 1024), lambda: runtime.NvshmemContext()])
def test_runtime_objects_without_gpu_say_what_is_missing(make):
    if _ext.gpu_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(DeepEPError, match=r"needs (the CUDA extension|a CUDA device)") as info:
        make()
    assert ("deep_ep_py._C" in str(info.value)) or ("no GPU" in str(info.value))


@pytest.mark.parametrize("make", [lambda: runtime.PeerMappedBuffer(None, 1024), lambda: runtime.NvshmemContext()])
def test_runtime_objects_without_extension(make, monkeypatch):
    monkeypatch.setattr(_ext, "load_extension", lambda: None)
    monkeypatch.setattr(_ext, "kernels_unavailable_reason", lambda: "no deep_ep_py._C in /somewhere")
    with pytest.raises(DeepEPError, match=r"needs the CUDA extension deep_ep_py\._C: no deep_ep_py\._C in /somewhere"):
        make()


class _NoDeviceExtension:
    @staticmethod
    def device_count() -> int:
        return 0

    @staticmethod
    def gpu_status() -> str:
        return "no GPU: cudaGetDeviceCount found 0 devices"


@pytest.mark.parametrize("make", [lambda: runtime.PeerMappedBuffer(None, 1024), lambda: runtime.NvshmemContext()])
def test_runtime_objects_without_device(make, monkeypatch):
    monkeypatch.setattr(_ext, "load_extension", lambda: _NoDeviceExtension())
    with pytest.raises(DeepEPError, match="needs a CUDA device: no GPU: cudaGetDeviceCount found 0 devices"):
        make()


@pytest.mark.parametrize("num_bytes", [0, -1, 1.5, True])
def test_peer_mapped_buffer_rejects_bad_sizes_first(num_bytes):
    with pytest.raises(ValueError, match="num_bytes must be a positive int"):
        runtime.PeerMappedBuffer(None, num_bytes)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1073741824", 1 << 30), ("2G", 2 << 30), ("1.5g", 3 << 29), ("20m", 20 << 20), ("3.1M", 3250586),
     (" 64k ", 65536), ("0", 0), ("", None), ("12X", None), ("20kk", None), ("-1", None), ("nan", None),
     ("inf", None)],
)  # fmt: skip
def test_parse_nvshmem_size(text, expected):
    # NVSHMEM's own reading of NVSHMEM_SYMMETRIC_SIZE ('3.1M' is 3250586 in its docs); None: left to NVSHMEM.
    assert runtime.parse_nvshmem_size(text) == expected


def test_finalize_nvshmem_without_nvshmem_is_a_no_op():
    # Nothing started NVSHMEM in this process: nothing to end, and nothing collective runs.
    assert runtime.finalize_nvshmem() is False
    assert runtime.finalize_nvshmem() is False


def test_closed_objects_are_inert():
    # Objects whose construction failed must not raise from close()/__del__.
    buffer = runtime.PeerMappedBuffer.__new__(runtime.PeerMappedBuffer)
    buffer._closed = True
    buffer.close()
    buffer.__del__()
    context = runtime.NvshmemContext.__new__(runtime.NvshmemContext)
    context._finalized = True
    context.finalize()
    with pytest.raises(DeepEPError, match="finalized"):
        context.malloc(64)


@pytest.mark.parametrize(("mps", "env", "wanted"), [(None, None, True), (None, "0", False), (None, "1", True),
                                                    (True, "0", True), (False, None, False)])  # fmt: skip
def test_launch_under_mps_unless_told_otherwise(monkeypatch, mps, env, wanted):
    """launch(device="cuda") with more ranks than GPUs brings MPS up, unless mps=False or (mps left at None)
    DEEP_EP_PY_MPS=0 says the ranks run time-sliced, as where the daemon cannot start."""
    import torch

    from deep_ep_py.testing import launcher

    if env is None:
        monkeypatch.delenv(launcher.MPS_ENV, raising=False)
    else:
        monkeypatch.setenv(launcher.MPS_ENV, env)
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(mps_control, "ensure_mps", lambda allowed: calls.append(allowed) or "fake")
    assert launcher.mps_wanted(mps) is wanted
    launcher._check_cuda(4, launcher.mps_wanted(mps))
    assert calls == ([True] if wanted else [])
