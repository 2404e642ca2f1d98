"""A cluster KV store: a pool of memory nodes any prefill group reads prefixes from over the network.

Mooncake Store / Dynamo's remote tier: prefix blocks live in a pool outside the groups, so a
prefix computed on one prefill group is a hit on every other. The store is one endpoint of the
core's :class:`~hetero_sched.core.transfer.TransferNetwork` (its nodes' NICs added up; blocks
striped evenly over them), so its reads and writes share bandwidth max-min with the KV
transfers from prefill to decode groups — a prefill group's egress carries both its KV
transfers and its writes to the store, its ingress its reads from it.

- **Writes**: when a prefill ends, its prompt's full blocks that the store neither holds nor is
  receiving are written to it (one flow from the group). A block is readable once its write
  landed; the store evicts by its policy (LRU or LFU) when full.
- **Reads**: when a request is placed on a prefill group, the core plans its prefix with the
  store in view (:meth:`~hetero_sched.core.kvtiers.KVTiers.plan`, the store's blocks costed at
  the uncontended network path). If the cheapest plan reads blocks from the store, they are
  fetched now — one flow to the group, while the request waits — and the request joins the
  prefill queue when they land, with those blocks in device memory (*staged*). Otherwise it is
  queued at once and recomputes them.

Flows of the store have negative transfer ids (the scheduler's own are >= 0). A group that fails
loses its reads in flight (their requests are placed again) and its writes (never landed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from hetero_sched.core.eviction import BlockSet, make_block_set
from hetero_sched.core.kvtiers import KVTiers, PrefixPlan
from hetero_sched.core.request import RequestState
from hetero_sched.core.transfer import TransferNetwork


@dataclass
class StoreFlow:
    """A read from the store into a group (``request`` set) or a write from a group into it."""

    group_id: int
    hashes: tuple[int, ...]
    num_bytes: float
    start_s: float
    request: Optional[RequestState] = None


@dataclass
class StoreStats:
    """What the store did, for the run summary."""

    read_bytes: float = 0.0
    written_bytes: float = 0.0
    reads: int = 0
    """Prefix fetches from the store (flows)."""
    writes: int = 0
    evicted_blocks: int = 0
    read_s: list[float] = field(default_factory=list)
    """Each fetch's time from start to landing (queueing for bandwidth included)."""


class ClusterKVStore:
    """The store's resident blocks, its flows in flight, and its place in the network."""

    def __init__(self, capacity_bytes: float, bytes_per_s: float, message_s: float, policy: str,
                 bytes_per_token: int, num_nodes: int = 1, node: str = "", dollars_per_hour: float = 0.0) -> None:
        self.capacity_bytes = capacity_bytes
        self.bytes_per_s = bytes_per_s
        """All nodes' NICs, each direction: the store endpoint's egress and ingress."""
        self.message_s = message_s
        self.policy = policy
        self.bytes_per_token = bytes_per_token
        self.num_nodes = num_nodes
        self.node = node
        self.dollars_per_hour = dollars_per_hour
        self.endpoint = -1
        """Its index in the transfer network (after the groups; set by the scheduler)."""
        self.block_tokens = 0
        self.block_bytes = 0.0
        self.blocks: Optional[BlockSet] = None
        self._writing: set[int] = set()
        self._written_by: dict[int, int] = {}
        """Per resident block, the write (flow id) that stored it: an executor's copy is that version."""
        self.flows: dict[int, StoreFlow] = {}
        self._next_id = -1
        self.stats = StoreStats()

    def sized(self, block_tokens: int) -> None:
        """Size the store at the trace's prefix-block size on first use."""
        if self.block_tokens:
            return
        self.block_tokens = block_tokens
        self.block_bytes = float(block_tokens * self.bytes_per_token)
        self.blocks = make_block_set(self.policy, int(self.capacity_bytes // self.block_bytes))

    @property
    def capacity_blocks(self) -> int:
        return 0 if self.blocks is None else self.blocks.capacity_blocks

    def holds(self, h: int) -> bool:
        """Whether block ``h`` is readable from the store now (written and not evicted)."""
        blocks = self.blocks
        return blocks is not None and h in blocks

    def _flow_id(self) -> int:
        tid = self._next_id
        self._next_id -= 1
        return tid

    def read(self, now_s: float, rs: RequestState, group_id: int, hashes: Sequence[int],
             network: TransferNetwork) -> tuple[int, list[int]]:
        """Start fetching ``hashes`` (held here) into ``group_id`` for ``rs``; returns the flow's id
        and the network's transfers found finished meanwhile."""
        blocks = self.blocks
        assert blocks is not None
        for h in hashes:
            blocks.touch(h)                      # a use, for the eviction policy
        tid = self._flow_id()
        nbytes = len(hashes) * self.block_bytes
        self.flows[tid] = StoreFlow(group_id, tuple(hashes), nbytes, now_s, rs)
        self.stats.reads += 1
        self.stats.read_bytes += nbytes
        return tid, network.start(now_s, tid, self.endpoint, group_id, nbytes)

    def write(self, now_s: float, group_id: int, hashes: Sequence[int],
              network: TransferNetwork) -> Optional[tuple[int, tuple[int, ...], list[int]]]:
        """Write the blocks of ``hashes`` the store neither holds nor is receiving, from
        ``group_id``; returns ``(flow id, blocks written, transfers finished meanwhile)``, or None
        when there is nothing new."""
        blocks = self.blocks
        assert blocks is not None
        new = tuple(h for h in hashes if h not in blocks and h not in self._writing)
        for h in hashes:
            if h in blocks:
                blocks.touch(h)
        if not new:
            return None
        self._writing.update(new)
        tid = self._flow_id()
        nbytes = len(new) * self.block_bytes
        self.flows[tid] = StoreFlow(group_id, new, nbytes, now_s)
        self.stats.writes += 1
        self.stats.written_bytes += nbytes
        return tid, new, network.start(now_s, tid, group_id, self.endpoint, nbytes)

    def landed(self, now_s: float, tid: int) -> tuple[Optional[StoreFlow], list[tuple[int, int]]]:
        """Flow ``tid`` finished: a read's blocks are in its group's device memory, a write's are
        readable here. Returns the flow (None if cancelled) and the blocks the store evicted, each
        with the write that had stored it."""
        flow = self.flows.pop(tid, None)
        if flow is None:
            return None, []
        blocks = self.blocks
        assert blocks is not None
        if flow.request is not None:
            self.stats.read_s.append(now_s - flow.start_s)
            return flow, []
        for h in flow.hashes:
            self._writing.discard(h)
            blocks.add(h)                        # not resident: a write takes only blocks it lacks
            self._written_by[h] = tid
        evicted = [(h, self._written_by.pop(h)) for h in blocks.victims()]
        self.stats.evicted_blocks += len(evicted)
        return flow, evicted

    def cancel_group(self, now_s: float, group_id: int, network: TransferNetwork) -> list[int]:
        """``group_id`` failed: cancel its reads and writes in flight; returns their flow ids."""
        gone = [tid for tid, f in self.flows.items() if f.group_id == group_id]
        for tid in gone:
            flow = self.flows.pop(tid)
            network.cancel(now_s, tid)
            if flow.request is None:
                self._writing.difference_update(flow.hashes)
        return gone


class PrefixPlanner:
    """The core's prefix plan for a group — its tiers, and the cluster store if there is one —
    for the scheduler's fetch decision and for policies (``GroupView.prefix_plan``): one formula."""

    def __init__(self, tiers: KVTiers, store: Optional[ClusterKVStore], ingress_bytes_per_s: float) -> None:
        self.tiers = tiers
        self.store = store
        self.ingress_bytes_per_s = ingress_bytes_per_s

    def plan(self, hashes: Sequence[int], block_tokens: int, prompt_tokens: int, prefill_tokens: int) -> PrefixPlan:
        """How a prompt would reuse its prefix on this group now: its blocks in the store cost the
        uncontended read over the network (the store's NICs or the group's ingress, the slower)."""
        store = self.store
        if store is None:
            return self.tiers.plan(hashes, block_tokens, prompt_tokens, prefill_tokens)
        store.sized(block_tokens)
        return self.tiers.plan(hashes, block_tokens, prompt_tokens, prefill_tokens, None, store.holds,
                               min(store.bytes_per_s, self.ingress_bytes_per_s), store.message_s)

    def from_store(self, hashes: Sequence[int], plan: PrefixPlan) -> tuple[int, ...]:
        """The blocks ``plan`` reads from the store (reused, and in none of the group's tiers)."""
        tiers = self.tiers
        return tuple(h for h in hashes[:plan.blocks] if tiers.tier_of(h) is None)
