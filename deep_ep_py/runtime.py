"""Peer-mapped device buffers (CUDA IPC) and the NVSHMEM context, over deep_ep_py._C; no kernels here.

- :class:`PeerMappedBuffer`: one device allocation per rank, every rank of a node mapping every other's. The
  intranode kernels read and write peers' buffers through ``peer_ptrs``.
- :class:`NvshmemContext`: NVSHMEM bootstrapped over a torch.distributed group, with the environment defaults
  this project needs (:data:`NVSHMEM_ENV_DEFAULTS`, computed by the pure :func:`nvshmem_env_updates`), symmetric
  allocations and teardown.

Both need the compiled extension and a CUDA device, and raise :class:`~deep_ep_py.errors.DeepEPError` naming what
is missing otherwise. The caller selects the CUDA device (``torch.cuda.set_device``) before constructing either:
allocations land on the current device. Waiting on host-mapped counters is ``_C.HostCounters.wait_ge``.
"""

from __future__ import annotations

import atexit
import collections.abc
import ctypes
import os
import socket
import weakref
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
    "nvshmem_env_updates",
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
        """close() without the barrier, for finalisers (a collective there could hang): unmap the peers and free the
        local buffer unless keep_local. Errors are swallowed. Idempotent."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
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
    default (1 GiB): the heap grows on demand, its size is a ceiling.
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


class NvshmemContext:
    """NVSHMEM initialised over ``group``: PE = group rank, n_pes = group size.

    Collective: every rank of the group constructs it. Call ``torch.cuda.set_device`` first: NVSHMEM binds each PE
    to the current CUDA device. Before init, sets the variables of :func:`nvshmem_env_updates` in os.environ (a
    value already set is kept). ``num_symmetric_bytes``: what this context will malloc in all (sizes the heap).
    ``share_gpu``: whether several ranks share a GPU; None detects it (ranks on this host > its GPUs).

    Group rank 0 makes the unique id, broadcast over the group; every rank then joins (nvshmem_init). finalize()
    frees what malloc() returned and finalizes; it is idempotent and also runs at interpreter exit (best effort).
    It also takes back the variables this context set (those still holding its values), so that a later context
    sizes its own heap instead of taking this one's NVSHMEM_SYMMETRIC_SIZE for the user's.
    """

    def __init__(self, group: Any = None, num_symmetric_bytes: int = 0, share_gpu: bool | None = None) -> None:
        self._finalized = True  # until initialised
        what = "NvshmemContext"
        if num_symmetric_bytes < 0:
            raise ValueError(f"{what}: num_symmetric_bytes must be >= 0, got {num_symmetric_bytes}")
        extension = _require_gpu_extension(what)
        _require_process_group(what)
        try:
            # The device library linked into _C must not be newer than the host library loaded now.
            extension.nvshmem_check_version()
        except Exception as exc:
            raise DeepEPError(f"{what}: {exc}") from exc
        rank, num_ranks = _group_rank_and_size(group)

        hosts: list[Any] = [None] * num_ranks
        dist.all_gather_object(hosts, socket.gethostname(), group=group)
        num_local_ranks = hosts.count(socket.gethostname())
        if share_gpu is None:
            share_gpu = ranks_share_gpu(num_local_ranks, ep_device.device_count())
        self.env_set = nvshmem_env_updates(
            os.environ,
            num_symmetric_bytes=num_symmetric_bytes,
            share_gpu=share_gpu,
            single_host=num_local_ranks == num_ranks,
        )
        os.environ.update(self.env_set)
        try:
            self._init(extension, group, rank, num_ranks, what)
        except BaseException:
            self._restore_env()
            raise
        self._extension = extension
        self.rank = rank
        self.num_ranks = num_ranks
        self.share_gpu = share_gpu
        self._allocations: list[int] = []
        self._finalized = False
        # A weak reference: registering at exit must not keep the context alive.
        self_ref = weakref.ref(self)

        def finalize_at_exit() -> None:
            context = self_ref()
            if context is not None:
                try:
                    context.finalize()
                except Exception:
                    pass

        self._atexit_hook = finalize_at_exit
        atexit.register(finalize_at_exit)

    def _init(self, extension: Any, group: Any, rank: int, num_ranks: int, what: str) -> None:
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
                f"{self.env_set})"
            ) from exc

    def _restore_env(self) -> None:
        """Unset the variables this context set, where they still hold its values (a value changed since is
        someone else's)."""
        for key, value in self.env_set.items():
            if os.environ.get(key) == value:
                del os.environ[key]

    def _check_open(self, what: str) -> None:
        if self._finalized:
            raise DeepEPError(f"NvshmemContext.{what}(): the context is finalized")

    def malloc(self, num_bytes: int, alignment: int = 128) -> int:
        """Collective symmetric allocation of num_bytes, zero-filled on every PE before it returns. Returns the
        local device pointer; the same offset in every PE's heap."""
        self._check_open("malloc")
        ptr = self._extension.nvshmem_malloc(num_bytes, alignment)
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
        """Collective: free every allocation, then nvshmem_finalize. Idempotent."""
        if self._finalized:
            return
        self._finalized = True
        atexit.unregister(self._atexit_hook)
        allocations, self._allocations = self._allocations, []
        try:
            for ptr in reversed(allocations):
                self._extension.nvshmem_free(ptr)
        finally:
            try:
                self._extension.nvshmem_finalize()
            finally:
                self._restore_env()

    def __enter__(self) -> NvshmemContext:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.finalize()
