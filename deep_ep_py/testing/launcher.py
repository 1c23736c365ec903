"""Run a function on N ranks, each in a fresh process with torch.distributed initialised.

    results = launch(fn, num_ranks, *args, timeout_s=120.0, backend="gloo", env=None, device="cpu", mps=True)

runs ``fn(rank, num_ranks, *args)`` in ``num_ranks`` processes started with the multiprocessing 'spawn'
context, after ``torch.distributed.init_process_group(backend, init_method="tcp://127.0.0.1:<free port>")``.
It returns the per-rank return values in rank order (they must be picklable; so must ``fn``, which means a
module-level function, and ``args``).

Failures:
- a rank that raises fails the launch with :class:`RankFailedError` carrying that rank's traceback text;
- a rank that has not reported after ``timeout_s`` seconds fails it with :class:`TimeoutError` naming the ranks
  that did not finish.
In every case the children are terminated, then killed, and reaped: no process outlives ``launch``.
What a rank writes to its stdout (print, and C++ libraries such as Gloo and NVSHMEM) goes to stderr: the caller's
stdout carries only what the caller prints.

Devices: ``device="cpu"`` (the default) leaves CUDA alone. ``device="cuda"`` makes rank ``r`` call
``torch.cuda.set_device(r % torch.cuda.device_count())`` before init_process_group (in :func:`_bind_device`, the
one place that decides what a rank runs on), so N ranks share the GPUs there are, one GPU under MPS in the test
rig. When ranks outnumber GPUs, the kernels of the ranks sharing a GPU spin-wait on each other and must run at
the same time: the launch then makes sure the CUDA MPS control daemon runs (starting it when root, see
:mod:`deep_ep_py.testing.mps`) unless ``mps=False``. Without a CUDA device, ``device="cuda"`` raises before
anything is spawned. Keep ``backend="gloo"`` when ranks share a GPU: NCCL refuses two ranks on one device.
``device="emulated"`` runs the ranks on the CPU emulator of the kernels (``DEEP_EP_PY_EMULATE_DEVICE=1`` in each
child, see :mod:`deep_ep_py.device`): tensors on the CPU, the kernels of ``deep_ep_py._C_emu``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import multiprocessing
import multiprocessing.connection
import os
import pickle
import socket
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, Callable

__all__ = ["DEVICES", "RankFailedError", "find_free_port", "launch"]

DEVICES = ("cpu", "cuda", "emulated")
# What a child gets in its environment under device="emulated" (deep_ep_py._ext.emulated() reads it).
EMULATE_DEVICE_ENV = "DEEP_EP_PY_EMULATE_DEVICE"

# How many times a launch is retried when the port picked for the rendezvous was taken in the meantime.
_NUM_PORT_ATTEMPTS = 4
# Seconds a child gets to exit on its own after it has reported, and after SIGTERM, before SIGKILL.
_EXIT_GRACE_S = 10.0
_KILL_GRACE_S = 3.0

# os.environ is process-wide: launches from several threads must not interleave their temporary patches.
_ENV_LOCK = threading.Lock()


class RankFailedError(RuntimeError):
    """A rank raised (or died). ``rank`` is the first failing rank, ``rank_traceback`` its traceback text."""

    def __init__(self, rank: int, rank_traceback: str, message: str | None = None) -> None:
        self.rank = rank
        self.rank_traceback = rank_traceback
        super().__init__(message or f"rank {rank} failed:\n{rank_traceback}")


@dataclasses.dataclass(frozen=True)
class _RankSpec:
    """Everything a child needs besides the pickled (fn, args); one field per launch option."""

    rank: int
    num_ranks: int
    port: int
    backend: str
    env: dict[str, str]
    timeout_s: float
    device: str = "cpu"  # one of DEVICES


# Messages a child sends to the parent over its pipe: (kind, payload).
_OK = "ok"  # payload: the pickled return value
_FAILED = "failed"  # payload: traceback text of an exception raised by fn
_INIT_FAILED = "init_failed"  # payload: traceback text of an exception raised by init_process_group


def find_free_port() -> int:
    """A TCP port on 127.0.0.1 that was free when asked (bind to port 0 and read it back)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _bind_device(spec: _RankSpec) -> None:
    """Select what this rank computes on: nothing to do on the CPU; rank % device_count on CUDA. Under the
    emulator, fresh tensors hold garbage as a GPU's do."""
    import torch

    if spec.device == "emulated":
        # torch.empty on a GPU returns what the caching allocator last held there; on the CPU large tensors come
        # from fresh zero pages, so a kernel that reads an output, a handle tensor or scratch before writing it
        # passed here and failed on a GPU. With deterministic algorithms on, torch fills every fresh tensor (NaN,
        # the largest integer); warn_only keeps the ops that have no deterministic version running.
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = True
    if spec.device != "cuda":
        return

    num_devices = torch.cuda.device_count()
    if num_devices < 1:
        raise RuntimeError(f"rank {spec.rank}: device='cuda' but torch.cuda.device_count() is 0 in the child")
    torch.cuda.set_device(spec.rank % num_devices)


def _child_main(spec: _RankSpec, payload: bytes, conn: multiprocessing.connection.Connection) -> None:
    # A rank returns its result through conn; what it writes is diagnostics. File descriptor 1 goes to stderr, so
    # the caller's stdout holds only what the caller prints: C++ libraries write there too, and Gloo in torch 2.9
    # prints "[Gloo] Rank 0 is connected to 1 peer ranks..." from every rank, piece by piece, into the bench's table.
    sys.stdout.flush()
    os.dup2(2, 1)
    # The environment was already set by the parent at spawn time; setting it again is a no-op that also keeps
    # this function usable on its own.
    os.environ.update(spec.env)
    import torch.distributed as dist

    try:
        _bind_device(spec)
        dist.init_process_group(
            spec.backend,
            init_method=f"tcp://127.0.0.1:{spec.port}",
            rank=spec.rank,
            world_size=spec.num_ranks,
            timeout=timedelta(seconds=max(1.0, spec.timeout_s)),
        )
    except BaseException:
        conn.send((_INIT_FAILED, traceback.format_exc()))
        conn.close()
        return

    try:
        fn, args = pickle.loads(payload)
        result = fn(spec.rank, spec.num_ranks, *args)
        message = (_OK, pickle.dumps(result))
    except BaseException:
        message = (_FAILED, traceback.format_exc())
    try:
        conn.send(message)
        if message[0] == _OK:
            # Keep rank 0 (which hosts the rendezvous store) alive until every rank is done with the group.
            dist.barrier()
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
        conn.close()


@contextlib.contextmanager
def _patched_environ(env: dict[str, str]):
    """Set env in this process while children are spawned, so they see it before their first import."""
    with _ENV_LOCK:
        saved = {key: os.environ.get(key) for key in env}
        os.environ.update(env)
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _stop(processes: Sequence[multiprocessing.process.BaseProcess]) -> None:
    """Terminate, then kill, then reap every child that is still running."""
    for proc in processes:
        if proc.is_alive():
            proc.terminate()
    deadline = time.monotonic() + _KILL_GRACE_S
    for proc in processes:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in processes:
        if proc.is_alive():
            proc.kill()
    for proc in processes:
        proc.join()
        proc.close()


class _PortInUse(Exception):
    pass


def _is_port_in_use(text: str) -> bool:
    return "EADDRINUSE" in text or "Address already in use" in text or f"errno: {errno.EADDRINUSE}" in text


def _launch_once(
    fn_payload: bytes, num_ranks: int, backend: str, env: dict[str, str], timeout_s: float, device: str
) -> list:
    ctx = multiprocessing.get_context("spawn")
    port = find_free_port()
    processes = []
    conns: dict[Any, int] = {}
    results: list[Any] = [None] * num_ranks
    reported = [False] * num_ranks
    try:
        with _patched_environ(env):
            for rank in range(num_ranks):
                parent_conn, child_conn = ctx.Pipe(duplex=False)
                spec = _RankSpec(rank, num_ranks, port, backend, env, timeout_s, device)
                proc = ctx.Process(
                    target=_child_main, args=(spec, fn_payload, child_conn), name=f"rank{rank}", daemon=True
                )
                proc.start()
                child_conn.close()
                processes.append(proc)
                conns[parent_conn] = rank

        deadline = time.monotonic() + timeout_s
        sentinels = {proc.sentinel: rank for rank, proc in enumerate(processes)}
        while not all(reported):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = [rank for rank in range(num_ranks) if not reported[rank]]
                raise TimeoutError(f"ranks {missing} did not finish within {timeout_s:.1f} s (of {num_ranks} ranks)")
            ready = multiprocessing.connection.wait(list(conns) + list(sentinels), timeout=remaining)
            for obj in ready:
                if obj in conns:
                    rank = conns[obj]
                    try:
                        kind, body = obj.recv()
                    except EOFError:
                        # The child closed its end without a message; its sentinel reports the exit.
                        del conns[obj]
                        continue
                    del conns[obj]
                    if kind == _INIT_FAILED and _is_port_in_use(body):
                        raise _PortInUse(body)
                    if kind in (_FAILED, _INIT_FAILED):
                        where = " in init_process_group" if kind == _INIT_FAILED else ""
                        raise RankFailedError(rank, body, f"rank {rank} of {num_ranks} failed{where}:\n{body}")
                    results[rank] = pickle.loads(body)
                    reported[rank] = True
            for obj in ready:
                if obj in sentinels:
                    rank = sentinels.pop(obj)
                    proc = processes[rank]
                    # Drain a message that raced with the exit before declaring the rank dead.
                    pending = [c for c, r in conns.items() if r == rank]
                    if pending and pending[0].poll():
                        continue
                    if not reported[rank]:
                        proc.join(_KILL_GRACE_S)
                        raise RankFailedError(
                            rank,
                            "",
                            f"rank {rank} of {num_ranks} exited with code {proc.exitcode} before reporting a result",
                        )

        # Every rank reported; let them leave the barrier and tear down on their own.
        exit_deadline = time.monotonic() + _EXIT_GRACE_S
        for proc in processes:
            proc.join(max(0.0, exit_deadline - time.monotonic()))
        return results
    finally:
        _stop(processes)
        for conn in conns:
            conn.close()


# "0": ranks sharing a GPU run time-sliced instead of under MPS (launch's mps=None), for a machine where the MPS
# daemon cannot start: correct, but every spin-wait between ranks takes a time slice (ms instead of us).
MPS_ENV = "DEEP_EP_PY_MPS"


def mps_wanted(mps: bool | None) -> bool:
    """launch's mps argument: as given, or (None) unless DEEP_EP_PY_MPS=0."""
    if mps is not None:
        return mps
    return os.environ.get(MPS_ENV, "1") != "0"


def _check_cuda(num_ranks: int, mps: bool) -> None:
    """Fail before spawning when device='cuda' cannot work; bring MPS up when ranks share a GPU. Creates no CUDA
    context here: device_count() does not, and an MPS daemon must start before the first context on the GPU."""
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(
            f"launch(device='cuda'): no CUDA device visible (torch {torch.__version__}, built for CUDA "
            f"{torch.version.cuda or 'none: a CPU-only build'}, torch.cuda.is_available() is False); "
            "use device='cpu'"
        )
    num_devices = torch.cuda.device_count()
    if mps and num_ranks > num_devices:
        from . import mps as mps_control

        mps_control.ensure_mps(allowed=True)


def launch(
    fn: Callable[..., Any],
    num_ranks: int,
    *args: Any,
    timeout_s: float = 120.0,
    backend: str = "gloo",
    env: dict[str, str] | None = None,
    device: str = "cpu",
    mps: bool | None = None,
) -> list:
    """Run ``fn(rank, num_ranks, *args)`` on ``num_ranks`` spawned processes; return their results in rank order.

    env: environment variables set in the children before they import anything (torch included).
    device: "cpu", "cuda" (rank r on GPU r % device_count; raises RuntimeError here when no GPU is visible), or
        "emulated" (the CPU emulator of the kernels).
    mps: with device="cuda" and more ranks than GPUs, make sure the MPS daemon runs (start it when root; raise
        deep_ep_py.testing.mps.MPSUnavailableError when it cannot). False skips that: ranks time-slice the GPU.
        None (the default): True unless DEEP_EP_PY_MPS=0.
    Raises RankFailedError (a RuntimeError) naming the first failing rank with its traceback, or TimeoutError
    naming the ranks that had not finished after timeout_s seconds.
    """
    if not callable(fn):
        raise TypeError(f"launch: fn must be callable, got {type(fn).__name__}")
    if not isinstance(num_ranks, int) or num_ranks < 1:
        raise ValueError(f"launch: num_ranks must be a positive int, got {num_ranks!r}")
    if timeout_s <= 0:
        raise ValueError(f"launch: timeout_s must be > 0, got {timeout_s!r}")
    if device not in DEVICES:
        raise ValueError(f"launch: device must be one of {DEVICES}, got {device!r}")
    if device == "cuda":
        _check_cuda(num_ranks, mps_wanted(mps))
    env = {str(key): str(value) for key, value in (env or {}).items()}
    if device == "emulated":
        env[EMULATE_DEVICE_ENV] = "1"
    try:
        payload = pickle.dumps((fn, args))
    except Exception as exc:  # lambdas, closures, local functions
        raise TypeError(f"launch: fn and args must be picklable (fn must be a module-level function): {exc}") from exc

    for attempt in range(_NUM_PORT_ATTEMPTS):
        try:
            return _launch_once(payload, num_ranks, backend, env, timeout_s, device)
        except _PortInUse as exc:
            if attempt == _NUM_PORT_ATTEMPTS - 1:
                raise RuntimeError(
                    f"launch: no free rendezvous port after {_NUM_PORT_ATTEMPTS} attempts:\n{exc}"
                ) from exc
    raise AssertionError("unreachable")
