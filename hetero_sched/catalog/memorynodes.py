"""Memory nodes: the machines a cluster KV store pools (Mooncake Store's memory pool, Dynamo's
remote KV tier).

A store of ``n`` such nodes is one endpoint of the transfer network with ``n`` times a node's
network bandwidth and its memory (blocks striped evenly over the nodes: a stated simplification
of the per-node placement real stores do). The catalog's memory nodes are data
(``memory_nodes:`` in ``hetero_sched/data/catalog/*.yaml``); overrides: ``memory.<name>.<field>``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from hetero_sched.catalog.sources import Source


@dataclass(frozen=True)
class MemoryNodeSpec:
    """One memory node: what a KV store built from it can hold and move, and what it costs."""

    name: str
    title: str
    memory_bytes: float
    """DRAM per node."""
    network_bytes_per_s: float
    """Its NIC, each direction: the store endpoint's share of egress and ingress."""
    message_cost_s: float
    """Fixed cost of one store read or write (an RDMA operation's setup and completion)."""
    dollars_per_hour: float
    sources: Mapping[str, Source] = field(default_factory=dict, compare=False)


MEMORY_NODE_FIELDS = ("memory_bytes", "network_bytes_per_s", "message_cost_s", "dollars_per_hour")
"""Numbers of a memory node (each with its source); overridable as ``memory.<name>.<field>``."""
