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


def _ranks_per_node_from_hosts(group: dist.ProcessGroup, num_ranks: int) -> int:
    """Ranks per node from the hosts the ranks run on; nodes must be equal, contiguous blocks of ranks."""
    hosts: list[str | None] = [None] * num_ranks
    dist.all_gather_object(hosts, socket.gethostname(), group=group)
    per_node = hosts.count(hosts[0])
    blocks = [hosts[i : i + per_node] for i in range(0, num_ranks, per_node)]
    if num_ranks % per_node != 0 or any(len(set(b)) != 1 for b in blocks) or len({b[0] for b in blocks}) != len(blocks):
        raise ValueError(
            "group: expected ranks to be laid out as equal contiguous blocks per host, got hosts by rank "
            f"{hosts}; set num_ranks_per_node (or {RANKS_PER_NODE_ENV}) to say which ranks form a node"
        )
    return per_node


def detect_topology(group: dist.ProcessGroup, num_ranks_per_node: int | None) -> Topology:
    """The argument wins over the environment, which wins over the hosts the ranks run on."""
    num_ranks = dist.get_world_size(group)
    source = "num_ranks_per_node"
    if num_ranks_per_node is None:
        num_ranks_per_node = ranks_per_node_override()
        source = RANKS_PER_NODE_ENV
    if num_ranks_per_node is None:
        num_ranks_per_node = _ranks_per_node_from_hosts(group, num_ranks)
    if isinstance(num_ranks_per_node, bool) or not isinstance(num_ranks_per_node, int) or num_ranks_per_node <= 0:
        raise ValueError(f"{source}: expected a positive int, got {num_ranks_per_node!r}")
    # An override larger than the group means "all of it is one node".
    num_ranks_per_node = min(num_ranks_per_node, num_ranks)
    if num_ranks % num_ranks_per_node != 0:
        raise ValueError(f"{source}: expected a divisor of the group size {num_ranks}, got {num_ranks_per_node}")
    return Topology(num_ranks=num_ranks, num_ranks_per_node=num_ranks_per_node)
