"""A group's KV memory: paged blocks, decode reservations, their extension, the prefix cache.

DESIGN contract §7. Decode admission *reserves* blocks for the prompt plus the predicted
output (never the true one) and one decode step beyond the tokens that exist when decode
starts; a request that outlives its reservation grows it by ``extend_tokens`` at the step it
runs out (its *exhaust step*, watched in a heap so nothing is scanned per step), and when
memory is short the group preempts (see ``GroupState``). The prefill side holds a request's
prompt KV until decode has it. Prefix-cache blocks (e.g. Mooncake's 512-token hashes) are
their own granularity, budgeted from the same memory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from hetero_sched.core.kvblocks import BlockAllocator, PrefixCache, PrefixHolders, blocks_for
from hetero_sched.core.request import RequestState, StepHeap

if TYPE_CHECKING:
    from hetero_sched.core.kvtiers import KVTiers


def reservation_tokens(prompt_tokens: int, predicted_output: int, generated: int, capacity_tokens: int) -> int:
    """KV tokens a decode admission reserves: the prompt plus the predicted (never the true)
    output, and at least one step's room beyond the ``generated`` tokens that exist when
    decode starts — capped at what the group can hold."""
    return min(prompt_tokens + max(predicted_output, generated + 1), capacity_tokens)


def prefix_hit_tokens(matched_blocks: int, block_tokens: int, prompt_tokens: int, prefill_tokens: int) -> int:
    """Prompt tokens a prefix-cache hit of ``matched_blocks`` saves: prompt tokens only (never
    tokens generated before a preemption), and at least one token is computed (the next)."""
    return min(matched_blocks * block_tokens, prompt_tokens, prefill_tokens - 1)


class KVMemory:
    """Blocks of one group: reservations for decode, prompts held for transfer, prefix cache."""

    def __init__(self, capacity_tokens: int, block_size: int, prefix_cache_fraction: float) -> None:
        self.block_size = block_size
        total_blocks = capacity_tokens // block_size
        cache_blocks = int(total_blocks * prefix_cache_fraction) if prefix_cache_fraction > 0 else 0
        self.num_blocks = total_blocks - cache_blocks
        """Blocks for requests (the prefix cache's budget excluded)."""
        self.blocks = BlockAllocator(self.num_blocks)
        self._prefix_cache_tokens = cache_blocks * block_size
        self.prefix_cache: Optional[PrefixCache] = None
        self.tiers: Optional["KVTiers"] = None
        """KV tiers (device memory, host DRAM, SSD) replacing the plain prefix cache when configured."""
        self._exhaust = StepHeap()
        """The exhaust steps of the reservations watched (maybe stale)."""
        self._holders: Optional[PrefixHolders] = None
        self._owner = -1

    def index_prefixes(self, holders: PrefixHolders, owner: int) -> None:
        """Let ``holders`` know, as group ``owner``, every block this memory's prefix cache holds."""
        self._holders = holders
        self._owner = owner

    @property
    def prefix_cache_tokens(self) -> int:
        """Tokens of device memory budgeted for the prefix cache."""
        return self._prefix_cache_tokens

    def reset(self) -> None:
        """Everything held is gone (the device died)."""
        self.blocks = BlockAllocator(self.num_blocks)
        if self.prefix_cache is not None:
            self.prefix_cache.drop_all()
        self.prefix_cache = None
        if self.tiers is not None:
            self.tiers.reset()
        self._exhaust.clear()

    def fits_ever(self, tokens: int) -> bool:
        """Whether ``tokens`` of KV could fit at all (when empty)."""
        return blocks_for(tokens, self.block_size) <= self.num_blocks

    def prefix_cache_for(self, block_tokens: int) -> PrefixCache:
        """The prefix cache, created at the trace's hash-block size on first use."""
        if self.prefix_cache is None:
            self.prefix_cache = PrefixCache(self._prefix_cache_tokens // block_tokens, self._owner, self._holders)
        return self.prefix_cache

    def cached_prefix_blocks(self, hashes: tuple[int, ...]) -> int:
        """Leading blocks of ``hashes`` the prefix cache holds now (a query: no LRU update)."""
        if self.tiers is not None:
            return self.tiers.hbm_matched(hashes)
        cache = self.prefix_cache
        return 0 if cache is None else cache.matched_blocks(hashes)

    # --- decode reservations -------------------------------------------------------------
    def reservation_tokens(self, rs: RequestState, prefill_pending: bool) -> int:
        """KV tokens reserved for decode: prompt plus the predicted (never the true) output.

        At least one decode step's room beyond the tokens that will exist when decode starts
        (``prefill_pending``: the prefill about to run produces one more token).
        """
        generated = rs.generated + (1 if prefill_pending else 0)
        return reservation_tokens(rs.prompt_tokens, rs.predicted_output, generated,
                                  self.num_blocks * self.block_size)

    def can_reserve(self, rs: RequestState, prefill_pending: bool, own_blocks: int = 0) -> bool:
        """Whether the reservation fits now (``own_blocks``: what ``rs`` already holds here)."""
        need = blocks_for(self.reservation_tokens(rs, prefill_pending), self.block_size)
        return self.blocks.can_allocate(need - own_blocks)

    def reserve(self, rs: RequestState, prefill_pending: bool) -> None:
        """Reserve ``rs``'s decode KV (checked with :meth:`can_reserve`)."""
        tokens = self.reservation_tokens(rs, prefill_pending)
        rs.decode_blocks = blocks_for(tokens, self.block_size)
        rs.reserved_tokens = tokens
        self.blocks.allocate(rs.decode_blocks)

    def release_decode(self, rs: RequestState) -> None:
        """Free ``rs``'s decode reservation (it left the batch)."""
        self.blocks.free(rs.decode_blocks)
        rs.decode_blocks = 0
        rs.reserved_tokens = 0

    # --- prompts held by the prefill side --------------------------------------------------
    def can_hold_prompt(self, rs: RequestState) -> bool:
        return self.blocks.can_allocate(blocks_for(rs.prefill_tokens, self.block_size))

    def hold_prompt(self, rs: RequestState) -> None:
        """Hold the KV a prefill computes until decode has it (contract §7)."""
        rs.prefill_blocks = blocks_for(rs.prefill_tokens, self.block_size)
        self.blocks.allocate(rs.prefill_blocks)

    def release_prompt(self, rs: RequestState) -> None:
        """Free the prompt KV a prefill group retained until decode had it."""
        self.blocks.free(rs.prefill_blocks)
        rs.prefill_blocks = 0

    # --- running out -----------------------------------------------------------------------
    def watch(self, rs: RequestState, steps_done: int) -> None:
        """``rs`` joined the batch at ``steps_done``: note the step its reservation runs out."""
        rs.exhaust_step = steps_done + rs.reserved_tokens - rs.context_tokens
        if rs.exhaust_step < rs.finish_step:
            self._exhaust.push(rs.exhaust_step, rs.request_id)

    def steps_to_exhaustion(self, steps_done: int) -> Optional[int]:
        """Steps until the earliest reservation runs out (its heap's head, maybe stale: sooner)."""
        return self._exhaust.head_step() - steps_done if len(self._exhaust) else None

    def exhausted(self, steps_done: int, running: dict[int, RequestState]) -> Optional[RequestState]:
        """Pop the next request of ``running`` (the batch's, by id) whose reservation ran out by
        ``steps_done`` (None: none left)."""
        exhaust = self._exhaust
        while (request_id := exhaust.pop_due(steps_done)) >= 0:
            rs = running.get(request_id)
            if rs is not None and rs.exhaust_step == exhaust.popped_step:
                return rs
        return None

    def extension(self, rs: RequestState, extend_tokens: int) -> tuple[int, int]:
        """``(new reserved tokens, blocks needed)`` to grow ``rs``'s reservation by ``extend_tokens``."""
        new_reserved = rs.reserved_tokens + extend_tokens
        return new_reserved, blocks_for(new_reserved, self.block_size) - rs.decode_blocks

    def extend(self, rs: RequestState, new_reserved: int, need: int, context_now: int, steps_done: int) -> None:
        """Grow the reservation (as much as fits when ``need`` does not) and watch it again."""
        if not self.blocks.can_allocate(need):   # alone and still too big: grow to what fits
            need = self.blocks.num_free
            new_reserved = min(new_reserved, (rs.decode_blocks + need) * self.block_size)
        self.blocks.allocate(need)
        rs.decode_blocks += need
        rs.reserved_tokens = new_reserved
        rs.exhaust_step = steps_done + new_reserved - context_now
        if rs.exhaust_step < rs.finish_step:
            self._exhaust.push(rs.exhaust_step, rs.request_id)
