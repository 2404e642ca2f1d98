"""A group's KV tiers — device memory, host DRAM, local SSD — and what reusing a prefix costs.

The prefix cache in device memory (``hbm``, the prefix-cache budget of :class:`KVMemory`) is
the first tier; host DRAM and local NVMe below it hold the blocks it evicts (Dynamo's KV block
manager G1 → G2 → G3, LMCache's CPU and disk backends). Tiers are *exclusive*: a block lives in
one tier of a group. A block evicted from a tier is written back to the next one down
(write-back on eviction, at that tier's write bandwidth); a block the last tier evicts is gone.
A prefill that reuses a block from a lower tier reads it into device memory (promotion on
hit): after the prefill every block of its prompt is in device memory again.

What a hit costs. A block from a lower tier is read at that tier's read bandwidth plus a fixed
cost per message (one per tier and request, or one per layer when KV moves layer by layer);
tiers have their own channels, so reads from DRAM and SSD overlap. With ``layers > 1`` (the
experiment's layer-wise transfer mode) the reads overlap the prefill layer by layer: layer
``i`` is computed once its KV is in and layer ``i-1`` is done, so a fetch of ``F`` and a
prefill of ``T`` take ``max(F + T/L, F/L + T)`` (:func:`overlap_s`); without it, ``F + T``.

Fetch or recompute: the core decides by cost (:func:`plan_prefix`). The leading run of prompt
blocks held in some tier is cut only at a run boundary; for each cut the fetch time and the
prefill time of what is left are added (or overlapped) and the cheapest cut wins. A slow tier
thus gets recomputed past, a fast one fetched — the decision flips with bandwidth.

Assumptions (README, *KV tiers*): tier bytes are the KV's unique bytes (heads replicated by
tensor parallelism are copied once and replicated on the device, as for network transfers); a
write-back never delays a read (writes have their own channel; the bytes and the busy time are
reported per tier, so a write channel that cannot keep up shows); a failed group loses all its
tiers (its host went with it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Final, NamedTuple, Optional, Sequence

from hetero_sched.core.eviction import BlockSet, make_block_set
from hetero_sched.core.kvmemory import prefix_hit_tokens

HBM: Final = 0
DRAM: Final = 1
SSD: Final = 2
STORE: Final = 3
TIER_NAMES = ("hbm", "dram", "ssd", "store")
"""Tier codes index these names (``store``: the cluster KV store, :mod:`hetero_sched.core.kvstore`)."""

FREE: Final = math.inf
"""Read bandwidth of blocks already in device memory (the prefix cache, or fetched ahead)."""

PrefillTime = Callable[[int, int], float]
"""``prefill_time(new_tokens, cached_tokens)``: one prompt's prefill alone (the group's cost model)."""


@dataclass(frozen=True)
class TierSpec:
    """A tier below device memory: what it holds and its channels to device memory (group totals)."""

    tier: int
    """DRAM or SSD."""
    capacity_bytes: float
    read_bytes_per_s: float
    write_bytes_per_s: float
    message_s: float
    policy: str = "lru"


class PrefixPlan(NamedTuple):
    """How a prefill reuses its prompt's prefix: which leading blocks, from which tiers, at what cost."""

    blocks: int
    """Leading prefix blocks reused (the rest of the prompt is computed)."""
    cached_tokens: int
    """Prompt tokens not recomputed."""
    tier_tokens: tuple[int, ...]
    """Of those, how many come from each tier (indexed by tier code)."""
    tier_bytes: tuple[float, ...]
    """Bytes read from each tier into device memory (0 for blocks already there)."""
    tier_s: tuple[float, ...]
    """Time of those reads on each tier's channel (alone)."""
    cost_s: float
    """Fetch and prefill of this prompt alone (overlapped layer by layer when streaming)."""
    held_tokens: int
    """Prompt tokens the tiers hold (what reusing every located block would have saved)."""

    @property
    def fetch_s(self) -> float:
        """The reads' time: tiers' channels run side by side."""
        return max(self.tier_s)


NO_TIERS: Final = (0, 0, 0, 0)


def overlap_s(fetch_s: float, compute_s: float, layers: int) -> float:
    """A prefill of ``compute_s`` whose reused KV takes ``fetch_s`` to read, over ``layers``
    layers streamed one by one (``layers`` 1: the read, then the prefill)."""
    return max(fetch_s + compute_s / layers, fetch_s / layers + compute_s)


def read_s(num_bytes: float, bytes_per_s: float, message_s: float, messages: int) -> float:
    """Time to read ``num_bytes`` over one tier's channel in ``messages`` messages (0 if nothing)."""
    if num_bytes <= 0 or bytes_per_s == FREE:
        return 0.0
    return num_bytes / bytes_per_s + messages * message_s


def plan_prefix(locations: Sequence[int], block_tokens: int, prompt_tokens: int, prefill_tokens: int,
                block_bytes: float, read_bytes_per_s: Sequence[float], message_s: Sequence[float], layers: int,
                prefill_time: PrefillTime) -> PrefixPlan:
    """The cheapest reuse of a prompt's prefix (the core's fetch-vs-recompute decision).

    ``locations[i]`` is the tier holding prompt block ``i`` (the leading run held anywhere);
    ``read_bytes_per_s[t]`` / ``message_s[t]`` are tier ``t``'s read channel (``FREE``: in device
    memory already). Every cut at a run boundary is costed — reads (one message per tier, or one
    per layer when ``layers > 1``) plus, or overlapped with, the prefill of the rest — and the
    cheapest wins (ties: fewer blocks read).
    """
    n = len(locations)
    messages = layers if layers > 1 else 1
    counts = [0, 0, 0, 0]
    best: Optional[tuple[float, int, tuple[int, ...]]] = None
    i = 0
    while True:
        if i == n or i == 0 or locations[i] != locations[i - 1]:
            # a cut after block i (the end of a run), or no reuse at all (i == 0: unless the first
            # run is in device memory already, which is never worse to reuse)
            if i > 0 or n == 0 or read_bytes_per_s[locations[0]] != FREE:
                cached = prefix_hit_tokens(i, block_tokens, prompt_tokens, prefill_tokens) if i else 0
                fetch = 0.0
                for t in range(4):
                    if counts[t]:
                        fetch = max(fetch, read_s(counts[t] * block_bytes, read_bytes_per_s[t], message_s[t], messages))
                cost = overlap_s(fetch, prefill_time(prefill_tokens - cached, cached), layers)
                if best is None or cost < best[0]:
                    best = (cost, i, tuple(counts))
        if i == n:
            break
        counts[locations[i]] += 1
        i += 1
    assert best is not None
    cost, k, tier_blocks = best
    cached = prefix_hit_tokens(k, block_tokens, prompt_tokens, prefill_tokens) if k else 0
    tokens = [0, 0, 0, 0]
    left = cached
    for j in range(k):                      # the last reused block may count fewer tokens (the cap)
        take = min(block_tokens, left)
        tokens[locations[j]] += take
        left -= take
    nbytes = tuple(tier_blocks[t] * block_bytes if read_bytes_per_s[t] != FREE else 0.0 for t in range(4))
    times = tuple(read_s(nbytes[t], read_bytes_per_s[t], message_s[t], messages) for t in range(4))
    held = prefix_hit_tokens(n, block_tokens, prompt_tokens, prefill_tokens) if n else 0
    return PrefixPlan(k, cached, tuple(tokens), nbytes, times, cost, held)


@dataclass
class TierStats:
    """What a group's tiers did (indexed by tier code), for the run summary."""

    hit_tokens: list[int] = field(default_factory=lambda: [0, 0, 0, 0])
    """Prompt tokens served from each tier instead of being recomputed."""
    hit_requests: list[int] = field(default_factory=lambda: [0, 0, 0, 0])
    """Prefills that reused at least one block from each tier."""
    read_bytes: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])
    """Bytes read from each tier into device memory (promotions)."""
    read_s: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])
    written_bytes: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])
    """Bytes written back into each tier (evictions from the one above)."""
    write_s: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])
    """Busy time of each tier's write channel."""
    evicted_blocks: list[int] = field(default_factory=lambda: [0, 0, 0, 0])
    """Blocks each tier evicted with no tier below to take them (gone)."""
    prefills: int = 0
    """Prefills planned with these tiers (a preempted request's re-prefill counts again)."""
    recomputed_tokens: int = 0
    """Prompt tokens held in some tier but recomputed because fetching them would cost more."""


class KVTiers:
    """One group's tiers: resident blocks per tier, promotion and write-back, and prefix plans."""

    def __init__(self, hbm_tokens: int, hbm_policy: str, lower: Sequence[TierSpec], bytes_per_token: int,
                 layers: int, prefill_time: PrefillTime) -> None:
        self._hbm_tokens = hbm_tokens
        self._hbm_policy = hbm_policy
        self.specs: dict[int, TierSpec] = {spec.tier: spec for spec in lower}
        self.bytes_per_token = bytes_per_token
        self.layers = layers
        self.prefill_time = prefill_time
        self.block_tokens = 0
        self.block_bytes = 0.0
        self.sets: list[Optional[BlockSet]] = [None, None, None, None]
        self.read_bytes_per_s = [FREE, FREE, FREE, FREE]
        self.message_s = [0.0, 0.0, 0.0, 0.0]
        for t, spec in self.specs.items():
            self.read_bytes_per_s[t] = spec.read_bytes_per_s
            self.message_s[t] = spec.message_s
        self.stats = TierStats()

    def sized(self, block_tokens: int) -> None:
        """Create the tiers at the trace's prefix-block size on first use (as the prefix cache)."""
        if self.block_tokens:
            return
        self.block_tokens = block_tokens
        self.block_bytes = float(block_tokens * self.bytes_per_token)
        self.sets[HBM] = make_block_set(self._hbm_policy, self._hbm_tokens // block_tokens)
        for t, spec in self.specs.items():
            self.sets[t] = make_block_set(spec.policy, int(spec.capacity_bytes // self.block_bytes))

    def reset(self) -> None:
        """Everything held is gone (the group's device and host died)."""
        self.block_tokens = 0
        self.sets = [None, None, None, None]

    def capacity_blocks(self, tier: int) -> int:
        """Blocks tier ``tier`` holds at most (0 before the first prefix or without that tier)."""
        s = self.sets[tier]
        return 0 if s is None else s.capacity_blocks

    def resident(self, tier: int) -> int:
        s = self.sets[tier]
        return 0 if s is None else len(s)

    def hbm_matched(self, hashes: Sequence[int]) -> int:
        """Leading blocks of ``hashes`` in device memory (a query: no use recorded)."""
        hbm = self.sets[HBM]
        return 0 if hbm is None else hbm.matched(hashes)

    def tier_of(self, h: int) -> Optional[int]:
        """The tier holding block ``h`` here (None: none)."""
        for t in (HBM, DRAM, SSD):
            s = self.sets[t]
            if s is not None and h in s:
                return t
        return None

    def locate(self, hashes: Sequence[int], staged: Optional[frozenset[int]] = None,
               store: Optional[Callable[[int], bool]] = None) -> list[int]:
        """Tier of each leading block of ``hashes`` held here, or fetched ahead (``staged``:
        counted as ``STORE``, already in device memory), or — asked with ``store`` — in the
        cluster store; up to the first block held nowhere."""
        out: list[int] = []
        for h in hashes:
            t = self.tier_of(h)
            if t is None:
                if (staged is not None and h in staged) or (store is not None and store(h)):
                    t = STORE
                else:
                    break
            out.append(t)
        return out

    def plan(self, hashes: Sequence[int], block_tokens: int, prompt_tokens: int, prefill_tokens: int,
             staged: Optional[frozenset[int]] = None, store: Optional[Callable[[int], bool]] = None,
             store_bytes_per_s: float = FREE, store_message_s: float = 0.0) -> PrefixPlan:
        """The core's plan for a prompt here now (:func:`plan_prefix`); blocks in the cluster
        store cost its read (``store_*``: the uncontended network path) unless fetched ahead."""
        self.sized(block_tokens)
        locations = self.locate(hashes, staged, store)
        bps = self.read_bytes_per_s
        msg = self.message_s
        if store is not None:
            bps = [*bps[:STORE], store_bytes_per_s]
            msg = [*msg[:STORE], store_message_s]
        return plan_prefix(locations, block_tokens, prompt_tokens, prefill_tokens, self.block_bytes, bps, msg,
                           self.layers, self.prefill_time)

    def count(self, plan: PrefixPlan) -> None:
        """A prefill was planned with ``plan``."""
        st = self.stats
        st.prefills += 1
        st.recomputed_tokens += plan.held_tokens - plan.cached_tokens
        for t in range(4):
            if plan.tier_tokens[t]:
                st.hit_tokens[t] += plan.tier_tokens[t]
                st.hit_requests[t] += 1
            if t != STORE:
                st.read_bytes[t] += plan.tier_bytes[t]
                st.read_s[t] += plan.tier_s[t]

    def span_s(self, compute_s: float, plans: Sequence[PrefixPlan]) -> float:
        """A prefill span of ``compute_s`` whose prompts read ``plans``' blocks first: each tier's
        reads in turn on its channel, tiers side by side, overlapped layer by layer if streaming."""
        fetch = 0.0
        for t in (DRAM, SSD):
            fetch = max(fetch, sum(p.tier_s[t] for p in plans))
        return overlap_s(fetch, compute_s, self.layers) if fetch > 0 else compute_s

    def use(self, hashes: Sequence[int]) -> None:
        """A prefill computed or reused ``hashes`` (full blocks): all are in device memory now —
        reused ones promoted out of their lower tier — and what device memory evicts is written
        back down, tier by tier."""
        sets = self.sets
        hbm = sets[HBM]
        assert hbm is not None
        for h in hashes:
            if h in hbm:
                hbm.touch(h)
                continue
            for t in (DRAM, SSD):
                s = sets[t]
                if s is not None and h in s:
                    s.remove(h)
                    break
            hbm.add(h)
        self._demote(HBM, hbm.victims())

    def _demote(self, tier: int, blocks: list[int]) -> None:
        if not blocks:
            return
        below = next((t for t in range(tier + 1, STORE) if self.sets[t] is not None), None)
        if below is None:
            self.stats.evicted_blocks[tier] += len(blocks)
            return
        target = self.sets[below]
        assert target is not None
        spec = self.specs[below]
        for h in blocks:
            target.add(h)
        st = self.stats
        st.written_bytes[below] += len(blocks) * self.block_bytes
        st.write_s[below] += len(blocks) * (self.block_bytes / spec.write_bytes_per_s + spec.message_s)
        self._demote(below, target.victims())


def fetch_windows(start_s: float, plans: Sequence[tuple[int, PrefixPlan]]) -> list[tuple[int, int, float, float]]:
    """When each request's reads of a span run: ``(request index, tier, start, end)``, each tier's
    reads in turn from the span's start (tiers side by side)."""
    out: list[tuple[int, int, float, float]] = []
    for t in (DRAM, SSD):
        at = start_s
        for index, plan in plans:
            if plan.tier_s[t] > 0:
                out.append((index, t, at, at + plan.tier_s[t]))
                at += plan.tier_s[t]
    return out
