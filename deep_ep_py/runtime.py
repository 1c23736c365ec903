"""Peer-mapped device buffers (CUDA IPC) and the NVSHMEM context, over deep_ep_py._C; no kernels here.

- :class:`PeerMappedBuffer`: one device allocation per rank, every rank of a node mapping every other's. The
  intranode kernels read and write peers' buffers through ``peer_ptrs``.
- :class:`NvshmemContext`: NVSHMEM bootstrapped over a torch.distributed group, with the environment defaults
  this project needs (:data:`NVSHMEM_ENV_DEFAULTS`, computed by the pure :func:`nvshmem_env_updates`), symmetric
  allocations and teardown. NVSHMEM itself starts once per process and stays up for later contexts over the same
  ranks; :func:`finalize_nvshmem` ends it.

Both need the compiled extension and a CUDA device, and raise :class:`~deep_ep_py.errors.DeepEPError` naming what
is missing otherwise. The caller selects the CUDA device (``torch.cuda.set_device``) before constructing either:
allocations land on the current device. Waiting on host-mapped counters is ``_C.HostCounters.wait_eq``.
"""

from __future__ import annotations

import collections.abc
import ctypes
import os
import platform
import socket
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist

from . import _ext
from . import device as ep_device
from .errors import DeepEPError

__all__ = [
    "NVSHMEM_ENV_DEFAULTS",
    "NVSHMEM_SHARED_GPU_ENV_DEFAULTS",
    "NVSHMEM_SINGLE_HOST_ENV_DEFAULTS",
    "NvshmemContext",
    "PeerMappedBuffer",
    "device_bytes_view",
    "finalize_nvshmem",
    "nvshmem_env_updates",
    "nvshmem_heap_grows",
    "parse_nvshmem_size",
    "ranks_share_gpu",
]

# Set before nvshmem_init wherever the user has not set them (a value the user set always wins).
NVSHMEM_ENV_DEFAULTS: dict[str, str] = {
    # NVSHMEM's NCCL-backed collectives are never used here; loading NCCL into each PE costs start-up time and
    # memory, and NCCL refuses several ranks on one GPU (the test rig's layout).
    "NVSHMEM_DISABLE_NCCL": "1",
}
# Added when several ranks share one GPU (under MPS). NVSHMEM grants its full API to PEs sharing a GPU only when
# their MPS active-thread percentages sum to at most 100; otherwise team barriers, team creation and host
# collectives abort. The ranks of one GPU run at 100% each, so the check is waived.
NVSHMEM_SHARED_GPU_ENV_DEFAULTS: dict[str, str] = {
    "NVSHMEM_IGNORE_CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "1",
}
# Added when every rank of the group runs on this host: P2P reaches every PE, and a remote transport would only try
# to open NICs (IBRC, IBGDA) that a single-host machine may not have.
NVSHMEM_SINGLE_HOST_ENV_DEFAULTS: dict[str, str] = {
    "NVSHMEM_REMOTE_TRANSPORT": "none",
}
# NVSHMEM_IB_ENABLE_IBGDA is never set here: IBGDA cannot start without a NIC; deployments with one opt in.

# NVSHMEM's own default symmetric heap size (NVSHMEM_SYMMETRIC_SIZE unset): 1 GiB.
NVSHMEM_DEFAULT_SYMMETRIC_BYTES = 1 << 30
# With CUDA VMM (NVSHMEM's default except on POWER), nvshmem_malloc maps more physical memory into the heap when it
# runs out, up to NVSHMEM_MAX_MEMORY_PER_GPU (default 128 GiB): DeepEP allocates 2 GB low-latency buffers under the
# 1 GiB default, and sgl-project/sglang#29942 shows a 21 GiB nvshmem_align pass with the size unset. Without VMM
# (NVSHMEM_DISABLE_CUDA_VMM=1) the heap is NVSHMEM_SYMMETRIC_SIZE, fixed at init.
NVSHMEM_DEFAULT_MAX_MEMORY_PER_GPU = 128 << 30
# Heap room beyond the requested bytes: NVSHMEM's own symmetric objects (team sync arrays, signals) and the padding
# of each aligned allocation.
NVSHMEM_SYMMETRIC_MARGIN_BYTES = 256 << 20
_SYMMETRIC_SIZE_GRANULARITY = 2 << 20


def _require_gpu_extension(what: str) -> ModuleType:
    """The loaded _C (_C_emu under emulation), or DeepEPError naming what is missing (extension or CUDA device)."""
    extension = _ext.load_extension()
    if extension is None:
        kind = "CPU emulator" if _ext.emulated() else "CUDA extension"
        raise DeepEPError(f"{what} needs the {kind} {_ext.extension_name()}: {_ext.kernels_unavailable_reason()}")
    if extension.device_count() < 1:
        raise DeepEPError(f"{what} needs a CUDA device: {extension.gpu_status()}")
    return extension


def _require_process_group(what: str) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise DeepEPError(f"{what} needs torch.distributed initialised (init_process_group) to exchange with peers")


def _group_rank_and_size(group: Any) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


def device_bytes_view(ptr: int, num_bytes: int) -> torch.Tensor:
    """A uint8 CUDA tensor [num_bytes] over the device memory at ptr (own or peer-mapped), without a copy and
    without ownership: keep the owner (PeerMappedBuffer, NvshmemContext) open while the view is used. For tests
    and debugging; kernels take raw pointers. Under the CPU emulator the device memory is host memory, and the
    view a CPU tensor."""
    if ptr == 0 or num_bytes <= 0:
        raise ValueError(f"device_bytes_view: need a non-null pointer and num_bytes > 0, got {ptr:#x}, {num_bytes}")
    if ep_device.emulated():
        return torch.frombuffer((ctypes.c_uint8 * num_bytes).from_address(ptr), dtype=torch.uint8)

    class _CudaArray:
        # torch.as_tensor imports device memory described by __cuda_array_interface__ (finds the device from the
        # pointer's attributes).
        __cuda_array_interface__ = {  # noqa: RUF012
            "shape": (num_bytes,),
            "typestr": "|u1",
            "data": (ptr, False),
            "strides": None,
            "version": 2,
        }

    # No device= argument: one naming another device than the pointer's would make a copy.
    return torch.as_tensor(_CudaArray())


class PeerMappedBuffer:
    """``num_bytes`` of zeroed device memory on every rank of ``group``, mapped into the peers listed in ``ranks``
    through CUDA IPC.

    Collective over ``group`` (any torch.distributed backend; gloo is enough): every rank of the group constructs
    it, and the ranks of one ``ranks`` set pass the same ``num_bytes`` and ``ranks``. ``ranks`` are group ranks on
    this host (one node; default: the whole group), so each node's ranks may map their own set in one call; each
    rank opens the IPC handles of the others in ``ranks`` and uses its own pointer for itself (a process cannot open
    its own handle). Allocates on the current CUDA device.

    local_ptr: int, this rank's allocation. peer_ptrs: list[int] [group size], the address at which this process
    sees each rank's buffer (local_ptr at its own rank, 0 for ranks not mapped). close() releases everything.
    """

    def __init__(self, group: Any, num_bytes: int, ranks: collections.abc.Sequence[int] | None = None) -> None:
        self._closed = True  # until fully constructed: close() and __del__ then have nothing to undo
        what = "PeerMappedBuffer"
        if isinstance(num_bytes, bool) or not isinstance(num_bytes, int) or num_bytes <= 0:
            raise ValueError(f"{what}: num_bytes must be a positive int, got {num_bytes!r}")
        extension = _require_gpu_extension(what)
        _require_process_group(what)
        rank, num_ranks = _group_rank_and_size(group)
        mapped_ranks = list(range(num_ranks)) if ranks is None else [int(r) for r in ranks]
        if len(set(mapped_ranks)) != len(mapped_ranks) or any(not 0 <= r < num_ranks for r in mapped_ranks):
            raise ValueError(f"{what}: ranks must be distinct group ranks in [0, {num_ranks}), got {list(ranks)}")

        self._extension = extension
        self._group = group
        self.rank = rank
        self.num_ranks = num_ranks
        self.num_bytes = num_bytes
        self.local_ptr = 0
        self.peer_ptrs = [0] * num_ranks
        self._opened: list[int] = []  # peer pointers this process opened (and must close)

        # Allocate and export; an error is carried through the exchange so that every rank fails together, with
        # every failing rank's message, instead of peers waiting for a rank that gave up.
        error = None
        handle = b""
        try:
            self.local_ptr = extension.ipc_malloc(num_bytes)
            handle = extension.ipc_get_mem_handle(self.local_ptr)
        except Exception as exc:
            error = f"rank {rank}: allocating or exporting {num_bytes} bytes failed: {exc}"
        handles: list[Any] = [None] * num_ranks
        dist.all_gather_object(handles, (handle, num_bytes, mapped_ranks, error), group=group)
        errors = [entry[3] for entry in handles if entry[3]]
        # Only the ranks this one maps must agree with it: several nodes' ranks (or pairs) map their own sets in one
        # call over the whole group. A rank that maps this one without being mapped back sees the mismatch itself.
        mismatched = [r for r in mapped_ranks if (handles[r][1], handles[r][2]) != (num_bytes, mapped_ranks)]
        if mismatched and not errors:
            errors.append(
                f"ranks {mismatched} passed other (num_bytes, ranks) than rank {rank}'s ({num_bytes}, {mapped_ranks}): "
                f"{[(handles[r][1], handles[r][2]) for r in mismatched]}"
            )
        if not errors:
            try:
                for peer in mapped_ranks:
                    if peer == rank:
                        continue
                    peer_ptr = extension.ipc_open_mem_handle(handles[peer][0])
                    self._opened.append(peer_ptr)
                    self.peer_ptrs[peer] = peer_ptr
            except Exception as exc:
                error = f"rank {rank}: opening the IPC handle of rank {peer} failed: {exc}"
        # The closing exchange doubles as the barrier: nobody uses a peer's buffer before all are mapped.
        statuses: list[Any] = [None] * num_ranks
        dist.all_gather_object(statuses, error, group=group)
        errors += [status for status in statuses if status and status not in errors]
        self.peer_ptrs[rank] = self.local_ptr
        if errors:
            try:
                self._release()
            except DeepEPError as exc:
                errors.append(str(exc))
            raise DeepEPError(f"{what}({num_bytes} bytes, ranks {mapped_ranks}) failed: " + "; ".join(errors))
        self._closed = False

    def _release(self, keep_local: bool = False) -> None:
        """Close the peers' mappings and free the local allocation (unless keep_local: then free_local() does, later);
        local work only, no collective."""
        extension, opened = self._extension, self._opened
        self._opened, self.peer_ptrs = [], [0] * self.num_ranks
        failures = []
        for peer_ptr in opened:
            try:
                extension.ipc_close_mem_handle(peer_ptr)
            except Exception as exc:
                failures.append(f"closing peer mapping {peer_ptr:#x}: {exc}")
        if not keep_local:
            try:
                self.free_local()
            except DeepEPError as exc:
                failures.append(str(exc))
        if failures:
            raise DeepEPError(f"PeerMappedBuffer.close() on rank {self.rank}: " + "; ".join(failures))

    def free_local(self) -> None:
        """Free this rank's allocation (after close(keep_local=True)); idempotent."""
        local_ptr, self.local_ptr = self.local_ptr, 0
        if local_ptr:
            try:
                self._extension.ipc_free(local_ptr)
            except Exception as exc:
                raise DeepEPError(f"PeerMappedBuffer on rank {self.rank}: freeing {local_ptr:#x}: {exc}") from exc

    def close(self, keep_local: bool = False) -> None:
        """Collective: barrier (no peer still uses this rank's memory), then unmap the peers and free the local
        buffer. keep_local: leave the local allocation to a later free_local(), for memory that tensors still
        view (the peers' mappings of it are closed all the same). Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            # The kernels that used the buffers were issued on streams: drain them before anyone frees.
            ep_device.synchronize()
            if dist.is_initialized():
                dist.barrier(group=self._group)
        finally:
            self._release(keep_local)

    def view(self, rank: int | None = None) -> torch.Tensor:
        """uint8 CUDA tensor [num_bytes] over rank's buffer as this process sees it (own buffer by default)."""
        rank = self.rank if rank is None else rank
        if self._closed:
            raise DeepEPError("PeerMappedBuffer.view(): the buffer is closed")
        if not self.peer_ptrs[rank]:
            raise ValueError(f"PeerMappedBuffer.view(): rank {rank} is not mapped on rank {self.rank}")
        return device_bytes_view(self.peer_ptrs[rank], self.num_bytes)

    def __enter__(self) -> PeerMappedBuffer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def release_now(self, keep_local: bool = False) -> None:
        """close() without the barrier, for finalisers (a collective there could hang): drain this process's kernels,
        then unmap the peers and free the local buffer unless keep_local. Errors are swallowed. Idempotent. The drain
        may take up to the device timeout (kernels waiting for a dead peer), and one that runs while another stream
        captures a CUDA graph invalidates that capture (as the cudaFree after it would): destroy() a Buffer before a
        capture rather than dropping it."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        try:
            # A Buffer dropped without destroy() may still have kernels queued that store through the peers'
            # mappings or into this buffer: unmapping under them faults (and under MPS ends every rank on the GPU).
            # They end within the device timeout even where a peer is gone.
            ep_device.synchronize()
        except Exception:
            pass
        try:
            self._release(keep_local)
        except Exception:
            pass

    def __del__(self) -> None:
        self.release_now()


def ranks_share_gpu(num_local_ranks: int, num_local_devices: int) -> bool:
    """True when the ranks on this host outnumber its GPUs (several ranks per GPU, under MPS)."""
    return num_local_ranks > max(num_local_devices, 1)


def nvshmem_env_updates(
    environ: collections.abc.Mapping[str, str],
    *,
    num_symmetric_bytes: int = 0,
    share_gpu: bool = False,
    single_host: bool = False,
) -> dict[str, str]:
    """The NVSHMEM variables to set before init: the defaults that apply, less every variable environ already has.

    Pure (reads only its arguments). NVSHMEM_SYMMETRIC_SIZE, when unset and num_symmetric_bytes > 0, becomes
    num_symmetric_bytes + NVSHMEM_SYMMETRIC_MARGIN_BYTES rounded up to 2 MiB, and never less than NVSHMEM's own
    default (1 GiB): the heap NVSHMEM starts with, all of it where the heap cannot grow (see nvshmem_heap_grows).
    """
    defaults = dict(NVSHMEM_ENV_DEFAULTS)
    if share_gpu:
        defaults.update(NVSHMEM_SHARED_GPU_ENV_DEFAULTS)
    if single_host:
        defaults.update(NVSHMEM_SINGLE_HOST_ENV_DEFAULTS)
    if num_symmetric_bytes > 0:
        needed = num_symmetric_bytes + NVSHMEM_SYMMETRIC_MARGIN_BYTES
        needed = -(-needed // _SYMMETRIC_SIZE_GRANULARITY) * _SYMMETRIC_SIZE_GRANULARITY
        defaults["NVSHMEM_SYMMETRIC_SIZE"] = str(max(needed, NVSHMEM_DEFAULT_SYMMETRIC_BYTES))
    return {key: value for key, value in defaults.items() if key not in environ}


_NVSHMEM_TRUE = {"1", "y", "yes", "t", "true", "on"}


def nvshmem_heap_grows(environ: collections.abc.Mapping[str, str], machine: str, emulated: bool) -> bool:
    """Whether NVSHMEM maps more memory into its heap on demand (CUDA VMM on), so that NVSHMEM_SYMMETRIC_SIZE is
    where the heap starts, not its size. Pure. The emulator's heap is fixed, as NVSHMEM's is without VMM."""
    if emulated:
        return False
    disable = environ.get("NVSHMEM_DISABLE_CUDA_VMM")
    if disable is not None:
        return disable.strip().lower() not in _NVSHMEM_TRUE
    return not machine.startswith("ppc")  # NVSHMEM leaves VMM off by default on POWER only


class _NvshmemWorld:
    """This process's one NVSHMEM instance.

    NVSHMEM is a process-wide singleton: a second init while it runs joins the first, its rank and size ignored,
    and an init after a finalize is undefined (NVSHMEM reuses the first init's bootstrap). So it starts once, over
    the ranks of the first NvshmemContext, and serves every later context over the same ranks until
    finalize_nvshmem() or the end of the process.
    """

    def __init__(self, global_ranks: tuple[int, ...], env_set: dict[str, str], share_gpu: bool) -> None:
        self.global_ranks = global_ranks
        self.env_set = env_set
        self.share_gpu = share_gpu
        # The heap's ceiling, fixed now: the variable that sets it and its bytes (None where it does not parse:
        # NVSHMEM alone judges). A heap that grows stops at NVSHMEM_MAX_MEMORY_PER_GPU, a fixed one is its size.
        self.heap_grows = nvshmem_heap_grows(os.environ, platform.machine(), ep_device.emulated())
        if self.heap_grows:
            self.ceiling_variable = "NVSHMEM_MAX_MEMORY_PER_GPU"
            default = NVSHMEM_DEFAULT_MAX_MEMORY_PER_GPU
        else:
            self.ceiling_variable = "NVSHMEM_SYMMETRIC_SIZE"
            default = NVSHMEM_DEFAULT_SYMMETRIC_BYTES
        self.heap_size = os.environ.get(self.ceiling_variable, str(default))
        self.heap_bytes = parse_nvshmem_size(self.heap_size)
        self.num_open_contexts = 0
        self.num_requested_bytes = 0  # what the open contexts said they would malloc

    def check_room(self, what: str, num_symmetric_bytes: int) -> None:
        """DeepEPError, before any NVSHMEM call, where a joining context's bytes do not fit beside the open ones'
        (every rank has the same state, so all of them raise)."""
        if self.heap_bytes is None:
            return
        needed = self.num_requested_bytes + num_symmetric_bytes + NVSHMEM_SYMMETRIC_MARGIN_BYTES
        if needed > self.heap_bytes:
            raise DeepEPError(
                f"{what}: {num_symmetric_bytes} bytes of NVSHMEM's symmetric heap do not fit: it holds at most "
                f"{self.heap_bytes} ({self.ceiling_variable}={self.heap_size}), {self.num_requested_bytes} are "
                f"taken by {self.num_open_contexts} open context(s) and {NVSHMEM_SYMMETRIC_MARGIN_BYTES} kept for "
                f"NVSHMEM's own objects. {self.heap_advice()}"
            )

    def heap_advice(self) -> str:
        """What to set, and when, for a heap too small for what this process asks of it."""
        if self.heap_grows:
            return (
                f"The heap grows on demand up to {self.ceiling_variable}, read when NVSHMEM starts in the process: "
                "set it (or free GPU memory) before the first Buffer"
            )
        return (
            "The heap is sized once, when NVSHMEM starts in the process (NVSHMEM_DISABLE_CUDA_VMM is set, or the "
            "emulator runs): for Buffers of several sizes in one process, set NVSHMEM_SYMMETRIC_SIZE for all of "
            "them before the first"
        )


_SIZE_SUFFIXES = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def _take_back(env_set: dict[str, str]) -> None:
    """Unset the variables the library set, where they still hold its values (a value changed since is someone
    else's)."""
    for key, value in env_set.items():
        if os.environ.get(key) == value:
            del os.environ[key]


def parse_nvshmem_size(text: str) -> int | None:
    """Bytes of an NVSHMEM size setting as NVSHMEM reads it (a number, optionally with one k/m/g/t suffix, either
    case: "1073741824", "2G", "1.5g"), or None where it does not parse."""
    text = text.strip()
    scale = 1
    if text and text[-1].lower() in _SIZE_SUFFIXES:
        scale, text = _SIZE_SUFFIXES[text[-1].lower()], text[:-1]
    try:
        value = float(text)
    except ValueError:
        return None
    if not value >= 0 or value == float("inf"):
        return None
    return int(-(-value * scale // 1))


# The running NVSHMEM instance, or None; and whether finalize_nvshmem() ended one (it cannot start again).
_world: _NvshmemWorld | None = None
_world_ended = False


def _global_ranks(group: Any) -> tuple[int, ...]:
    """The global ranks of group (None: the default group), in group-rank order."""
    return tuple(dist.get_process_group_ranks(dist.group.WORLD if group is None else group))


def _world_state() -> tuple[Any, ...]:
    """What this process's NVSHMEM is, as exchanged with the peers: ("none",), ("ended",) or ("up", ranks)."""
    if _world is not None:
        return ("up", _world.global_ranks)
    return ("ended",) if _world_ended else ("none",)


def _world_conflict(what: str, global_ranks: tuple[int, ...], states: list[tuple[Any, ...]]) -> str:
    """The error for a context that the ranks' NVSHMEM states (group-rank order) do not let start or join."""
    by_state: dict[tuple[Any, ...], list[int]] = {}
    for rank, state in enumerate(states):
        by_state.setdefault(state, []).append(rank)
    parts = []
    for state, ranks in by_state.items():
        if state[0] == "up":
            parts.append(f"group ranks {ranks} run it over global ranks {list(state[1])}")
        elif state[0] == "ended":
            parts.append(f"group ranks {ranks} ended it (finalize_nvshmem)")
        else:
            parts.append(f"group ranks {ranks} have not started it")
    return (
        f"{what} over global ranks {list(global_ranks)}: NVSHMEM starts once per process, over one set of ranks, "
        f"and cannot start again after finalize_nvshmem(); here " + "; ".join(parts) + ". Build every "
        "low-latency or multi-node Buffer of a process over the same ranks (NVSHMEM would join a second group's "
        "init to the first one's ranks, and leaves an init after a finalize undefined)."
    )


def finalize_nvshmem() -> bool:
    """Collective over the ranks NVSHMEM runs on: end this process's NVSHMEM (nvshmem_finalize) and take back the
    variables set for it. Every NvshmemContext must be finalized first (every Buffer that uses NVSHMEM destroyed).
    NVSHMEM cannot start again in this process afterwards. Returns whether NVSHMEM was running.

    Optional: NvshmemContext.finalize() leaves NVSHMEM up for later contexts, and the end of the process releases
    it. Nothing collective runs at exit, where it would hang behind a peer that died."""
    global _world, _world_ended
    world = _world
    if world is None:
        return False
    if world.num_open_contexts:
        raise DeepEPError(
            f"finalize_nvshmem(): {world.num_open_contexts} NvshmemContext(s) are still open in this process "
            "(destroy their Buffers first)"
        )
    _world, _world_ended = None, True
    extension = _ext.load_extension()
    try:
        extension.nvshmem_finalize()
    finally:
        _take_back(world.env_set)
    return True


class NvshmemContext:
    """NVSHMEM over ``group``: PE = group rank, n_pes = group size, and the symmetric allocations of one user.

    Collective: every rank of the group constructs it. Call ``torch.cuda.set_device`` first: NVSHMEM binds each PE
    to the current CUDA device. The first context of a process starts NVSHMEM: group rank 0 makes the unique id,
    broadcast over the group, and every rank joins (nvshmem_init), after setting the variables of
    :func:`nvshmem_env_updates` in os.environ (a value already set is kept). ``num_symmetric_bytes``: what this
    context will malloc in all (sizes the heap). ``reserve_bytes``: what a later context of the same user may ask
    for, added to the heap NVSHMEM starts with where that heap cannot grow (see nvshmem_heap_grows), and not
    counted as taken. ``share_gpu``: whether several ranks share a GPU; None detects it (ranks on this host > its
    GPUs).

    NVSHMEM runs once per process (see _NvshmemWorld): a later context over the same global ranks joins the running
    instance and its heap, sized when it started; one over other ranks raises DeepEPError on every rank.
    finalize() frees what malloc() returned and leaves NVSHMEM up for the next context; finalize_nvshmem() ends it.
    """

    def __init__(
        self, group: Any = None, num_symmetric_bytes: int = 0, share_gpu: bool | None = None, reserve_bytes: int = 0
    ) -> None:
        global _world
        self._finalized = True  # until initialised
        what = "NvshmemContext"
        if num_symmetric_bytes < 0:
            raise ValueError(f"{what}: num_symmetric_bytes must be >= 0, got {num_symmetric_bytes}")
        if reserve_bytes < 0:
            raise ValueError(f"{what}: reserve_bytes must be >= 0, got {reserve_bytes}")
        extension = _require_gpu_extension(what)
        _require_process_group(what)
        try:
            # The device library linked into _C must not be newer than the host library loaded now.
            extension.nvshmem_check_version()
        except Exception as exc:
            raise DeepEPError(f"{what}: {exc}") from exc
        rank, num_ranks = _group_rank_and_size(group)
        global_ranks = _global_ranks(group)

        # Every rank's host and NVSHMEM state, so that all of them start, join or raise together.
        exchanged: list[Any] = [None] * num_ranks
        dist.all_gather_object(exchanged, (socket.gethostname(), _world_state()), group=group)
        hosts = [host for host, _ in exchanged]
        states = [state for _, state in exchanged]
        if all(state == ("up", global_ranks) for state in states):
            assert _world is not None
            world = _world
            world.check_room(what, num_symmetric_bytes)
        elif all(state == ("none",) for state in states):
            num_local_ranks = hosts.count(socket.gethostname())
            if share_gpu is None:
                share_gpu = ranks_share_gpu(num_local_ranks, ep_device.device_count())
            fixed_heap = not nvshmem_heap_grows(os.environ, platform.machine(), ep_device.emulated())
            env_set = nvshmem_env_updates(
                os.environ,
                num_symmetric_bytes=num_symmetric_bytes + (reserve_bytes if fixed_heap else 0),
                share_gpu=share_gpu,
                single_host=num_local_ranks == num_ranks,
            )
            os.environ.update(env_set)
            try:
                self._init(extension, group, rank, num_ranks, what, env_set)
            except BaseException:
                _take_back(env_set)
                raise
            world = _world = _NvshmemWorld(global_ranks, env_set, share_gpu)
        else:
            raise DeepEPError(_world_conflict(what, global_ranks, states))
        world.num_open_contexts += 1
        world.num_requested_bytes += num_symmetric_bytes
        self._num_symmetric_bytes = num_symmetric_bytes
        self._world = world
        self._extension = extension
        self.rank = rank
        self.num_ranks = num_ranks
        # What the process's NVSHMEM was started with (by this context or an earlier one).
        self.share_gpu = world.share_gpu
        self.env_set = world.env_set
        self._allocations: list[int] = []
        self._finalized = False

    @staticmethod
    def _init(extension: Any, group: Any, rank: int, num_ranks: int, what: str, env_set: dict[str, str]) -> None:
        """The unique id from group rank 0 to every rank, then nvshmem_init as PE rank of num_ranks."""
        unique_id_holder: list[Any] = [None]
        if rank == 0:
            try:
                unique_id_holder[0] = extension.nvshmem_get_unique_id()
            except Exception as exc:
                unique_id_holder[0] = f"rank 0: nvshmem_get_unique_id failed: {exc}"
        source = 0 if group is None else dist.get_global_rank(group, 0)
        dist.broadcast_object_list(unique_id_holder, src=source, group=group)
        if isinstance(unique_id_holder[0], str):
            raise DeepEPError(f"{what}: {unique_id_holder[0]}")
        try:
            extension.nvshmem_init(unique_id_holder[0], rank, num_ranks)
        except Exception as exc:
            raise DeepEPError(
                f"{what}: nvshmem_init as PE {rank} of {num_ranks} failed: {exc} (NVSHMEM variables set here: "
                f"{env_set})"
            ) from exc

    def _check_open(self, what: str) -> None:
        if self._finalized:
            raise DeepEPError(f"NvshmemContext.{what}(): the context is finalized")

    def malloc(self, num_bytes: int, alignment: int = 128) -> int:
        """Collective symmetric allocation of num_bytes, zero-filled on every PE before it returns. Returns the
        local device pointer; the same offset in every PE's heap."""
        self._check_open("malloc")
        try:
            ptr = self._extension.nvshmem_malloc(num_bytes, alignment)
        except Exception as exc:
            raise DeepEPError(
                f"NvshmemContext.malloc({num_bytes}): {exc} ({self._world.ceiling_variable}="
                f"{self._world.heap_size}). {self._world.heap_advice()}"
            ) from exc
        self._allocations.append(ptr)
        return ptr

    def free(self, ptr: int) -> None:
        """Collective: free a pointer malloc() returned."""
        self._check_open("free")
        if ptr not in self._allocations:
            raise ValueError(f"NvshmemContext.free(): {ptr:#x} was not allocated by this context")
        self._allocations.remove(ptr)
        self._extension.nvshmem_free(ptr)

    def peer_ptr(self, ptr: int, pe: int) -> int:
        """The address at which this process reaches PE pe's copy of symmetric ptr (P2P mapping), or 0."""
        self._check_open("peer_ptr")
        return self._extension.nvshmem_ptr(ptr, pe)

    def barrier(self) -> None:
        """nvshmem_barrier_all: every PE arrives, and prior NVSHMEM operations complete."""
        self._check_open("barrier")
        self._extension.nvshmem_barrier_all()

    def finalize(self) -> None:
        """Collective: free every allocation of this context. NVSHMEM stays up for the next context of the process
        (finalize_nvshmem() ends it). Idempotent."""
        if self._finalized:
            return
        self._finalized = True
        self._world.num_open_contexts -= 1
        self._world.num_requested_bytes -= self._num_symmetric_bytes
        allocations, self._allocations = self._allocations, []
        for ptr in reversed(allocations):
            self._extension.nvshmem_free(ptr)

    def __enter__(self) -> NvshmemContext:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.finalize()
