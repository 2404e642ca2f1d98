"""State of one device group: queues, continuous batching, paged KV, spans in closed form.

A group runs one *span* at a time (DESIGN contract §1): a prefill iteration over a batch of
prompts, or up to ``k`` decode steps of the running batch. A decode span ends at the first
of: a request finishing, a request outgrowing its KV reservation (memory boundary), the
roofline kink of the step-time function, or an interruption (a new request ready to join,
cut at the next step boundary). Inside a span the batch and the step-time line are fixed and
the context grows by ``b`` tokens a step, so its duration is an arithmetic series:
``k·a + s·(k·C0 + b·k(k-1)/2)``.

Decode progress is counted lazily: the group keeps ``steps_done``; a request that joined at
step ``j`` with ``g`` tokens generated has ``g + steps_done - j`` now, so a span touches only
the requests that join or leave, never the whole batch.

The group never reads a clock: every method takes ``now_s``. Check/commit pairs
(``can_admit``…) keep the scheduler from touching queues or free lists directly.
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_left
from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import Optional

from hetero_sched.core.kvblocks import BlockAllocator, PrefixCache, blocks_for
from hetero_sched.core.request import Phase, RequestState
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


class SpanKind(Enum):
    PREFILL = "prefill"
    DECODE = "decode"
    MIXED = "mixed"
    """Chunked prefill (Sarathi-Serve): one decode step of the running batch plus prefill chunks."""


class Span:
    """A planned span. ``token`` identifies it (a cut re-issues the same span with a new end).

    A plain class, not a dataclass: compiled, a dataclass's generated ``__init__`` stays
    interpreted, and a span is made for every prefill and decode span of a run.
    """

    def __init__(self, token: int, kind: SpanKind, start_s: float, end_s: float, steps: int,
                 batch: list[RequestState], line: Line = (0.0, 0.0), batch_size: int = 0,
                 context0: int = 0, new_tokens: int = 0, cached_tokens: int = 0,
                 boundary_gap_s: float = 0.0,
                 chunks: tuple[tuple[RequestState, int, int], ...] = ()) -> None:
        self.token = token
        self.kind = kind
        self.start_s = start_s
        self.end_s = end_s
        self.steps = steps
        self.batch = batch
        """Prefill: the prompts. Decode and mixed: the requests joining the batch in this span."""
        self.line = line
        self.batch_size = batch_size
        self.context0 = context0
        self.new_tokens = new_tokens
        self.cached_tokens = cached_tokens
        self.boundary_gap_s = boundary_gap_s
        self.chunks = chunks
        """Mixed spans: ``(request, start, end)`` — prefill-token positions this span computes."""


class SpanOutcome:
    """What a finished span changed, for the scheduler to act on (plain class: see :class:`Span`)."""

    def __init__(self) -> None:
        self.prefilled: list[RequestState] = []
        self.completed: list[RequestState] = []
        self.preempted: list[RequestState] = []
        self.failed: list[RequestState] = []
        """Requests that can never fit this group's KV (reject with a reason)."""


def decode_span_duration(line: Line, context0: int, batch_size: int, steps: int) -> float:
    """Time of ``steps`` decode steps on one step-time line, context growing by the batch size."""
    a, s = line
    return steps * a + s * (steps * context0 + batch_size * steps * (steps - 1) / 2)


def steps_until(line: Line, context0: int, batch_size: int, elapsed_s: float) -> int:
    """Smallest ``j >= 1`` whose cumulative step time reaches ``elapsed_s`` (next step boundary)."""
    a, s = line
    qa = s * batch_size / 2
    qb = a + s * context0 - qa
    if qa > 0:
        j = math.ceil((-qb + math.sqrt(qb * qb + 4 * qa * elapsed_s)) / (2 * qa))
    else:
        j = math.ceil(elapsed_s / qb)
    j = max(j, 1)
    while j > 1 and decode_span_duration(line, context0, batch_size, j - 1) >= elapsed_s:
        j -= 1
    while decode_span_duration(line, context0, batch_size, j) < elapsed_s:
        j += 1
    return j


def active_line(lines: tuple[Line, ...], context: int, batch_size: int) -> tuple[Line, Optional[int]]:
    """The line giving the step time at ``context``, and for how many steps it stays so (None: forever).

    That count is the roofline kink seen from here: the first step whose context passes the
    point where a steeper line overtakes.
    """
    best = lines[0]
    best_val = best[0] + best[1] * context
    for ln in lines[1:]:
        val = ln[0] + ln[1] * context
        if val > best_val or (val == best_val and ln[1] > best[1]):
            best, best_val = ln, val
    limit: Optional[int] = None
    a, s = best
    for a2, s2 in lines:
        if s2 > s:
            crossing = (a - a2) / (s2 - s)
            k = math.floor((crossing - context) / batch_size) + 1
            if limit is None or k < limit:
                limit = k
    return best, (max(limit, 1) if limit is not None else None)


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
        total_blocks = cost.kv_capacity_tokens // limits.block_size
        if role.can_prefill and limits.prefix_cache_fraction > 0:
            cache_blocks = int(total_blocks * limits.prefix_cache_fraction)
        else:
            cache_blocks = 0
        self._kv_blocks = total_blocks - cache_blocks
        self.kv = BlockAllocator(self._kv_blocks)
        # Prefix blocks are their own granularity (e.g. 512 tokens), budgeted from the same memory.
        self._prefix_cache_tokens = cache_blocks * limits.block_size
        self.prefix_cache: Optional[PrefixCache] = None
        self.alive = True
        """False once the device behind the group failed (until it is restored, empty)."""
        self.prefill_queue: deque[RequestState] = deque()
        self.pending_prefill_tokens = 0                     # queued or being prefilled
        self.num_pending_prefill = 0
        self.decode_queue: deque[RequestState] = deque()   # prefilled, awaiting KV reservation here
        self.in_transit = 0                                 # admitted, KV not yet here
        self.ready: list[RequestState] = []                 # KV here (or prefilled here), joins next span
        self.running: dict[int, RequestState] = {}          # insertion order = join order
        self.steps_done = 0
        self.context_tokens = 0
        self.span: Optional[Span] = None
        self.busy_s = 0.0
        self.decode_seq_s = 0.0
        """Σ decode batch size × span time: over the run's length, the mean decode batch."""
        self.kv_block_s = 0.0
        """Σ KV blocks in use × time (sampled whenever the scheduler touches the group)."""
        self._kv_used = 0
        self._kv_since_s = 0.0
        self._tokens = 0
        self._finish_heap: list[tuple[int, int, RequestState]] = []
        self._exhaust_heap: list[tuple[int, int, RequestState]] = []
        self._lines: dict[int, tuple[Line, ...]] = {}
        self._spans_done = 0
        self._gap_idx: list[int] = []     # monotone stack of (span index, gap): max gap since a span
        self._gap_val: list[float] = []
        self._last_decode_end: Optional[float] = None
        self.chunk_budget: Optional[int] = None
        """Tokens per iteration when prefill is chunked (Sarathi-Serve); None: whole prompts."""
        self._partial: list[RequestState] = []            # chunked prefills under way, in order
        self.draining_to: Optional[Role] = None
        """The role this group switches to once drained (None: not switching)."""
        self.drain_start_s = 0.0

    # --- failure -----------------------------------------------------------------------
    def fail(self, now_s: float) -> list[RequestState]:
        """The device behind this group died: everything it held is gone.

        Returns the requests that were here — queued, prefilling, awaiting or holding a decode
        slot — in a deterministic order, their lazily counted tokens settled up to the last
        *finished* span (the running span's work died with the device). The group is left
        empty (KV, queues, prefix cache) and out of service until :meth:`restore`.
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
        for rs in list(self.running.values()):
            made = self.steps_done - rs.join_step
            del self.running[rs.request_id]
            rs.generated += made
            lost[rs.request_id] = rs
        for rs in self.ready:
            lost[rs.request_id] = rs
        for rs in self.decode_queue:
            lost[rs.request_id] = rs
        for rs in lost.values():
            rs.prefill_done = 0
        self.kv = BlockAllocator(self._kv_blocks)
        self.prefix_cache = None
        self.prefill_queue.clear()
        self.decode_queue.clear()
        self.ready = []
        self._partial = []
        self.pending_prefill_tokens = 0
        self.num_pending_prefill = 0
        self.in_transit = 0
        self.context_tokens = 0
        self.span = None
        self._tokens += 1                    # no span end planned before the failure will match
        self._finish_heap = []
        self._exhaust_heap = []
        self._gap_idx = []
        self._gap_val = []
        self._last_decode_end = None
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

    # --- queries -------------------------------------------------------------------------
    @property
    def is_busy(self) -> bool:
        return self.span is not None

    @property
    def num_decoding(self) -> int:
        """Sequences holding a decode slot: running, ready to join, or with KV in transit."""
        return len(self.running) + len(self.ready) + self.in_transit

    def decode_lines(self, batch_size: int) -> tuple[Line, ...]:
        lines = self._lines.get(batch_size)
        if lines is None:
            lines = self._lines[batch_size] = self.cost.decode_step_lines(batch_size)
        return lines

    def account_kv(self, now_s: float) -> None:
        """Add the KV in use since the last call to :attr:`kv_block_s` (the scheduler calls it
        after every change it makes here, so the integral is exact at its event times)."""
        self.kv_block_s += self._kv_used * (now_s - self._kv_since_s)
        self._kv_used = self.kv.num_used
        self._kv_since_s = now_s

    def fits_ever(self, tokens: int) -> bool:
        """Whether ``tokens`` of KV could fit this group at all (when empty)."""
        return blocks_for(tokens, self.limits.block_size) <= self.kv.num_blocks

    def cached_prefix_blocks(self, hashes: tuple[int, ...]) -> int:
        """Leading blocks of ``hashes`` this group's prefix cache holds now (a query: no LRU update)."""
        cache = self.prefix_cache
        return 0 if cache is None else cache.matched_blocks(hashes)

    def drained(self) -> bool:
        """Nothing left of the old role: no span, no queued or running request, no KV held."""
        return (self.span is None and not self.prefill_queue and not self.decode_queue
                and not self.running and not self.ready and self.in_transit == 0
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

    def prefix_cache_for(self, block_tokens: int) -> PrefixCache:
        """The prefix cache, created at the trace's hash-block size on first use."""
        if self.prefix_cache is None:
            self.prefix_cache = PrefixCache(self._prefix_cache_tokens // block_tokens)
        return self.prefix_cache

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

    def enqueue_decode(self, rs: RequestState) -> None:
        rs.phase = Phase.WAITING_DECODE
        rs.decode_group = self.group_id
        self.decode_queue.append(rs)

    def _reservation(self, rs: RequestState, prefill_pending: bool) -> int:
        """KV tokens reserved for decode: prompt plus the predicted (never the true) output.

        At least one decode step's room beyond the tokens that will exist when decode starts
        (``prefill_pending``: the prefill about to run produces one more token).
        """
        generated = rs.generated + (1 if prefill_pending else 0)
        tokens = rs.request.prompt_tokens + max(rs.predicted_output, generated + 1)
        return min(tokens, self.kv.num_blocks * self.limits.block_size)

    def admit_decode(self) -> list[RequestState]:
        """Reserve KV for waiting requests, FIFO, while slots and blocks allow (contract §7).

        A request prefilled here (a fallback decode) turns its prompt KV into the reservation.
        """
        admitted = []
        q = self.decode_queue
        while q and self.num_decoding < self.limits.max_num_seqs:
            rs = q[0]
            reserve = self._reservation(rs, prefill_pending=False)
            blocks = blocks_for(reserve, self.limits.block_size)
            own = rs.prefill_blocks if rs.prefill_group == self.group_id else 0
            if not self.kv.can_allocate(blocks - own):
                break
            if own:
                self.release_prefill_kv(rs)
            self.kv.allocate(blocks)
            q.popleft()
            rs.decode_blocks = blocks
            rs.reserved_tokens = reserve
            rs.phase = Phase.TRANSFERRING
            self.in_transit += 1
            admitted.append(rs)
        return admitted

    def kv_arrived(self, rs: RequestState) -> None:
        """The request's KV is here: it joins the batch at the next step boundary."""
        self.in_transit -= 1
        rs.phase = Phase.DECODING
        self.ready.append(rs)

    def release_prefill_kv(self, rs: RequestState) -> None:
        """Free the prompt KV a prefill group retained until decode had it."""
        self.kv.free(rs.prefill_blocks)
        rs.prefill_blocks = 0

    def wants_interrupt(self) -> bool:
        """Whether the running decode span should stop at its next step boundary."""
        span = self.span
        if span is None or span.kind is not SpanKind.DECODE:
            return False
        if self.ready:
            return True
        return bool(self.prefill_queue) and self._can_admit_prefill(self.prefill_queue[0], 0)

    def cut(self, now_s: float) -> bool:
        """Shorten the running decode span to the first step boundary at or after ``now_s``."""
        span = self.span
        assert span is not None and span.kind is SpanKind.DECODE
        j = steps_until(span.line, span.context0, span.batch_size, now_s - span.start_s)
        if j >= span.steps:
            return False
        span.steps = j
        span.end_s = span.start_s + decode_span_duration(span.line, span.context0, span.batch_size, j)
        self._tokens += 1
        span.token = self._tokens
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
            if span is None and (self.running or self.ready):
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
            return self.kv.can_allocate(blocks_for(self._reservation(rs, True), self.limits.block_size))
        return self.kv.can_allocate(blocks_for(rs.prefill_tokens, self.limits.block_size))

    def _cached_prefix(self, rs: RequestState) -> int:
        """Prompt tokens a prefix-cache hit saves ``rs`` here now."""
        hashes = rs.request.prefix_hashes
        if not hashes:
            return 0
        block = rs.request.prefix_block_tokens
        # a hit covers prompt tokens only (never tokens generated before a preemption),
        # and at least one token is computed to produce the next one
        return min(self.prefix_cache_for(block).matched_blocks(hashes) * block,
                   rs.request.prompt_tokens, rs.prefill_tokens - 1)

    def _start_prefill(self, rs: RequestState, cached: int) -> None:
        """Take ``rs`` off the queue head: its KV (the decode reservation, if it decodes here)."""
        if self._decodes_here(rs):
            reserve = self._reservation(rs, prefill_pending=True)
            rs.decode_blocks = blocks_for(reserve, self.limits.block_size)
            rs.reserved_tokens = reserve
            self.kv.allocate(rs.decode_blocks)
            rs.decode_group = self.group_id
        else:
            rs.prefill_blocks = blocks_for(rs.prefill_tokens, self.limits.block_size)
            self.kv.allocate(rs.prefill_blocks)
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
        while q and len(batch) < lim.max_prefill_seqs:
            rs = q[0]
            cached = self._cached_prefix(rs)
            new = rs.prefill_tokens - cached
            if batch and total + new > lim.max_batch_tokens:
                break
            if not self._can_admit_prefill(rs, len(batch)):
                break
            self._start_prefill(rs, cached)
            batch.append(rs)
            new_list.append(new)
            cached_list.append(cached)
            total += new
        if not batch:
            return None
        duration = self.cost.prefill_time_s(new_list, cached_list)
        self._tokens += 1
        return Span(self._tokens, SpanKind.PREFILL, now_s, now_s + duration, 1, batch,
                    new_tokens=total, cached_tokens=sum(cached_list))

    def _take_chunks(self, budget: int) -> list[tuple[RequestState, int, int]]:
        """Prefill chunks filling ``budget`` tokens: prompts under way first, then the queue's head."""
        chunks: list[tuple[RequestState, int, int]] = []
        for rs in self._partial:
            if budget <= 0:
                return chunks
            start = rs.cached_tokens + rs.prefill_done
            take = min(rs.prefill_tokens - start, budget)
            chunks.append((rs, start, start + take))
            budget -= take
        q = self.prefill_queue
        while budget > 0 and q and len(self._partial) < self.limits.max_prefill_seqs:
            rs = q[0]
            if not self._can_admit_prefill(rs, len(self._partial)):
                break
            cached = self._cached_prefix(rs)
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
        chunks = self._take_chunks(budget - len(self.running) - len(self.ready))
        if not chunks:
            return self._plan_decode(now_s) if (self.running or self.ready) else None
        new_list = [end - start for _, start, end in chunks]
        cached_list = [start for _, start, _ in chunks]
        # prefix-cache hits of the prompts starting here (a later chunk attends to earlier ones)
        first_cached = sum(start for rs, start, _ in chunks if rs.prefill_done == 0)
        duration = self.cost.prefill_time_s(new_list, cached_list)
        joiners = self._join_ready()
        b = len(self.running)
        c0 = self.context_tokens
        line: Line = (0.0, 0.0)
        steps = 0
        boundary = 0.0
        if b:
            line, _ = active_line(self.decode_lines(b), c0, b)
            steps = 1
            duration += line[0] + line[1] * c0
            boundary = self._first_step_at(joiners, now_s + duration)
        self._tokens += 1
        return Span(self._tokens, SpanKind.MIXED, now_s, now_s + duration, steps, joiners,
                    line=line, batch_size=b, context0=c0, new_tokens=sum(new_list),
                    cached_tokens=first_cached, boundary_gap_s=boundary, chunks=tuple(chunks))

    def _join(self, rs: RequestState) -> None:
        rs.join_step = self.steps_done
        rs.join_span = self._spans_done
        ctx = rs.context_tokens
        self.context_tokens += ctx
        rs.finish_step = self.steps_done + rs.request.output_tokens - rs.generated
        heapq.heappush(self._finish_heap, (rs.finish_step, rs.request_id, rs))
        rs.exhaust_step = self.steps_done + rs.reserved_tokens - ctx
        if rs.exhaust_step < rs.finish_step:
            heapq.heappush(self._exhaust_heap, (rs.exhaust_step, rs.request_id, rs))
        rs.phase = Phase.DECODING
        rs.decode_group = self.group_id
        self.running[rs.request_id] = rs

    def _join_ready(self) -> list[RequestState]:
        """Move the requests ready to join into the batch; returns them."""
        joiners = self.ready
        self.ready = []
        for rs in joiners:
            self._join(rs)
        return joiners

    def _first_step_at(self, joiners: list[RequestState], token_s: float) -> float:
        """The span's first decode token comes at ``token_s``: note joiners' token 2 and gaps.

        Returns the gap since the previous decode span ended (0.0 if none).
        """
        for rs in joiners:
            if rs.generated == 1:
                rs.token2_s = token_s
            gap = token_s - rs.last_token_s
            if gap > rs.max_gap_s:
                rs.max_gap_s = gap
        return token_s - self._last_decode_end if self._last_decode_end is not None else 0.0

    def _plan_decode(self, now_s: float) -> Span:
        joiners = self._join_ready()
        b = len(self.running)
        c0 = self.context_tokens
        steps = self._finish_heap[0][0] - self.steps_done
        if self._exhaust_heap:
            steps = min(steps, self._exhaust_heap[0][0] - self.steps_done)
        assert steps >= 1, "a decode span must make progress"
        line, kink = active_line(self.decode_lines(b), c0, b)
        if kink is not None and kink < steps:
            steps = kink
        boundary = self._first_step_at(joiners, now_s + line[0] + line[1] * c0)
        self._tokens += 1
        return Span(self._tokens, SpanKind.DECODE, now_s,
                    now_s + decode_span_duration(line, c0, b, steps), steps, joiners,
                    line=line, batch_size=b, context0=c0, boundary_gap_s=boundary)

    # --- applying a finished span ---------------------------------------------------------
    def finish(self, now_s: float) -> SpanOutcome:
        """Apply the running span, which ended at ``now_s``."""
        span = self.span
        assert span is not None
        self.span = None
        self.busy_s += span.end_s - span.start_s
        if span.kind is not SpanKind.PREFILL:
            self.decode_seq_s += span.batch_size * (span.end_s - span.start_s)
        out = SpanOutcome()
        if span.kind is SpanKind.PREFILL:
            duration = span.end_s - span.start_s
            for rs in span.batch:
                rs.prefill_s = duration
                self._prefilled(rs, now_s, out)
            return out
        if span.kind is SpanKind.MIXED:
            if span.steps:
                self._finish_decode(span, now_s, out)
            for rs, _, end in span.chunks:
                rs.prefill_done = end - rs.cached_tokens
                if end >= rs.prefill_tokens:
                    self._partial.remove(rs)
                    rs.prefill_s = now_s - span.start_s
                    self._prefilled(rs, now_s, out)
            return out
        self._finish_decode(span, now_s, out)
        return out

    def _prefilled(self, rs: RequestState, now_s: float, out: SpanOutcome) -> None:
        """``rs``'s prefill is done: cache its full prefix blocks, count its first token."""
        self.num_pending_prefill -= 1
        self.pending_prefill_tokens -= rs.prefill_tokens
        hashes = rs.request.prefix_hashes
        if hashes:   # only full blocks are cached: a partial block's KV is not the block's
            block = rs.request.prefix_block_tokens
            self.prefix_cache_for(block).use(hashes[:rs.request.prompt_tokens // block])
        rs.on_token(now_s)
        out.prefilled.append(rs)

    def _finish_decode(self, span: Span, now_s: float, out: SpanOutcome) -> None:
        k, b = span.steps, span.batch_size
        a, s = span.line
        self.steps_done += k
        self.context_tokens += b * k
        if span.kind is SpanKind.MIXED:   # the step waited for the prefill chunks too
            inner = span.end_s - span.start_s
        else:
            inner = max(a + s * span.context0, a + s * (span.context0 + b * (k - 1)))
        self._push_gap(self._spans_done, max(inner, span.boundary_gap_s))
        self._spans_done += 1
        for rs in span.batch:
            if inner > rs.max_gap_s:
                rs.max_gap_s = inner
        self._last_decode_end = now_s
        heap = self._finish_heap
        while heap and heap[0][0] <= self.steps_done:
            step, _, rs = heapq.heappop(heap)
            if rs.phase is Phase.DECODING and rs.decode_group == self.group_id and rs.finish_step == step \
                    and rs.request_id in self.running:
                self._leave(rs, now_s)
                out.completed.append(rs)
        self._handle_exhaustion(now_s, out)

    def _handle_exhaustion(self, now_s: float, out: SpanOutcome) -> None:
        heap = self._exhaust_heap
        bs = self.limits.block_size
        while heap and heap[0][0] <= self.steps_done:
            step, _, rs = heapq.heappop(heap)
            if rs.request_id not in self.running or rs.exhaust_step != step:
                continue
            new_reserved = rs.reserved_tokens + self.limits.extend_tokens
            need = blocks_for(new_reserved, bs) - rs.decode_blocks
            context_now = rs.context_tokens + self.steps_done - rs.join_step   # progress is lazy
            if not self.fits_ever(new_reserved) and not self.fits_ever(context_now + 1):
                self._leave(rs, now_s)
                out.failed.append(rs)
                continue
            while not self.kv.can_allocate(need) and rs.request_id in self.running:
                victim = self.running[next(reversed(self.running))]
                self._leave(victim, now_s)
                victim.preemptions += 1
                out.preempted.append(victim)
            if rs.request_id not in self.running:
                continue
            if not self.kv.can_allocate(need):   # alone and still too big: grow to what fits
                need = self.kv.num_free
                new_reserved = min(new_reserved, (rs.decode_blocks + need) * bs)
            self.kv.allocate(need)
            rs.decode_blocks += need
            rs.reserved_tokens = new_reserved
            rs.exhaust_step = self.steps_done + new_reserved - context_now
            if rs.exhaust_step < rs.finish_step:
                heapq.heappush(heap, (rs.exhaust_step, rs.request_id, rs))

    def _leave(self, rs: RequestState, now_s: float) -> None:
        """Take ``rs`` out of the batch at this step boundary, settling its lazy token count."""
        del self.running[rs.request_id]
        made = self.steps_done - rs.join_step
        self.context_tokens -= rs.context_tokens + made
        rs.generated += made
        if made:
            rs.last_token_s = now_s
        gap = self._max_gap_since(rs.join_span + 1)
        if gap > rs.max_gap_s:
            rs.max_gap_s = gap
        self.kv.free(rs.decode_blocks)
        rs.decode_blocks = 0
        rs.reserved_tokens = 0

    def _push_gap(self, span_index: int, gap: float) -> None:
        while self._gap_val and self._gap_val[-1] <= gap:
            self._gap_val.pop()
            self._gap_idx.pop()
        self._gap_idx.append(span_index)
        self._gap_val.append(gap)

    def _max_gap_since(self, span_index: int) -> float:
        i = bisect_left(self._gap_idx, span_index)
        return self._gap_val[i] if i < len(self._gap_val) else 0.0
