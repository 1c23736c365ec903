"""Variable-size all-to-all of token rows over any torch.distributed group (gloo included).

Every field of a token (payload, scales, indices, weights) travels as bytes in one row, so one collective moves
all of a call's data. Groups whose backend cannot move device tensors (gloo, MPI) exchange through host memory.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Sequence

import torch
import torch.distributed as dist

from ..config import TIMEOUT_ENV, timeout_s
from ..errors import DeepEPTimeoutError


def _as_byte_rows(field: torch.Tensor) -> torch.Tensor:
    """[n, ...] of any dtype -> uint8 [n, bytes per row]."""
    rows = field.reshape(field.shape[0], -1) if field.dim() != 1 else field.unsqueeze(1)
    return rows.contiguous().view(torch.uint8)


def _row_bytes(field: torch.Tensor) -> int:
    return math.prod(field.shape[1:]) * field.element_size()


class RowExchange:
    """Collectives of one process group, staged on `staging_device`."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        backend = str(dist.get_backend(group)).lower()
        self.staging_device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else None

    def stage(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.staging_device) if self.staging_device is not None else tensor.cpu()

    def all_gather_ints(self, values: Sequence[int]) -> torch.Tensor:
        """Every rank's `values` (same length on all ranks) -> int64 [num_ranks, len(values)] on the CPU."""
        local = self.stage(torch.tensor(list(values), dtype=torch.int64))
        gathered = [torch.empty_like(local) for _ in range(self.num_ranks)]
        self._wait(dist.all_gather(gathered, local, group=self.group, async_op=True), "all_gather")
        return torch.stack([t.cpu() for t in gathered])

    def exchange_rows(
        self,
        fields_per_dest: Sequence[Sequence[torch.Tensor]],
        recv_counts: Sequence[int],
        like: Sequence[torch.Tensor],
    ) -> list[torch.Tensor]:
        """Send fields_per_dest[d] (a list of [n_d, ...] tensors, one per field) to rank d.

        recv_counts[s] is the row count rank s sends here; `like` gives each field's dtype and trailing shape
        (a tensor of that kind, any row count; equal on every rank). Returns each field as the rows of rank 0,
        then rank 1, ..., concatenated.
        """
        send_rows = [
            torch.cat([_as_byte_rows(self.stage(f)) for f in fields], dim=1)
            if fields and fields[0].shape[0] > 0
            else None
            for fields in fields_per_dest
        ]
        row_widths = [_row_bytes(f) for f in like]
        width = sum(row_widths)
        send_counts = [0 if rows is None else rows.shape[0] for rows in send_rows]
        send = [rows for rows in send_rows if rows is not None]
        send_flat = torch.cat([r.reshape(-1) for r in send]) if send else self.stage(torch.empty(0, dtype=torch.uint8))
        recv_flat = self.stage(torch.empty(sum(recv_counts) * width, dtype=torch.uint8))
        work = dist.all_to_all_single(
            recv_flat,
            send_flat,
            output_split_sizes=[c * width for c in recv_counts],
            input_split_sizes=[c * width for c in send_counts],
            group=self.group,
            async_op=True,
        )
        self._wait(work, "all_to_all")
        recv = recv_flat.view(sum(recv_counts), width)
        fields = []
        start = 0
        for template, field_width in zip(like, row_widths):
            # a fresh [n, width] tensor: offset 0 and a row stride of exactly `width`, so it can be re-typed
            column = torch.empty(recv.shape[0], field_width, dtype=torch.uint8, device=recv.device)
            column.copy_(recv[:, start : start + field_width])
            column = column.view(template.dtype)
            fields.append(column.reshape(sum(recv_counts), *template.shape[1:]))
            start += field_width
        return fields

    def barrier(self) -> None:
        self._wait(dist.barrier(group=self.group, async_op=True), "barrier")

    def _wait(self, work: dist.Work, what: str) -> None:
        """Wait for a collective with a deadline: a dead or late peer raises instead of hanging."""
        limit = timeout_s()
        try:
            work.wait(timeout=datetime.timedelta(seconds=limit))
        except RuntimeError as exc:
            if "timed out" not in str(exc).lower():
                raise
            raise DeepEPTimeoutError(
                f"rank {self.rank}: {what} over the group of {self.num_ranks} ranks did not complete within "
                f"{limit:g} s: a peer is dead, late, or made a different call ({TIMEOUT_ENV} sets the limit)"
            ) from exc
