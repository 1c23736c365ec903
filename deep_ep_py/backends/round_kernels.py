"""What the round-based normal kernels (intranode.py, internode.py) share on the host: the error record and host
counters of one Buffer, the wait for a notify kernel's counts, output allocation (poisoned for tests), and telling
their own handles from others'."""

from __future__ import annotations

import itertools
from typing import Any

import torch

from .. import config as ep_config
from ..device import allocating_outputs, is_current_stream_capturing
from ..errors import DeepEPError
from ..recv_arena import Part
from .reference import DispatchHandle

__all__ = ["RoundKernels", "UNBOUNDED_ROUNDS"]

# Host waits get this much longer than device waits, so a peer that never arrives is reported by the device record
# (which names the missing rank) rather than by the host's own deadline.
HOST_WAIT_EXTRA_S = 5.0

# The host counters' sequence numbers run 1..MAX_HOST_SEQUENCE, then wrap to 1 (the kernels take an int).
MAX_HOST_SEQUENCE = 2**31 - 1

# max_rounds of a notify whose host waits for the counts and launches as many rounds as they need: no cap on the
# device's round count, only int arithmetic kept far from overflow.
UNBOUNDED_ROUNDS = 1 << 30

# The owner of a handle's backend_state: a token unique for the process's lifetime (id() of a destroyed object can
# be reused by a new one, which would then accept the old handles with their rows_per_round).
_owner_tokens = itertools.count(1)


class RoundKernels:
    """Base of IntranodeKernels and InternodeKernels. `path`: the name used in messages ("intranode");
    `state_type`: the dataclass the subclass keeps in DispatchHandle.backend_state (with an `owner` field);
    `constants`: the extension's layout dict (num_host_counters, counter_* indices)."""

    def __init__(self, ext: Any, path: str, state_type: type, constants: dict[str, int]) -> None:
        if ext is None:
            raise DeepEPError(f"{path} kernels: the CUDA extension deep_ep_py._C is not loaded")
        self._ext = ext
        self._path = path
        self._state_type = state_type
        self._constants = constants
        self.error_record = ext.ErrorRecord()
        self.host_counters = ext.HostCounters(constants["num_host_counters"])
        self._sequence = 0  # of the host counters: one per dispatch that the host waits for
        self._owner = next(_owner_tokens)
        # Test hook: fill fresh outputs with this byte instead of leaving them uninitialised.
        self.debug_poison_byte: int | None = None

    def _timeout_s(self) -> float:
        return ep_config.timeout_s()

    def _wait_args(self) -> dict[str, Any]:
        """The error record, timeout and trap setting of a launch on the current stream."""
        return {
            "error_record": self.error_record.device_ptr,
            "timeout_s": self._timeout_s(),
            "trap_on_error": ep_config.trap_on_device_error(is_current_stream_capturing()),
        }

    def _check_device_errors(self, what: str) -> None:
        """DeepEPTimeoutError if a device wait of an earlier call (or this one) timed out."""
        self.error_record.check(what)

    def _empty(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Fresh handle state on the current (communication) stream, where later calls read it; poisoned for tests."""
        return self._poisoned(torch.empty(shape, dtype=dtype, device=device))

    def _empty_outputs(self, parts: list[Part | None], device: torch.device) -> list[torch.Tensor | None]:
        """Fresh results for the caller, one per part (None stays None): allocated where allocating_outputs() says
        (the caller's stream unless allocate_on_comm_stream), then poisoned for tests on the current stream, so that
        the fill runs before this call's kernels write them."""
        with allocating_outputs():
            outputs = [torch.empty(p.shape, dtype=p.dtype, device=device) if p is not None else None for p in parts]
        return [self._poisoned(out) if out is not None else None for out in outputs]

    def _poisoned(self, out: torch.Tensor) -> torch.Tensor:
        if self.debug_poison_byte is not None:
            out.view(torch.uint8).fill_(self.debug_poison_byte)
        return out

    def _combine_outputs(
        self, num_tokens: int, hidden: int, num_topk: int, several_rounds: bool, device: torch.device
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """(acc_x float32 [T, H], acc_weights float32 [T, K], combined_x bf16 [T, H], combined_weights float32
        [T, K]) of a combine; the float32 accumulators (scratch, on the current stream) only when the combine runs
        in several rounds, the weights only with top-k weights (K > 0)."""
        acc_x = torch.empty((num_tokens, hidden), dtype=torch.float32, device=device) if several_rounds else None
        acc_weights = (
            torch.empty((num_tokens, num_topk), dtype=torch.float32, device=device)
            if several_rounds and num_topk
            else None
        )
        weights = Part((num_tokens, num_topk), torch.float32) if num_topk else None
        combined = Part((num_tokens, hidden), torch.bfloat16)
        combined_x, combined_weights = self._empty_outputs([combined, weights], device)
        assert combined_x is not None
        return acc_x, acc_weights, combined_x, combined_weights

    def _next_sequence(self) -> int:
        # 0 means "no host counters" to the kernels, and a long-running server passes 2^31 host-synced dispatches
        # in days. The host waits for equality, so the wrap is safe.
        self._sequence = self._sequence % MAX_HOST_SEQUENCE + 1
        return self._sequence

    def _wait_host_counters(self, sequence: int, rank: int) -> None:
        """Wait (GIL released) until the notify kernel of call `sequence` has filled the host counters."""
        self.host_counters.wait_eq(
            self._constants["counter_sequence"],
            sequence,
            self._timeout_s() + HOST_WAIT_EXTRA_S,
            f"the {self._path} dispatch notify (counts from every rank)",
            self.error_record.host_ptr,
            rank,
        )
        self._check_device_errors(f"{self._path} dispatch notify")

    def _counter(self, name: str, offset: int = 0) -> int:
        return self.host_counters.get(self._constants[name] + offset)

    def _per_expert_counts(self, num_local_experts: int) -> list[int]:
        return self.host_counters.get_range(self._constants["counter_expert_base"], num_local_experts)

    def owns(self, handle: DispatchHandle) -> bool:
        """Whether handle came from this object's dispatch (else the caller runs the reference)."""
        state = handle.backend_state
        return isinstance(state, self._state_type) and state.owner == self._owner

    def _state_of(self, handle: DispatchHandle) -> Any:
        if not self.owns(handle):
            raise ValueError(f"handle: expected a handle made by this buffer's {self._path} dispatch")
        return handle.backend_state
