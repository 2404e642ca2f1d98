"""Paged KV memory of a group (counted blocks) and a prefix cache keyed by block hashes.

Only counts matter to the schedule — which physical block holds what is the backend's
business — so the allocator is a counter with nano-vllm's check/commit pair.
The prefix cache has its own granularity (the trace's hash block, e.g. Mooncake's 512 tokens),
independent of the paging block size (DESIGN contract §7).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks needed to hold ``tokens`` tokens."""
    return -(-tokens // block_size)


class BlockAllocator:
    """A fixed pool of KV blocks: ``can_allocate`` / ``allocate`` / ``free``."""

    __slots__ = ("num_blocks", "num_used")

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.num_used = 0

    @property
    def num_free(self) -> int:
        return self.num_blocks - self.num_used

    def can_allocate(self, num_blocks: int) -> bool:
        """Whether ``num_blocks`` more blocks fit now."""
        return self.num_used + num_blocks <= self.num_blocks

    def allocate(self, num_blocks: int) -> None:
        """Take ``num_blocks`` blocks (the caller checked :meth:`can_allocate`)."""
        if self.num_used + num_blocks > self.num_blocks:
            raise RuntimeError(f"KV over-allocation: {self.num_used}+{num_blocks} > {self.num_blocks}")
        self.num_used += num_blocks

    def free(self, num_blocks: int) -> None:
        """Return ``num_blocks`` blocks."""
        if num_blocks > self.num_used:
            raise RuntimeError(f"KV double free: {num_blocks} > {self.num_used} used")
        self.num_used -= num_blocks


class PrefixHolders:
    """Which groups' prefix caches hold each block hash: the caches keep it as they insert and
    evict, so a prefix-aware policy finds the groups holding a prefix without asking every group."""

    __slots__ = ("_by_hash",)

    def __init__(self) -> None:
        self._by_hash: dict[int, set[int]] = {}

    def add(self, block_hash: int, group_id: int) -> None:
        held = self._by_hash.get(block_hash)
        if held is None:
            self._by_hash[block_hash] = {group_id}
        else:
            held.add(group_id)

    def discard(self, block_hash: int, group_id: int) -> None:
        held = self._by_hash.get(block_hash)
        if held is not None:
            held.discard(group_id)
            if not held:
                del self._by_hash[block_hash]

    def holders(self, block_hash: int) -> list[int]:
        """The groups holding ``block_hash``, ascending."""
        held = self._by_hash.get(block_hash)
        return sorted(held) if held else []


class PrefixCache:
    """LRU set of prefix-block hashes held by a prefill-capable group, with a block budget.

    A hit saves prefill compute only: the matched tokens are attended to, not recomputed; the
    transfer still moves the whole prompt's KV and decode still holds it. ``holders`` (shared by
    the groups of a run) learns every insertion and eviction, as group ``owner``.
    """

    __slots__ = ("capacity_blocks", "_lru", "hits", "lookups", "_owner", "_holders")

    def __init__(self, capacity_blocks: int, owner: int = -1, holders: Optional[PrefixHolders] = None) -> None:
        self.capacity_blocks = capacity_blocks
        self._lru: OrderedDict[int, None] = OrderedDict()
        self.hits = 0
        self.lookups = 0
        self._owner = owner
        self._holders = holders

    def matched_blocks(self, hashes: Sequence[int]) -> int:
        """Number of leading blocks of ``hashes`` present (no LRU update: a query, not a use)."""
        n = 0
        lru = self._lru
        for h in hashes:
            if h not in lru:
                break
            n += 1
        return n

    def use(self, hashes: Sequence[int]) -> int:
        """Record a prefill of ``hashes``: count leading hits, then insert/refresh all of them.

        Returns the number of leading blocks that were already cached.
        """
        hit = self.matched_blocks(hashes)
        self.lookups += len(hashes)
        self.hits += hit
        lru = self._lru
        holders = self._holders
        for h in hashes:
            if h in lru:
                lru.move_to_end(h)
            else:
                lru[h] = None
                if holders is not None:
                    holders.add(h, self._owner)
        while len(lru) > self.capacity_blocks:
            gone, _ = lru.popitem(last=False)
            if holders is not None:
                holders.discard(gone, self._owner)
        return hit

    def drop_all(self) -> None:
        """Forget every block (the group's device died)."""
        if self._holders is not None:
            for h in self._lru:
                self._holders.discard(h, self._owner)
        self._lru.clear()

    def __len__(self) -> int:
        return len(self._lru)
