"""The kernel backend: calls deep_ep_py._C where a kernel exists for the call, the reference elsewhere.

Kernels take raw device pointers and a stream handle (no torch in csrc/), so this module and the per-path modules
it drives (intranode.py, internode.py, low_latency.py) are where tensors become pointers. Outputs are allocated
with torch on the current stream, which Buffer has set to the communication stream.

What runs where:
- get_dispatch_layout (csrc/layout.cu), normal dispatch/combine within a node (intranode.py) and across nodes
  (internode.py), and the low-latency calls (low_latency.py): the kernels, only while
  DEEP_EP_PY_UNVERIFIED_KERNELS=1. They have been compiled but have not yet run on a GPU; until they pass the GPU
  tier (scripts/gpu_check.sh) the default is the reference implementation, which gives the same results at
  reference speed.
- anything on tensors off the kernels' device (CPU tensors, unless the CPU emulator runs the kernels: see
  deep_ep_py.device), and handles made by the reference: the reference.
"""

from __future__ import annotations

import os
import warnings

import torch

from .. import config as ep_config
from .._ext import load_extension
from ..config import Config
from ..device import available as device_available
from ..device import allocating_outputs, current_stream, is_current_stream_capturing, is_kernel_tensor
from ..runtime import device_bytes_view
from .reference import DispatchHandle, LowLatencyHandle, ReferenceBackend

# What the layout kernel's warp-per-token scheme supports (csrc/layout.cu).
LAYOUT_MAX_TOPK = 32
UNVERIFIED_KERNELS_ENV = "DEEP_EP_PY_UNVERIFIED_KERNELS"


def unverified_kernels_enabled() -> bool:
    return os.environ.get(UNVERIFIED_KERNELS_ENV, "0") not in ("", "0")


class CudaBackend(ReferenceBackend):
    name = "cuda"

    def __init__(self, group, topology, sizes) -> None:
        super().__init__(group, topology)
        self._C = load_extension()
        self.sizes = sizes
        self.intranode = None
        self.internode = None
        self.low_latency = None
        self.nvshmem = None
        self._group = group
        # A low-latency Buffer's internode kernels and their NVSHMEM context, made at its first normal dispatch
        # (_deferred_internode).
        self._internode_deferred = False
        self._internode_nvshmem = None
        # Where the layout kernel records an expert id out of range. Made here, not at the first layout: pinned host
        # allocations are not allowed while a CUDA graph is being captured. None where no kernel can run.
        self._layout_errors = self._C.ErrorRecord() if self._C is not None and device_available() else None
        self._warned_no_normal_kernels = False
        if not unverified_kernels_enabled():
            return
        # Collective construction: every rank of the group takes the same branches (same sizes, same topology).
        if sizes.num_recv_arena_bytes > 0 and topology.num_nodes > 1:
            warnings.warn(
                f"num_recv_arena_bytes: the receive arena serves the intranode kernels only; this group spans "
                f"{topology.num_nodes} nodes, so it is not allocated",
                RuntimeWarning,
                stacklevel=3,
            )
        if sizes.num_nvl_bytes > 0 and topology.num_nodes == 1:
            from .intranode import IntranodeKernels

            self.intranode = IntranodeKernels(
                group, topology, sizes.num_nvl_bytes, self._C, num_recv_arena_bytes=sizes.num_recv_arena_bytes
            )
        # Each NVSHMEM user (low latency, internode normal kernels) takes its own num_rdma_bytes from one heap.
        use_low_latency = sizes.low_latency_mode and sizes.num_rdma_bytes > 0
        use_internode = topology.num_nodes > 1 and sizes.num_rdma_bytes > 0
        if use_internode and use_low_latency:
            # InternodeKernels raises for groups past its limits; a low-latency Buffer of such a group (decode EP
            # over more than 128 ranks) worked before the internode kernels existed, so its normal calls stay on
            # the reference instead of failing its construction.
            limits = self._C.internode_layout(topology.num_ranks, topology.num_nodes)
            use_internode = (
                topology.num_ranks <= limits["max_ranks"]
                and topology.num_ranks_per_node <= limits["max_ranks_per_node"]
            )
            # Built at the first normal dispatch: decode Buffers (vLLM's low-latency one, NVLink bytes and all)
            # never make one, and the internode kernels take num_rdma_bytes more of NVSHMEM's heap (1.75 GiB a GPU
            # at the standard sizes) than the low-latency kernels alone.
            self._internode_deferred, use_internode = use_internode, False
        if use_low_latency or use_internode:
            from ..runtime import NvshmemContext
            from .low_latency import sync_words_bytes

            num_bytes = sizes.num_rdma_bytes
            if use_low_latency:
                num_bytes += sync_words_bytes(topology.num_ranks)  # the clean barrier's words beside its buffer
            # Where the heap cannot grow, it starts with room for the deferred internode kernels too.
            reserve = sizes.num_rdma_bytes if self._internode_deferred else 0
            self.nvshmem = NvshmemContext(group, num_symmetric_bytes=num_bytes, reserve_bytes=reserve)
        if use_internode:
            from .internode import InternodeKernels

            self.internode = InternodeKernels(group, topology, sizes.num_rdma_bytes, self._C, self.nvshmem)
        if use_low_latency:
            from .low_latency import LowLatencyKernels

            self.low_latency = LowLatencyKernels(
                group, topology, sizes.num_rdma_bytes, self._C, self.nvshmem, mask_on_timeout=sizes.enable_shrink
            )

    def _reference_reason(self) -> str:
        if not unverified_kernels_enabled():
            return f"the kernels run only with {UNVERIFIED_KERNELS_ENV}=1 until they have passed the GPU tier"
        if self._internode_deferred:
            return (
                "a low-latency Buffer builds its internode kernels at its first normal dispatch, which a capture "
                "cannot hold (collective allocations): make one before capturing"
            )
        return "no kernel of this Buffer takes the call: CPU tensors, a handle the reference made, or no bytes for it"

    # ------------------------------------------------------------------------------------------------ layout

    def _layout_kernel_takes(self, topk_idx: torch.Tensor) -> bool:
        return unverified_kernels_enabled() and is_kernel_tensor(topk_idx) and topk_idx.shape[1] <= LAYOUT_MAX_TOPK

    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int):
        if not self._layout_kernel_takes(topk_idx):
            return super().get_dispatch_layout(topk_idx, num_experts)
        num_tokens, num_topk = topk_idx.shape
        device = topk_idx.device
        num_ranks = self.num_ranks
        # Ids the host did not check (no sync: CUDA-graph capture, DEEP_EP_PY_SKIP_VALUE_CHECKS) and the kernel
        # found out of range, in an earlier call: raised here, once.
        self._layout_errors.check_and_reset("get_dispatch_layout (an earlier call's topk_idx)")
        num_nodes = self.topology.num_nodes
        with allocating_outputs():
            num_tokens_per_rank = torch.empty(num_ranks, dtype=torch.int32, device=device)
            num_tokens_per_rdma_rank = (
                torch.empty(num_nodes, dtype=torch.int32, device=device) if num_nodes > 1 else None
            )
            num_tokens_per_expert = torch.empty(num_experts, dtype=torch.int32, device=device)
            is_token_in_rank = torch.empty(num_tokens, num_ranks, dtype=torch.bool, device=device)
        self._C.get_dispatch_layout(
            topk_idx.data_ptr(),
            num_tokens,
            num_topk,
            num_experts,
            num_ranks,
            self.topology.num_ranks_per_node,
            num_tokens_per_rank.data_ptr(),
            num_tokens_per_rdma_rank.data_ptr() if num_tokens_per_rdma_rank is not None else 0,
            num_tokens_per_expert.data_ptr(),
            is_token_in_rank.data_ptr(),
            current_stream(device).cuda_stream,
            self._layout_errors.device_ptr,
            self.rank,
            ep_config.trap_on_device_error(is_current_stream_capturing()),
        )
        return num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank

    # ---------------------------------------------------------------------------------------------- normal

    def _normal_kernels(self, x: torch.Tensor, handle: DispatchHandle | None):
        """The normal-mode kernels (intranode or internode, whichever this topology built) that take this call, or
        None for the reference: tensors off the kernels' device, and handles the kernels did not make."""
        kernels = self.intranode if self.intranode is not None else self.internode
        if kernels is None and handle is None and is_kernel_tensor(x):
            kernels = self._deferred_internode()
        if kernels is None or not is_kernel_tensor(x):
            return None
        return kernels if handle is None or kernels.owns(handle) else None

    def _deferred_internode(self):
        """A low-latency Buffer's internode kernels, built now, at its first normal dispatch (collective: every rank
        makes that call), with an NVSHMEM context of their own; None where there are none to build, or where the
        call is being captured (the reference then refuses it, saying why)."""
        if not self._internode_deferred or is_current_stream_capturing():
            return None
        from ..runtime import NvshmemContext
        from .internode import InternodeKernels

        self._internode_deferred = False
        self._internode_nvshmem = NvshmemContext(self._group, num_symmetric_bytes=self.sizes.num_rdma_bytes)
        try:
            self.internode = InternodeKernels(
                self._group, self.topology, self.sizes.num_rdma_bytes, self._C, self._internode_nvshmem
            )
        except BaseException:
            self._internode_nvshmem.finalize()
            self._internode_nvshmem = None
            raise
        return self.internode

    def _warn_no_normal_kernels(self) -> None:
        """Once per Buffer: a normal-mode call on the kernels' device with the kernels on that no kernel module of
        this Buffer can take, because the Buffer was built without the bytes they need (num_nvl_bytes within a node,
        num_rdma_bytes across nodes). DeepEP fails such a call; this backend runs the reference, at its speed."""
        if self._warned_no_normal_kernels or not unverified_kernels_enabled():
            return
        self._warned_no_normal_kernels = True
        topology = self.topology
        if topology.num_nodes == 1:
            reason = f"num_nvl_bytes is {self.sizes.num_nvl_bytes} on a group of one node ({topology.num_ranks} ranks)"
        elif self.sizes.num_rdma_bytes == 0:
            reason = (
                f"num_rdma_bytes is 0 on a group of {topology.num_nodes} nodes x {topology.num_ranks_per_node} ranks "
                "(Config.get_rdma_buffer_size_hint counts nodes by DEEP_EP_PY_RANKS_PER_NODE, or 8 ranks a node: "
                "with Buffer(num_ranks_per_node=...) set the variable too, or pass the bytes yourself)"
            )
        else:
            reason = (
                f"the internode kernels do not take a low-latency group of {topology.num_ranks} ranks, "
                f"{topology.num_ranks_per_node} a node"
            )
        warnings.warn(
            # The caller of Buffer.dispatch: Buffer.dispatch, Buffer._run, its lambda, this backend's dispatch, here.
            f"dispatch/combine run on the reference backend, not the kernels: {reason}",
            RuntimeWarning,
            stacklevel=6,
        )

    def dispatch(self, x, x_scales, handle, *args, config: Config | None = None):
        """Arguments as ReferenceBackend.dispatch."""
        kernels = self._normal_kernels(x, handle)
        if kernels is None:
            if handle is None and is_kernel_tensor(x):
                self._warn_no_normal_kernels()
            return super().dispatch(x, x_scales, handle, *args, config=config)
        return kernels.dispatch(x, x_scales, handle, *args, num_sms=config.num_sms)

    def combine(self, x, handle, topk_weights, bias, config: Config | None = None):
        kernels = self._normal_kernels(x, handle)
        if kernels is None:
            return super().combine(x, handle, topk_weights, bias, config=config)
        return kernels.combine(x, handle, topk_weights, bias, num_sms=config.num_sms)

    # ----------------------------------------------------------------------------------------- low latency

    def _low_latency_takes(self, x: torch.Tensor, handle: LowLatencyHandle | None = None) -> bool:
        if self.low_latency is None or not is_kernel_tensor(x):
            return False
        return handle is None or self.low_latency.owns(handle)

    def checks_expert_ids_on_device(self, call: str, tensor: torch.Tensor) -> bool:
        if call == "get_dispatch_layout":
            return self._layout_kernel_takes(tensor)
        return call == "low_latency_dispatch" and self._low_latency_takes(tensor)

    def low_latency_dispatch(self, x, *args, **kwargs):
        if not self._low_latency_takes(x):
            return super().low_latency_dispatch(x, *args, **kwargs)
        return self.low_latency.low_latency_dispatch(x, *args, **kwargs)

    def low_latency_combine(self, x, topk_idx, topk_weights, handle, *args, **kwargs):
        if not self._low_latency_takes(x, handle):
            return super().low_latency_combine(x, topk_idx, topk_weights, handle, *args, **kwargs)
        return self.low_latency.low_latency_combine(x, topk_idx, topk_weights, handle, *args, **kwargs)

    def next_combine_buffer(self, handle, device):
        if self.low_latency is not None and self.low_latency.owns(handle):
            return self.low_latency.next_combine_buffer(handle, device)
        return super().next_combine_buffer(handle, device)

    def local_buffer_bytes(self, use_rdma_buffer: bool) -> torch.Tensor | None:
        # The RDMA buffer is the low-latency kernels' symmetric allocation where they exist (a low-latency Buffer
        # across nodes has a second one, for the internode kernels), as DeepEP's one RDMA buffer is what its
        # low-latency kernels use. The internode kernels forward inside a node through NVSHMEM and hold no NVLink
        # buffer.
        if use_rdma_buffer:
            kernels = self.low_latency if self.low_latency is not None else self.internode
            if kernels is None:
                return None
            return device_bytes_view(kernels.buffer_ptr, kernels.num_rdma_bytes)
        if self.intranode is None:
            return None
        return device_bytes_view(self.intranode.buffer.local_ptr, self.intranode.num_nvl_bytes)

    def clean_low_latency_buffer(self, num_experts: int) -> None:
        if self.low_latency is None:
            super().clean_low_latency_buffer(num_experts)
            return
        self.low_latency.clean_low_latency_buffer(num_experts)
        # The kernels' clean had its barriers; the reference's group barrier would wait for a rank that
        # enable_shrink masked as dead (or pair with another collective of that rank).
        self._zero_combine_buffers()

    def update_mask(self, rank: int, mask: bool) -> None:
        super().update_mask(rank, mask)
        if self.low_latency is not None:
            self.low_latency.update_mask(rank, mask)

    def query_mask(self, mask_status: torch.Tensor) -> None:
        # The kernels' device mask is the one their waits add to under enable_shrink; the reference's copy only
        # follows update_mask and clean_mask.
        if self.low_latency is not None:
            self.low_latency.query_mask(mask_status)
        else:
            super().query_mask(mask_status)

    def clean_mask(self) -> None:
        super().clean_mask()
        if self.low_latency is not None:
            self.low_latency.clean_mask()

    def destroy(self) -> None:
        # Collective, in the reverse order of construction.
        if self.low_latency is not None:
            self.low_latency.destroy()
            self.low_latency = None
        if self.internode is not None:
            self.internode.destroy()
            self.internode = None
        if self._internode_nvshmem is not None:
            self._internode_nvshmem.finalize()
            self._internode_nvshmem = None
        if self.nvshmem is not None:
            self.nvshmem.finalize()  # NVSHMEM itself stays up for the process's next Buffer
            self.nvshmem = None
        if self.intranode is not None:
            self.intranode.destroy()
            self.intranode = None
        super().destroy()
