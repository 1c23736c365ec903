"""Which ranks form a node (an NVLink domain) and which are network peers.

Ranks on the same host form a node; ranks with the same local index on different nodes talk over the network.
An override (Buffer's num_ranks_per_node, or DEEP_EP_PY_RANKS_PER_NODE) lets one host play several nodes, so
the hierarchical path runs on one machine.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

import torch.distributed as dist

from .config import RANKS_PER_NODE_ENV, ranks_per_node_override


@dataclass(frozen=True)
class Topology:
    num_ranks: int
    num_ranks_per_node: int

    @property
    def num_nodes(self) -> int:
        return self.num_ranks // self.num_ranks_per_node

    def node_of(self, rank: int) -> int:
        return rank // self.num_ranks_per_node


def _ranks_per_node_from_hosts(hosts: list[str], num_ranks: int) -> int:
    """Ranks per node from the hosts the ranks run on; nodes must be equal, contiguous blocks of ranks."""
    per_node = hosts.count(hosts[0])
    blocks = [hosts[i : i + per_node] for i in range(0, num_ranks, per_node)]
    if num_ranks % per_node != 0 or any(len(set(b)) != 1 for b in blocks) or len({b[0] for b in blocks}) != len(blocks):
        raise ValueError(
            "group: expected ranks to be laid out as equal contiguous blocks per host, got hosts by rank "
            f"{hosts}; set num_ranks_per_node (or {RANKS_PER_NODE_ENV}) to say which ranks form a node"
        )
    return per_node


def detect_topology(
    group: dist.ProcessGroup, num_ranks_per_node: int | None, local_error: Exception | None = None
) -> Topology:
    """The argument wins over the environment, which wins over the hosts the ranks run on.

    Collective, and the first one of a Buffer: every rank passes what it made of its own arguments and environment
    (local_error: what it rejected), and every rank learns every rank's outcome. So a rank that rejects its input
    stops all ranks here, with its reason, instead of leaving them waiting in the next collective until the process
    group's timeout; and ranks that disagree on the ranks per node all raise.
    """
    num_ranks = dist.get_world_size(group)
    requested, source = num_ranks_per_node, "num_ranks_per_node"
    if local_error is None and requested is None:
        source = RANKS_PER_NODE_ENV
        try:
            requested = ranks_per_node_override()
        except ValueError as exc:
            local_error = exc
    reason = None if local_error is None else f"{type(local_error).__name__}: {local_error}"
    entries: list = [None] * num_ranks
    dist.all_gather_object(entries, (socket.gethostname(), requested, reason), group=group)
    failed = [f"rank {rank}: {entry[2]}" for rank, entry in enumerate(entries) if entry[2] is not None]
    if failed:
        if local_error is not None:
            raise local_error
        raise ValueError("Buffer: other ranks rejected their arguments or environment: " + "; ".join(failed))
    if len({repr(entry[1]) for entry in entries}) > 1:
        raise ValueError(f"{source}: ranks asked for different ranks per node: {[entry[1] for entry in entries]}")
    if requested is None:
        requested = _ranks_per_node_from_hosts([entry[0] for entry in entries], num_ranks)
    if isinstance(requested, bool) or not isinstance(requested, int) or requested <= 0:
        raise ValueError(f"{source}: expected a positive int, got {requested!r}")
    # An override larger than the group means "all of it is one node".
    requested = min(requested, num_ranks)
    if num_ranks % requested != 0:
        raise ValueError(f"{source}: expected a divisor of the group size {num_ranks}, got {requested}")
    return Topology(num_ranks=num_ranks, num_ranks_per_node=requested)
