"""State of one device group: its queues, its role, and the spans it plans and applies.

A group owns three parts — its :class:`~hetero_sched.core.kvmemory.KVMemory`, its
:class:`~hetero_sched.core.batch.DecodeBatch`, and the queues in front of them — and runs one
span at a time (``core/spans.py``). :meth:`GroupState.plan` picks the next span (prefill first,
or one chunked iteration, else decode steps up to the next completion, memory boundary or
roofline kink); :meth:`GroupState.finish` applies what the group's *device* reported the span
did (DESIGN contract §3), which may be less than planned (a cut, a device that fell short).

The group never reads a clock: every method takes ``now_s``. Check/commit pairs keep the
scheduler from touching queues or free lists directly.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import Optional

from hetero_sched.core.batch import DecodeBatch
from hetero_sched.core.costmemo import CostMemo
from hetero_sched.core.kvblocks import BlockAllocator
from hetero_sched.core.kvmemory import KVMemory, prefix_hit_tokens
from hetero_sched.core.kvtiers import KVTiers, PrefixPlan
from hetero_sched.core.request import Phase, RequestState
from hetero_sched.core.spans import (Span, SpanKind, SpanOutcome, SpanReport, active_line, decode_span_duration,
                                     steps_until)
from hetero_sched.costmodel import GroupCost, Line


class Role(Enum):
    """What a group does now (runtime state: a group may switch roles without moving)."""

    PREFILL = "prefill"
    DECODE = "decode"
    BOTH = "both"

    @property
    def can_prefill(self) -> bool:
        return self is not Role.DECODE

    @property
    def can_decode(self) -> bool:
        return self is not Role.PREFILL

    @property
    def code(self) -> int:
        """The role as a number for the decision log: 0 prefill, 1 decode, 2 both."""
        return 0 if self is Role.PREFILL else 1 if self is Role.DECODE else 2


@dataclass(frozen=True)
class GroupLimits:
    """Batching limits of a group (vLLM's max_num_batched_tokens / max_num_seqs)."""

    max_batch_tokens: int = 16384
    """Prefill tokens per iteration (a longer prompt runs alone)."""
    max_num_seqs: int = 256
    """Sequences in the decode batch (running + KV in transit)."""
    max_prefill_seqs: int = 64
    block_size: int = 16
    """Paging block, tokens."""
    extend_tokens: int = 128
    """How far a decode reservation grows when a request outlives its predicted length."""
    prefix_cache_fraction: float = 0.3
    """Share of the prefill side's KV memory budgeted for the prefix cache / KV retention."""


class GroupState:
    """One device group's queues, batch and KV memory, with closed-form spans."""

    def __init__(self, group_id: int, name: str, role: Role, cost: GroupCost, limits: GroupLimits,
                 device: str = "", pool: str = "") -> None:
        self.group_id = group_id
        self.name = name
        self.role = role
        self.colocated = role is Role.BOTH
        self.local_decodes = False
        """Set when a request was placed to prefill *and* decode here although the role is not
        ``both`` (a heterogeneous fallback): only then does a prefill check where it decodes."""
        self.can_prefill = role.can_prefill
        self.can_decode = role.can_decode
        self.device = device
        self.pool = pool
        self.cost = cost
        self.limits = limits
        self.memory = KVMemory(cost.kv_capacity_tokens, limits.block_size,
                               limits.prefix_cache_fraction if role.can_prefill else 0.0)
        self.batch = DecodeBatch()
        self.alive = True
        """False once the device behind the group failed (until it is restored, empty)."""
        self.prefill_queue: deque[RequestState] = deque()
        self.pending_prefill_tokens = 0                     # queued or being prefilled
        self.num_pending_prefill = 0
        self.decode_queue: deque[RequestState] = deque()   # prefilled, awaiting KV reservation here
        self.fetching: dict[int, RequestState] = {}         # placed, prefix on its way from the KV store
        self.in_transit = 0                                 # admitted, KV not yet here
        self.span: Optional[Span] = None
        self.busy_s = 0.0
        self._next_span_id = 0
        self.decode_seq_s = 0.0
        """Σ decode batch size × span time: over the run's length, the mean decode batch."""
        self.kv_block_s = 0.0
        """Σ KV blocks in use × time (sampled whenever the scheduler touches the group)."""
        self._kv_used = 0
        self._kv_since_s = 0.0
        self._memo = CostMemo(cost)
        self.chunk_budget: Optional[int] = None
        """Tokens per iteration when prefill is chunked (Sarathi-Serve); None: whole prompts."""
        self._partial: list[RequestState] = []            # chunked prefills under way, in order
        self.draining_to: Optional[Role] = None
        """The role this group switches to once drained (None: not switching)."""
        self.drain_start_s = 0.0
        self._cancelled: list[RequestState] = []        # decoding here, to leave at the next step boundary

    @property
    def kv(self) -> BlockAllocator:
        """The group's KV blocks (the prefix cache's budget excluded)."""
        return self.memory.blocks

    # --- failure -----------------------------------------------------------------------
    def fail(self, now_s: float) -> list[RequestState]:
        """The device behind this group died: everything it held is gone.

        Returns the requests that were here — in its span, queued, prefilling, awaiting or
        holding a decode slot — in a deterministic order, their lazily counted tokens settled up
        to the last *applied* span (the running span's work died with the device). The group is
        left empty (KV, queues, prefix cache) and out of service until :meth:`restore`.
        """
        lost: dict[int, RequestState] = {}
        span = self.span
        if span is not None:
            for rs in span.batch:
                lost[rs.request_id] = rs
            for rs, _, _ in span.chunks:
                lost[rs.request_id] = rs
        for rs in self._partial:
            lost[rs.request_id] = rs
        for rs in self.prefill_queue:
            lost[rs.request_id] = rs
        for rs in self.fetching.values():
            lost[rs.request_id] = rs
        for rs in self.batch.drop_all():
            lost[rs.request_id] = rs
        for rs in self.decode_queue:
            lost[rs.request_id] = rs
        for rs in lost.values():
            rs.prefill_done = 0
            rs.staged = None
        self.fetching = {}
        self.memory.reset()
        self.batch = DecodeBatch()
        self.prefill_queue.clear()
        self.decode_queue.clear()
        self._partial = []
        self._cancelled = []
        self.pending_prefill_tokens = 0
        self.num_pending_prefill = 0
        self.in_transit = 0
        self.span = None                     # a report of the span that died matches nothing now
        self.draining_to = None
        self.alive = False
        self.can_prefill = False
        self.can_decode = False
        return list(lost.values())

    def restore(self) -> None:
        """The device is back (restarted, empty): serve its role again."""
        self.alive = True
        self.can_prefill = self.role.can_prefill
        self.can_decode = self.role.can_decode

    def account_kv(self, now_s: float) -> None:
        """Add the KV in use since the last call to :attr:`kv_block_s` (the scheduler calls it
        after every change it makes here, so the integral is exact at its event times)."""
        self.kv_block_s += self._kv_used * (now_s - self._kv_since_s)
        self._kv_used = self.kv.num_used
        self._kv_since_s = now_s

    # --- roles ----------------------------------------------------------------------------
    def drained(self) -> bool:
        """Nothing left of the old role: no span, no queued or running request, no KV held."""
        return (self.span is None and not self.prefill_queue and not self.decode_queue and not self.fetching
                and not self.batch.has_work and self.in_transit == 0
                and not self._partial and self.kv.num_used == 0)

    def start_drain(self, role: Role, now_s: float) -> None:
        """Stop taking new work of either role; switch to ``role`` once :meth:`drained`."""
        self.draining_to = role
        self.drain_start_s = now_s
        self.can_prefill = False
        self.can_decode = False

    def take_role(self) -> None:
        """Finish a switch: the drained group serves its new role from now on."""
        role = self.draining_to
        assert role is not None and self.drained()
        self.role = role
        self.colocated = role is Role.BOTH
        self.can_prefill = role.can_prefill
        self.can_decode = role.can_decode
        self.draining_to = None

    # --- queries -------------------------------------------------------------------------
    @property
    def is_busy(self) -> bool:
        return self.span is not None

    @property
    def num_decoding(self) -> int:
        """Sequences holding a decode slot: running, ready to join, or with KV in transit."""
        return len(self.batch) + self.in_transit

    def share_cost_memo(self, memo: CostMemo) -> None:
        """Use ``memo`` for what this group asks its cost model: groups with one cost model
        share one (each question is then asked of the cost model once, not once per group)."""
        memo.absorb(self._memo)
        self._memo = memo

    def decode_lines(self, batch_size: int) -> tuple[Line, ...]:
        return self._memo.decode_lines(batch_size)

    def prefill_s(self, new_tokens: list[int], cached_tokens: list[int]) -> float:
        """The cost model's prefill time of a span (one prompt's: from the memo when asked before)."""
        return self._memo.prefill_s(new_tokens, cached_tokens)

    def fits_ever(self, tokens: int) -> bool:
        """Whether ``tokens`` of KV could fit this group at all (when empty)."""
        return self.memory.fits_ever(tokens)

    def cached_prefix_blocks(self, hashes: tuple[int, ...]) -> int:
        """Leading blocks of ``hashes`` this group's prefix cache holds now (a query: no LRU update)."""
        return self.memory.cached_prefix_blocks(hashes)

    def requests_held(self) -> dict[int, str]:
        """Where each request this group holds sits (for the "unfinished request" error)."""
        out: dict[int, str] = {}
        for rs in self.prefill_queue:
            out[rs.request_id] = f"{self.name} prefill queue"
        for rs in self.fetching.values():
            out[rs.request_id] = f"{self.name} fetching its prefix from the KV store"
        for rs in self.decode_queue:
            out[rs.request_id] = f"{self.name} decode queue ({rs.phase.value})"
        for rs in self.batch.ready:
            out[rs.request_id] = f"{self.name} ready"
        for rs in self.batch.running.values():
            out[rs.request_id] = f"{self.name} running"
        if self.span is not None:
            for rs in self.span.batch:
                out.setdefault(rs.request_id, f"{self.name} span {self.span.kind.value}")
        return out

    # --- commands from the scheduler -----------------------------------------------------
    def enqueue_prefill(self, rs: RequestState, front: bool = False) -> None:
        rs.phase = Phase.WAITING_PREFILL
        rs.prefill_group = self.group_id
        self.pending_prefill_tokens += rs.prefill_tokens
        self.num_pending_prefill += 1
        if front:
            self.prefill_queue.appendleft(rs)
        else:
            self.prefill_queue.append(rs)

    def await_fetch(self, rs: RequestState) -> None:
        """``rs`` is placed here but its prefix is on its way from the cluster KV store: counted as
        pending prefill, queued when it lands (:meth:`fetch_landed`)."""
        rs.phase = Phase.WAITING_PREFILL
        rs.prefill_group = self.group_id
        self.pending_prefill_tokens += rs.prefill_tokens
        self.num_pending_prefill += 1
        self.fetching[rs.request_id] = rs

    def fetch_landed(self, rs: RequestState, staged: frozenset[int]) -> None:
        """``rs``'s prefix blocks from the store are in device memory: it joins the prefill queue."""
        del self.fetching[rs.request_id]
        rs.staged = staged
        if rs.preemptions > 0:
            self.prefill_queue.appendleft(rs)
        else:
            self.prefill_queue.append(rs)

    def enqueue_decode(self, rs: RequestState) -> None:
        rs.phase = Phase.WAITING_DECODE
        rs.decode_group = self.group_id
        self.decode_queue.append(rs)

    def unqueue_decode(self, prefill_group: int) -> list[RequestState]:
        """Take out the requests waiting here whose KV sits at ``prefill_group`` (it died)."""
        stranded = [rs for rs in self.decode_queue if rs.prefill_group == prefill_group]
        for rs in stranded:
            self.decode_queue.remove(rs)
        return stranded

    def admit_decode(self) -> list[RequestState]:
        """Reserve KV for waiting requests, FIFO, while slots and blocks allow (contract §7).

        A request prefilled here (a fallback decode) turns its prompt KV into the reservation.
        """
        admitted = []
        q = self.decode_queue
        mem = self.memory
        while q and self.num_decoding < self.limits.max_num_seqs:
            rs = q[0]
            own = rs.prefill_blocks if rs.prefill_group == self.group_id else 0
            if not mem.can_reserve(rs, False, own):
                break
            if own:
                mem.release_prompt(rs)
            mem.reserve(rs, False)
            q.popleft()
            rs.phase = Phase.TRANSFERRING
            self.in_transit += 1
            admitted.append(rs)
        return admitted

    def cancel_admission(self, rs: RequestState) -> None:
        """``rs``'s KV will never come (its source died): free its reservation and slot."""
        self.kv.free(rs.decode_blocks)
        self.in_transit -= 1

    def kv_arrived(self, rs: RequestState) -> None:
        """The request's KV is here: it joins the batch at the next step boundary."""
        self.in_transit -= 1
        rs.phase = Phase.DECODING
        self.batch.add_ready(rs)

    def decode_here(self, rs: RequestState) -> None:
        """``rs`` was prefilled here and decodes here (colocated or a fallback): its KV stays."""
        rs.phase = Phase.DECODING
        rs.decode_group = self.group_id
        self.batch.add_ready(rs)

    def unqueue_prefill(self, rs: RequestState) -> None:
        """Take a request that has not started prefilling out of the prefill queue (or out of
        waiting for its prefix from the KV store: the read lands for nobody)."""
        if self.fetching.pop(rs.request_id, None) is None:
            self.prefill_queue.remove(rs)
        self.pending_prefill_tokens -= rs.prefill_tokens
        self.num_pending_prefill -= 1

    def cancel_decode(self, rs: RequestState, now_s: float) -> bool:
        """The client of ``rs`` (decoding here) gave up. True if it left at once — it was waiting
        to join, or the group is between spans (at a step boundary): its reservation is freed;
        False if a span is running: it leaves at that span's end (:meth:`finish`)."""
        if self.batch.remove_ready(rs):
            self.memory.release_decode(rs)
            return True
        if self.span is None:
            self._leave(rs, now_s)
            return True
        self._cancelled.append(rs)
        return False

    def release_prefill_kv(self, rs: RequestState) -> None:
        """Free the prompt KV a prefill group retained until decode had it."""
        self.memory.release_prompt(rs)

    def release_decode_kv(self, rs: RequestState) -> None:
        """Free ``rs``'s decode reservation here (it completed on its prefill)."""
        self.memory.release_decode(rs)

    def wants_interrupt(self) -> bool:
        """Whether the running decode span should stop at its next step boundary."""
        span = self.span
        if span is None or span.kind is not SpanKind.DECODE:
            return False
        if self.batch.ready or self._cancelled:
            return True
        return bool(self.prefill_queue) and self._can_admit_prefill(self.prefill_queue[0], 0)

    def cut(self, now_s: float) -> bool:
        """Expect the running decode span to stop at the first step boundary at or after ``now_s``.

        Returns False when the span is expected to end by then anyway. The device decides where
        it really stops, and says so in its report.
        """
        span = self.span
        assert span is not None and span.kind is SpanKind.DECODE
        j = steps_until(span.line, span.context0, span.batch_size, now_s - span.start_s)
        if j >= span.steps:
            return False
        span.steps = j
        span.duration_s = decode_span_duration(span.line, span.context0, span.batch_size, j)
        span.end_s = span.start_s + span.duration_s
        span.cuts += 1
        return True

    # --- planning ------------------------------------------------------------------------
    def plan(self, now_s: float) -> Optional[Span]:
        """Plan the next span of an idle group (prefill first), or None if there is nothing to do."""
        assert self.span is None
        span = None
        if self.chunk_budget is not None:
            span = self._plan_chunked(now_s)
        else:
            # A queue fills only through placements the scheduler checked, so a group with
            # queued prompts prefills them whatever its role (a fallback, or a drain).
            if self.prefill_queue:
                span = self._plan_prefill(now_s)
            if span is None and self.batch.has_work:
                span = self._plan_decode(now_s)
        self.span = span
        return span

    def _decodes_here(self, rs: RequestState) -> bool:
        """Whether ``rs`` decodes where it prefills (colocated, or a fallback placement here)."""
        return self.colocated or (self.local_decodes and rs.decode_group == self.group_id)

    def _can_admit_prefill(self, rs: RequestState, batch_len: int) -> bool:
        if self._decodes_here(rs):
            if self.num_decoding + batch_len >= self.limits.max_num_seqs:
                return False
            return self.memory.can_reserve(rs, True)
        return self.memory.can_hold_prompt(rs)

    def _cached_prefix(self, rs: RequestState) -> int:
        """Prompt tokens a prefix-cache hit saves ``rs`` here now."""
        hashes = rs.request.prefix_hashes
        if not hashes:
            return 0
        block = rs.request.prefix_block_tokens
        return prefix_hit_tokens(self.memory.prefix_cache_for(block).matched_blocks(hashes), block,
                                 rs.prompt_tokens, rs.prefill_tokens)

    def _start_prefill(self, rs: RequestState, cached: int) -> None:
        """Take ``rs`` off the queue head: its KV (the decode reservation, if it decodes here)."""
        if self._decodes_here(rs):
            self.memory.reserve(rs, prefill_pending=True)
            rs.decode_group = self.group_id
        else:
            self.memory.hold_prompt(rs)
        self.prefill_queue.popleft()
        rs.phase = Phase.PREFILLING
        rs.cached_tokens = cached

    def _plan_prefill(self, now_s: float) -> Optional[Span]:
        lim = self.limits
        q = self.prefill_queue
        batch: list[RequestState] = []
        new_list: list[int] = []
        cached_list: list[int] = []
        total = 0
        tiers = self.memory.tiers
        plans: Optional[list[tuple[RequestState, PrefixPlan]]] = None     # with KV tiers only
        plan: Optional[PrefixPlan] = None
        while q and len(batch) < lim.max_prefill_seqs:
            rs = q[0]
            if tiers is None:
                cached = self._cached_prefix(rs)
            else:
                plan = self._tier_plan(tiers, rs)
                cached = 0 if plan is None else plan.cached_tokens
            new = rs.prefill_tokens - cached
            if batch and total + new > lim.max_batch_tokens:
                break
            if not self._can_admit_prefill(rs, len(batch)):
                break
            self._start_prefill(rs, cached)
            if plan is not None:
                self._take_plan(tiers, rs, plan)
                if plans is None:
                    plans = []
                plans.append((rs, plan))
            batch.append(rs)
            new_list.append(new)
            cached_list.append(cached)
            total += new
        if not batch:
            return None
        duration = self.prefill_s(new_list, cached_list)
        if plans is not None and tiers is not None:
            duration = tiers.span_s(duration, [p for _, p in plans])
        self._next_span_id += 1
        span = Span(self.group_id, self._next_span_id, SpanKind.PREFILL, now_s, duration, 1, batch,
                    new_tokens=total, cached_tokens=sum(cached_list))
        if plans is not None:
            span.fetches = tuple(plans)
        return span

    @staticmethod
    def _tier_plan(tiers: KVTiers, rs: RequestState) -> Optional[PrefixPlan]:
        """How ``rs`` would reuse its prefix from this group's tiers now (None: no prefix hashes)."""
        hashes = rs.request.prefix_hashes
        if not hashes:
            return None
        return tiers.plan(hashes, rs.request.prefix_block_tokens, rs.prompt_tokens, rs.prefill_tokens,
                          rs.staged)

    @staticmethod
    def _take_plan(tiers: Optional[KVTiers], rs: RequestState, plan: PrefixPlan) -> None:
        """``rs`` starts its prefill with ``plan``: count it; what was fetched ahead is used up."""
        assert tiers is not None
        tiers.count(plan)
        rs.staged = None

    def _take_chunks(self, budget: int, plans: list[tuple[RequestState, PrefixPlan]]) -> list[tuple[RequestState, int, int]]:
        """Prefill chunks filling ``budget`` tokens: prompts under way first, then the queue's head
        (with KV tiers, how each new one reuses its prefix goes into ``plans``)."""
        chunks: list[tuple[RequestState, int, int]] = []
        for rs in self._partial:
            if budget <= 0:
                return chunks
            start = rs.cached_tokens + rs.prefill_done
            take = min(rs.prefill_tokens - start, budget)
            chunks.append((rs, start, start + take))
            budget -= take
        q = self.prefill_queue
        tiers = self.memory.tiers
        while budget > 0 and q and len(self._partial) < self.limits.max_prefill_seqs:
            rs = q[0]
            if not self._can_admit_prefill(rs, len(self._partial)):
                break
            if tiers is None:
                cached = self._cached_prefix(rs)
            else:
                plan = self._tier_plan(tiers, rs)
                cached = 0 if plan is None else plan.cached_tokens
                if plan is not None:
                    self._take_plan(tiers, rs, plan)
                    plans.append((rs, plan))
            self._start_prefill(rs, cached)
            rs.prefill_done = 0
            self._partial.append(rs)
            take = min(rs.prefill_tokens - cached, budget)
            chunks.append((rs, cached, cached + take))
            budget -= take
        return chunks

    def _plan_chunked(self, now_s: float) -> Optional[Span]:
        """Sarathi-Serve: each iteration is one decode step plus prefill chunks within the budget.

        The budget counts one token per decoding sequence; prefill gets the rest. With nothing to
        prefill the group runs ordinary multi-step decode spans (cut when a prompt arrives). The
        cost model has no fused mixed-batch time, so an iteration costs its decode step plus its
        chunks' prefill time — an upper bound (piggybacking savings are not modelled).
        """
        budget = self.chunk_budget
        assert budget is not None
        plans: list[tuple[RequestState, PrefixPlan]] = []
        chunks = self._take_chunks(budget - len(self.batch), plans)
        if not chunks:
            return self._plan_decode(now_s) if self.batch.has_work else None
        new_list = [end - start for _, start, end in chunks]
        cached_list = [start for _, start, _ in chunks]
        # prefix-cache hits of the prompts starting here (a later chunk attends to earlier ones)
        first_cached = sum(start for rs, start, _ in chunks if rs.prefill_done == 0)
        duration = self.prefill_s(new_list, cached_list)
        tiers = self.memory.tiers
        if plans and tiers is not None:
            duration = tiers.span_s(duration, [p for _, p in plans])
        joiners = self._join_ready()
        b = len(self.batch.running)
        c0 = self.batch.context_tokens
        line: Line = (0.0, 0.0)
        steps = 0
        if b:
            line, _ = active_line(self.decode_lines(b), c0, b)
            steps = 1
            duration += line[0] + line[1] * c0
        self._next_span_id += 1
        span = Span(self.group_id, self._next_span_id, SpanKind.MIXED, now_s, duration, steps, joiners, line, b,
                    c0, sum(new_list), first_cached, tuple(chunks))
        if plans:
            span.fetches = tuple(plans)
        return span

    def _join_ready(self) -> list[RequestState]:
        """Move the requests ready to join into the batch, watching their reservations."""
        joiners = self.batch.join_ready(self.group_id)
        steps_done = self.batch.steps_done
        for rs in joiners:
            self.memory.watch(rs, steps_done)
        return joiners

    def _plan_decode(self, now_s: float) -> Span:
        joiners = self._join_ready()
        batch = self.batch
        b = len(batch.running)
        c0 = batch.context_tokens
        steps = batch.steps_to_next_finish()
        exhaust = self.memory.steps_to_exhaustion(batch.steps_done)
        if exhaust is not None:
            steps = min(steps, exhaust)
        assert steps >= 1, "a decode span must make progress"
        line, kink = active_line(self.decode_lines(b), c0, b)
        if kink is not None and kink < steps:
            steps = kink
        self._next_span_id += 1
        return Span(self.group_id, self._next_span_id, SpanKind.DECODE, now_s,
                    decode_span_duration(line, c0, b, steps), steps, joiners, line, b, c0)

    # --- applying a finished span ---------------------------------------------------------
    def finish(self, now_s: float, report: SpanReport, out: SpanOutcome) -> SpanOutcome:
        """Apply the running span as its device reported it (applied at ``now_s``); returns what
        changed, in ``out`` (emptied first: the scheduler passes one outcome for every span).

        Tokens come out at the reported times; a decode span counts the steps the device made
        (never more than planned), so a request whose last step did not run is not complete.
        """
        span = self.span
        assert span is not None
        self.span = None
        self.busy_s += report.end_s - report.start_s
        if span.kind is not SpanKind.PREFILL:
            self.decode_seq_s += span.batch_size * (report.end_s - report.start_s)
        out.clear()
        if span.kind is SpanKind.PREFILL:
            duration = report.end_s - report.start_s
            for rs in span.batch:
                rs.prefill_s = duration
                self._prefilled(rs, report.end_s, out)
            return out
        if span.kind is SpanKind.MIXED:
            if span.steps:
                self._finish_decode(span, report, now_s, out)
            for rs, _, end in span.chunks:
                rs.prefill_done = end - rs.cached_tokens
                if end >= rs.prefill_tokens:
                    self._partial.remove(rs)
                    rs.prefill_s = report.end_s - report.start_s
                    self._prefilled(rs, report.end_s, out)
            return out
        self._finish_decode(span, report, now_s, out)
        return out

    def _prefilled(self, rs: RequestState, token_s: float, out: SpanOutcome) -> None:
        """``rs``'s prefill is done: cache its full prefix blocks, count its first token."""
        self.num_pending_prefill -= 1
        self.pending_prefill_tokens -= rs.prefill_tokens
        hashes = rs.request.prefix_hashes
        if hashes:   # only full blocks are cached: a partial block's KV is not the block's
            block = rs.request.prefix_block_tokens
            tiers = self.memory.tiers
            if tiers is None:
                self.memory.prefix_cache_for(block).use(hashes[:rs.prompt_tokens // block])
            else:
                tiers.sized(block)
                tiers.use(hashes[:rs.prompt_tokens // block])
        rs.on_token(token_s)
        out.prefilled.append(rs)

    def _finish_decode(self, span: Span, report: SpanReport, now_s: float, out: SpanOutcome) -> None:
        batch = self.batch
        boundary = batch.first_step(span.batch, report.first_step_end_s)
        batch.advance(report.steps, span.batch, report.max_step_s, boundary, report.end_s)
        for rs in batch.finished(self.group_id):
            self._leave(rs, report.end_s)
            out.completed.append(rs)
        if self._cancelled:                     # clients that gave up: out at this step boundary
            for rs in self._cancelled:
                if rs.request_id in batch.running:
                    self._leave(rs, report.end_s)
                    out.cancelled.append(rs)
            self._cancelled = []
        self._handle_exhaustion(report.end_s, out)

    def _handle_exhaustion(self, now_s: float, out: SpanOutcome) -> None:
        """Requests that outgrew their reservation: extend it, preempting LIFO when KV is short."""
        batch = self.batch
        mem = self.memory
        while True:
            rs = mem.exhausted(batch.steps_done, batch.running)
            if rs is None:
                return
            new_reserved, need = mem.extension(rs, self.limits.extend_tokens)
            context_now = rs.context_tokens + batch.made(rs)   # progress is lazy
            if not self.fits_ever(new_reserved) and not self.fits_ever(context_now + 1):
                self._leave(rs, now_s)
                out.failed.append(rs)
                continue
            while not self.kv.can_allocate(need) and rs.request_id in batch.running:
                victim = batch.last_joined()
                self._leave(victim, now_s)
                victim.preemptions += 1
                out.preempted.append(victim)
            if rs.request_id not in batch.running:
                continue
            mem.extend(rs, new_reserved, need, context_now, batch.steps_done)

    def _leave(self, rs: RequestState, now_s: float) -> None:
        """Take ``rs`` out of the batch at this step boundary and free its reservation."""
        self.batch.leave(rs, now_s)
        self.memory.release_decode(rs)
