"""The CUDA MPS control daemon, for several ranks on one GPU.

Ranks that share a GPU must run their kernels at the same time, because the kernels spin-wait on each other.
Without MPS the GPU time-slices between processes (a flag ping-pong between two processes took ~4500 us per round
trip on an H100; ~1 us under MPS). :func:`ensure_mps` makes sure a daemon is reachable, starting one when allowed;
:func:`stop_mps` stops the one it started.

The daemon is found through ``CUDA_MPS_PIPE_DIRECTORY`` (CUDA's default: /tmp/nvidia-mps), which every client
process must see too: when this module starts a daemon it exports the directory in ``os.environ``, so processes
spawned afterwards inherit it. Start MPS before any process on the GPU creates a CUDA context.
"""

from __future__ import annotations

import atexit
import os
import shutil
import stat
import subprocess
import time

__all__ = ["MPSUnavailableError", "ensure_mps", "mps_pipe_directory", "mps_status", "stop_mps"]

CONTROL_BINARY = "nvidia-cuda-mps-control"
# CUDA's own default pipe directory: clients look there when CUDA_MPS_PIPE_DIRECTORY is unset.
DEFAULT_PIPE_DIRECTORY = "/tmp/nvidia-mps"
# CUDA's default log directory is /var/log/nvidia-mps; a daemon started here logs under /tmp instead.
DEFAULT_LOG_DIRECTORY = "/tmp/nvidia-mps-log"
# Seconds a control command (get_server_list, quit) may take, and a fresh daemon may take to answer.
_COMMAND_TIMEOUT_S = 10.0
_START_TIMEOUT_S = 10.0

# Pipe directory of the daemon this process started, if any (stop_mps stops only that one).
_started_pipe_directory: str | None = None


class MPSUnavailableError(RuntimeError):
    """No MPS control daemon is reachable and none could be started; the message says why and what to do."""


def mps_pipe_directory() -> str:
    """Where clients and the control front end look for the daemon: CUDA_MPS_PIPE_DIRECTORY or CUDA's default."""
    return os.environ.get("CUDA_MPS_PIPE_DIRECTORY") or DEFAULT_PIPE_DIRECTORY


def _control(command: str, pipe_directory: str) -> subprocess.CompletedProcess:
    """Send one command to the daemon through the control front end (it talks to the daemon's pipes)."""
    env = dict(os.environ, CUDA_MPS_PIPE_DIRECTORY=pipe_directory)
    return subprocess.run(
        [CONTROL_BINARY],
        input=command + "\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=_COMMAND_TIMEOUT_S,
        check=False,
    )


def mps_status(pipe_directory: str | None = None) -> tuple[bool, str]:
    """(reachable, how it was decided). With the control binary on PATH, asks the daemon (get_server_list);
    without it, falls back to the existence of the daemon's control pipe (a stale pipe after a crash then reads
    as running)."""
    pipe_directory = pipe_directory or mps_pipe_directory()
    if shutil.which(CONTROL_BINARY) is not None:
        try:
            result = _control("get_server_list", pipe_directory)
        except subprocess.TimeoutExpired:
            # The front end blocks on a control pipe nobody reads: a daemon that died without cleaning up.
            return False, f"'{CONTROL_BINARY}' got no answer within {_COMMAND_TIMEOUT_S:.0f} s (stale pipe?)"
        except OSError as exc:
            return False, f"running '{CONTROL_BINARY}' failed: {exc}"
        output = (result.stdout + result.stderr).strip()
        # Without a daemon the front end says "Cannot find MPS control daemon process"; checked besides the exit
        # code in case a version exits 0 with it.
        if result.returncode == 0 and "cannot find" not in output.lower():
            return True, f"daemon answered get_server_list (pipe directory {pipe_directory})"
        return False, f"no daemon answered get_server_list at {pipe_directory}: {output or result.returncode}"
    control_pipe = os.path.join(pipe_directory, "control")
    try:
        is_pipe = stat.S_ISFIFO(os.stat(control_pipe).st_mode)
    except OSError:
        is_pipe = False
    if is_pipe:
        return True, f"control pipe {control_pipe} exists ('{CONTROL_BINARY}' not on PATH to ask the daemon)"
    return False, f"no control pipe at {control_pipe} and '{CONTROL_BINARY}' is not on PATH"


def _start_refusal(allowed: bool) -> str | None:
    """Why this process may not start a daemon, or None when it may."""
    if not allowed:
        return "starting one was not allowed (allowed=False)"
    if shutil.which(CONTROL_BINARY) is None:
        return f"'{CONTROL_BINARY}' was not found on PATH (it ships with the NVIDIA driver utilities)"
    if os.geteuid() != 0:
        return f"this process is not root (euid {os.geteuid()}); the daemon needs root to control the GPU"
    return None


def ensure_mps(allowed: bool) -> str:
    """Make sure an MPS control daemon is reachable; start one if none is and ``allowed`` (and this process is root
    with nvidia-cuda-mps-control on PATH). Returns a line saying what it found or did. Raises
    MPSUnavailableError naming why it could not, and how to start the daemon by hand."""
    global _started_pipe_directory
    pipe_directory = mps_pipe_directory()
    reachable, how = mps_status(pipe_directory)
    if reachable:
        return f"MPS running: {how}"
    refusal = _start_refusal(allowed)
    if refusal is not None:
        raise MPSUnavailableError(
            f"several ranks share a GPU and need the CUDA MPS control daemon (their kernels spin-wait on each "
            f"other), but none is reachable: {how}; and none can be started here: {refusal}. Start it as root "
            f"before any process touches the GPU:\n"
            f"  export CUDA_MPS_PIPE_DIRECTORY={pipe_directory} CUDA_MPS_LOG_DIRECTORY={DEFAULT_LOG_DIRECTORY}\n"
            f"  mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY && {CONTROL_BINARY} -d\n"
            f"(stop it with `echo quit | {CONTROL_BINARY}`), or launch with mps=False to run time-sliced "
            f"(correct but ~1000x slower spin-waits)."
        )

    log_directory = os.environ.get("CUDA_MPS_LOG_DIRECTORY") or DEFAULT_LOG_DIRECTORY
    os.makedirs(pipe_directory, exist_ok=True)
    os.makedirs(log_directory, exist_ok=True)
    # Exported so that the clients this process spawns find the daemon.
    os.environ["CUDA_MPS_PIPE_DIRECTORY"] = pipe_directory
    os.environ["CUDA_MPS_LOG_DIRECTORY"] = log_directory
    try:
        result = subprocess.run(
            [CONTROL_BINARY, "-d"], capture_output=True, text=True, timeout=_COMMAND_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MPSUnavailableError(f"'{CONTROL_BINARY} -d' failed: {exc}") from exc
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()
        raise MPSUnavailableError(
            f"'{CONTROL_BINARY} -d' exited with code {result.returncode}: {output} (logs in {log_directory})"
        )
    deadline = time.monotonic() + _START_TIMEOUT_S
    while True:
        reachable, how = mps_status(pipe_directory)
        if reachable:
            break
        if time.monotonic() > deadline:
            raise MPSUnavailableError(
                f"started '{CONTROL_BINARY} -d' but no daemon answered within {_START_TIMEOUT_S:.0f} s: {how} "
                f"(logs in {log_directory})"
            )
        time.sleep(0.1)
    if _started_pipe_directory is None:
        atexit.register(stop_mps)
    _started_pipe_directory = pipe_directory
    return f"MPS started by this process: {how}; logs in {log_directory}"


def stop_mps() -> bool:
    """Stop the daemon ensure_mps() started in this process (a daemon found running is left alone). Returns whether
    one was stopped. Never raises: a failed quit leaves the daemon running."""
    global _started_pipe_directory
    pipe_directory = _started_pipe_directory
    if pipe_directory is None:
        return False
    _started_pipe_directory = None
    try:
        return _control("quit", pipe_directory).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False
