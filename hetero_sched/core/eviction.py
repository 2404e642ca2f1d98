"""Eviction policies of a KV tier: which cached prefix block leaves when the tier is full.

A tier is a set of prefix-block hashes with a block budget. Two policies, as the KV offload
systems offer them (LMCache, Dynamo's KV block manager, Mooncake Store):

- ``lru``: least recently used leaves first — the prefix cache's own policy (vLLM, SGLang);
- ``lfu``: least frequently used (uses while resident) leaves first, the least recent among
  equals — keeps a shared system prompt's blocks however long a burst of one-off prompts is.

Both answer with the same small surface: ``in``, ``matched`` (a leading-run query, no update),
``touch`` (a use), ``add``, ``remove`` and ``victims`` (what leaves to get back within budget).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from typing import Sequence

POLICIES = ("lru", "lfu")
"""Eviction policies a tier may use."""


class BlockSet:
    """A tier's resident blocks under an eviction policy (base: the interface, no policy)."""

    capacity_blocks: int

    def __contains__(self, h: int) -> bool:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def matched(self, hashes: Sequence[int]) -> int:
        """Leading blocks of ``hashes`` resident (a query: no use recorded)."""
        n = 0
        for h in hashes:
            if h not in self:
                break
            n += 1
        return n

    def touch(self, h: int) -> None:
        """Record a use of the resident block ``h``."""
        raise NotImplementedError

    def add(self, h: int) -> None:
        """Make ``h`` resident (as just used); may exceed the budget until :meth:`victims`."""
        raise NotImplementedError

    def remove(self, h: int) -> None:
        """Drop ``h`` (moved to another tier)."""
        raise NotImplementedError

    def victims(self) -> list[int]:
        """Evict until within budget; the evicted blocks, first evicted first."""
        raise NotImplementedError


class LRUBlocks(BlockSet):
    """Least recently used leaves first."""

    def __init__(self, capacity_blocks: int) -> None:
        self.capacity_blocks = capacity_blocks
        self._order: OrderedDict[int, None] = OrderedDict()

    def __contains__(self, h: int) -> bool:
        return h in self._order

    def __len__(self) -> int:
        return len(self._order)

    def touch(self, h: int) -> None:
        self._order.move_to_end(h)

    def add(self, h: int) -> None:
        self._order[h] = None

    def remove(self, h: int) -> None:
        del self._order[h]

    def victims(self) -> list[int]:
        out: list[int] = []
        order = self._order
        while len(order) > self.capacity_blocks:
            out.append(order.popitem(last=False)[0])
        return out


class LFUBlocks(BlockSet):
    """Least frequently used leaves first (uses counted while resident), least recent among equals.

    A heap of ``(uses, last use, hash)`` with lazy deletion: a touch pushes a new entry and the
    stale one is skipped when it surfaces (the heap is rebuilt when stale entries dominate).
    """

    def __init__(self, capacity_blocks: int) -> None:
        self.capacity_blocks = capacity_blocks
        self._entry: dict[int, tuple[int, int]] = {}     # hash -> (uses, last use)
        self._heap: list[tuple[int, int, int]] = []
        self._clock = 0

    def __contains__(self, h: int) -> bool:
        return h in self._entry

    def __len__(self) -> int:
        return len(self._entry)

    def _push(self, h: int, uses: int) -> None:
        self._clock += 1
        self._entry[h] = (uses, self._clock)
        heapq.heappush(self._heap, (uses, self._clock, h))
        if len(self._heap) > 4 * len(self._entry) + 64:
            self._heap = [(u, t, k) for k, (u, t) in self._entry.items()]
            heapq.heapify(self._heap)

    def touch(self, h: int) -> None:
        self._push(h, self._entry[h][0] + 1)

    def add(self, h: int) -> None:
        self._push(h, 1)

    def remove(self, h: int) -> None:
        del self._entry[h]

    def victims(self) -> list[int]:
        out: list[int] = []
        entry = self._entry
        heap = self._heap
        while len(entry) > self.capacity_blocks:
            uses, t, h = heapq.heappop(heap)
            if entry.get(h) == (uses, t):
                del entry[h]
                out.append(h)
        return out


def make_block_set(policy: str, capacity_blocks: int) -> BlockSet:
    """A tier's block set under ``policy`` (``lru`` | ``lfu``)."""
    if policy == "lru":
        return LRUBlocks(capacity_blocks)
    if policy == "lfu":
        return LFUBlocks(capacity_blocks)
    raise ValueError(f"unknown eviction policy {policy!r} ({', '.join(POLICIES)})")
