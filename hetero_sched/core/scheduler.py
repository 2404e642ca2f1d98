"""The scheduler: turns events into decisions by asking a policy, and plans spans.

Plain Python, no Ray, no clock: every handler takes ``now_s``. A driver (the simulator's event
loop, or the runtime's scheduler actor) feeds it events in the contract's order and, once all
events of a time are in, calls :meth:`Scheduler.plan`, which returns the timers to set — span
ends, transfer progress — as ``(time_s, Kind, payload)``. That is the plan/execute/apply split:
the scheduler plans and applies; the driver's executor (virtual time, a sleep, a numpy model)
decides *when* each timer fires. Stale timers (a span that was cut, a transfer re-rated) carry
an old token and are ignored here, so drivers never cancel anything.

Every decision is added to :attr:`Scheduler.decisions` (a
:class:`~hetero_sched.core.events.DecisionLog`); a finished request becomes one row of
:attr:`Scheduler.records` (see :data:`RECORD_COLUMNS`).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Protocol, Sequence

from hetero_sched.core.events import DecisionKind as D, DecisionLog, Kind
from hetero_sched.core.group import GroupState, Role, Span, SpanKind, SpanOutcome
from hetero_sched.core.request import Phase, RequestState
from hetero_sched.core.transfer import TransferNetwork
from hetero_sched.policies.base import GroupView, Placement, Policy, Reject, RequestInfo
from hetero_sched.workload import Request

Timer = tuple[float, int, Any]
"""``(time_s, Kind.*, payload)``: something the driver must call back at ``time_s``."""

RECORD_COLUMNS = (
    "request_id", "arrival_s", "prompt_tokens", "output_tokens", "predicted_output",
    "cached_tokens", "status", "reason", "prefill_group", "decode_group",
    "token1_s", "token2_s", "finish_s", "max_gap_s", "preemptions", "generated",
)
"""One row per finished request. Times are absolute (same clock as ``arrival_s``)."""


class ExecutorHooks(Protocol):
    """What a live executor needs to hear from the core (the simulator passes none).

    The core calls these as it decides; the runtime turns them into batched actor calls.
    """

    def span_planned(self, group_id: int, span: Span) -> None: ...
    def span_cut(self, group_id: int, span: Span) -> None: ...
    def transfer_started(self, transfer_id: int, rs: RequestState, src: int, dst: int, num_bytes: int) -> None: ...
    def kv_landed(self, transfer_id: int, rs: RequestState, src: int, dst: int) -> None: ...
    def request_left(self, group_id: int, rs: RequestState, how: str) -> None:
        """``rs`` left ``group_id`` (completed / preempted / failed): its KV there can go."""


class Scheduler:
    """Places requests, plans spans and transfers, keeps the decision log and the records."""

    def __init__(self, groups: Sequence[GroupState], policy: Policy, predicted_output: Sequence[int],
                 report_interval_s: float = 0.0) -> None:
        self.groups = list(groups)
        self.policy = policy
        self.predicted_output = predicted_output
        self.report_interval_s = report_interval_s
        self.views = [GroupView(g.group_id, g.name, g.device, g.pool, g.role, g.cost, g.kv.num_blocks)
                      for g in self.groups]
        policy.check(self.views)
        self.network = TransferNetwork([g.cost.egress_bytes_per_s for g in self.groups],
                                       [g.cost.ingress_bytes_per_s for g in self.groups])
        self.decisions = DecisionLog()
        self.records: list[tuple] = []
        self.num_active = 0
        self._transfers: dict[int, tuple[RequestState, int, int]] = {}   # id -> (request, src, dst)
        self._next_transfer_id = 0
        self._dirty: set[int] = set()
        self._network_version = -1
        self.hooks: Optional[ExecutorHooks] = None

    # --- events ----------------------------------------------------------------------------
    def on_arrival(self, now_s: float, request: Request) -> None:
        """A request arrives: ask the policy where it goes."""
        rs = RequestState(request, int(self.predicted_output[request.request_id]))
        self.num_active += 1
        self._place(now_s, rs)

    def on_span_end(self, now_s: float, group_id: int, token: int) -> None:
        """A group's span ended (ignored if it was cut or replaced since)."""
        g = self.groups[group_id]
        if g.span is None or g.span.token != token:
            return
        out = g.finish(now_s)
        self._apply(now_s, g, out)
        if now_s - self.views[group_id].reported_s >= self.report_interval_s:
            self._report(g, now_s)
        self._dirty.add(group_id)

    def on_transfer(self, now_s: float, version: int) -> list[Timer]:
        """The transfer network's next change is due: returns KV-arrival timers."""
        if version != self.network.version:
            return []
        return self._arrivals(now_s, self.network.finish_due(now_s))

    def on_kv_arrival(self, now_s: float, transfer_id: int) -> None:
        """A request's KV landed at its decode group: free the prefill copy, join next span."""
        rs, src_id, dst_id = self._transfers.pop(transfer_id)
        src = self.groups[src_id]
        dst = self.groups[dst_id]
        src.release_prefill_kv(rs)
        dst.kv_arrived(rs)
        if self.hooks is not None:
            self.hooks.kv_landed(transfer_id, rs, src_id, dst_id)
        self.decisions.add(now_s, D.KV_ARRIVED, dst.group_id, rs.request_id)
        self._dirty.add(src.group_id)
        self._dirty.add(dst.group_id)

    # --- planning ---------------------------------------------------------------------------
    def plan(self, now_s: float) -> list[Timer]:
        """Decisions at ``now_s`` after all of its events: admissions, transfers, spans, cuts."""
        timers: list[Timer] = []
        if not self._dirty and self.network.version == self._network_version:
            return timers
        log = self.decisions.add
        while self._dirty:
            dirty = sorted(self._dirty)
            self._dirty.clear()
            for gid in dirty:
                g = self.groups[gid]
                if g.decode_queue:
                    for rs in g.admit_decode():
                        self._start_transfer(now_s, rs, gid, timers)
                if g.span is None:
                    span = g.plan(now_s)
                    if span is not None:
                        dur = span.end_s - span.start_s
                        if span.kind is SpanKind.PREFILL:
                            log(now_s, D.PREFILL, gid, None, len(span.batch), span.new_tokens, span.cached_tokens, dur)
                        else:
                            log(now_s, D.DECODE, gid, None, span.batch_size, span.steps, dur)
                        timers.append((span.end_s, Kind.SPAN_END, (gid, span.token)))
                        if self.hooks is not None:
                            self.hooks.span_planned(gid, span)
                elif g.wants_interrupt() and g.cut(now_s):
                    span = g.span
                    log(now_s, D.CUT, gid, None, span.steps, span.end_s)
                    timers.append((span.end_s, Kind.SPAN_END, (gid, span.token)))
                    if self.hooks is not None:
                        self.hooks.span_cut(gid, span)
        if self.network.version != self._network_version:
            self._network_version = self.network.version
            nxt = self.network.next_finish_s()
            if nxt is not None:
                timers.append((max(nxt, now_s), Kind.TRANSFER, self.network.version))
        return timers

    # --- internals --------------------------------------------------------------------------
    def _info(self, rs: RequestState) -> RequestInfo:
        r = rs.request
        return RequestInfo(rs.request_id, r.arrival_s, rs.prefill_tokens, rs.predicted_output,
                           r.prefix_hashes, r.prefix_block_tokens)

    def _place(self, now_s: float, rs: RequestState) -> None:
        decision = self.policy.place(self._info(rs), self.views, now_s)
        if isinstance(decision, Reject):
            self._reject(now_s, rs, decision.reason)
            return
        reason = self._check(decision, rs)
        if reason is not None:
            self._reject(now_s, rs, reason)
            return
        g = self.groups[decision.prefill_group]
        rs.decode_group = decision.decode_group
        g.enqueue_prefill(rs, front=rs.preemptions > 0)
        view = self.views[g.group_id]
        view.num_prefill_queued += 1
        view.prefill_queued_tokens += rs.prefill_tokens
        self.decisions.add(now_s, D.PLACE, g.group_id, rs.request_id,
                           math.nan if decision.decode_group is None else decision.decode_group)
        self._dirty.add(g.group_id)

    def _check(self, p: Placement, rs: RequestState) -> Optional[str]:
        """Capacity check of a policy's placement (the policy decides, the scheduler verifies)."""
        n = len(self.groups)
        if not 0 <= p.prefill_group < n or not self.groups[p.prefill_group].can_prefill:
            return f"policy chose group {p.prefill_group}, which cannot prefill"
        g = self.groups[p.prefill_group]
        need = rs.context_tokens + 1
        if not g.fits_ever(need):
            return f"prompt of {rs.prefill_tokens} tokens exceeds the KV capacity of group {g.name}"
        if p.decode_group is not None:
            if not 0 <= p.decode_group < n or not self.groups[p.decode_group].can_decode:
                return f"policy chose group {p.decode_group}, which cannot decode"
            if not self.groups[p.decode_group].fits_ever(need):
                return f"prompt of {rs.prefill_tokens} tokens exceeds the KV capacity of group {self.groups[p.decode_group].name}"
        return None

    def _apply(self, now_s: float, g: GroupState, out: SpanOutcome) -> None:
        hooks = self.hooks
        if hooks is not None:
            for rs in out.completed:
                hooks.request_left(g.group_id, rs, "completed")
            for rs in out.preempted:
                hooks.request_left(g.group_id, rs, "preempted")
            for rs in out.failed:
                hooks.request_left(g.group_id, rs, "failed")
        for rs in out.prefilled:
            if rs.generated >= rs.request.output_tokens:
                if hooks is not None:
                    hooks.request_left(g.group_id, rs, "completed")
                if g.role is Role.BOTH:
                    g.kv.free(rs.decode_blocks)
                    rs.decode_blocks = 0
                else:
                    g.release_prefill_kv(rs)
                self._complete(now_s, rs, g.group_id)
            elif g.role is Role.BOTH and rs.decode_group in (None, g.group_id):
                rs.phase = Phase.DECODING
                rs.decode_group = g.group_id
                g.ready.append(rs)
            else:
                self._route_decode(now_s, rs, g)
        for rs in out.completed:
            self._complete(now_s, rs, g.group_id)
        for rs in out.preempted:
            self.decisions.add(now_s, D.PREEMPT, g.group_id, rs.request_id, rs.generated)
            if g.role is Role.BOTH:
                g.enqueue_prefill(rs, front=True)
            else:
                rs.decode_group = None
                self._place(now_s, rs)
        for rs in out.failed:
            self._reject(now_s, rs, f"KV of {rs.context_tokens} tokens outgrew group {g.name}")

    def _route_decode(self, now_s: float, rs: RequestState, src: GroupState) -> None:
        target = rs.decode_group
        if target is None:
            choice = self.policy.place_decode(self._info(rs), self.views, now_s)
            if isinstance(choice, Reject):
                src.release_prefill_kv(rs)
                self._reject(now_s, rs, choice.reason)
                return
            target = choice
        dst = self.groups[target]
        if not dst.can_decode or not dst.fits_ever(rs.context_tokens + 1):
            src.release_prefill_kv(rs)
            self._reject(now_s, rs, f"decode group {dst.name} cannot hold {rs.context_tokens} tokens")
            return
        dst.enqueue_decode(rs)
        self.views[target].num_decode_queued += 1
        self._dirty.add(target)

    def _start_transfer(self, now_s: float, rs: RequestState, dst_id: int, timers: list[Timer]) -> None:
        src_id = rs.prefill_group
        assert src_id is not None
        src = self.groups[src_id]
        tid = self._next_transfer_id
        self._next_transfer_id += 1
        rs.transfer_id = tid
        self._transfers[tid] = (rs, src_id, dst_id)
        nbytes = rs.context_tokens * src.cost.transfer_bytes_per_token
        self.decisions.add(now_s, D.ADMIT, dst_id, rs.request_id, rs.decode_blocks)
        self.decisions.add(now_s, D.TRANSFER, src_id, rs.request_id, dst_id, nbytes)
        if self.hooks is not None:
            self.hooks.transfer_started(tid, rs, src_id, dst_id, nbytes)
        timers.extend(self._arrivals(now_s, self.network.start(now_s, tid, src_id, dst_id, nbytes)))

    def _arrivals(self, now_s: float, done: list[int]) -> list[Timer]:
        out = []
        for tid in done:
            src_id = self._transfers[tid][1]
            cost = self.groups[src_id].cost.message_cost_s
            out.append((now_s + cost, Kind.KV_ARRIVAL, tid))
        return out

    def _complete(self, now_s: float, rs: RequestState, group_id: int) -> None:
        rs.phase = Phase.COMPLETED
        rs.finish_s = now_s
        self.decisions.add(now_s, D.COMPLETE, group_id, rs.request_id)
        self._record(rs, "completed")

    def _reject(self, now_s: float, rs: RequestState, reason: str) -> None:
        rs.phase = Phase.REJECTED
        rs.reject_reason = reason
        rs.finish_s = now_s
        self.decisions.add_reject(now_s, rs.request_id, reason)
        self._record(rs, "rejected")

    def _record(self, rs: RequestState, status: str) -> None:
        r = rs.request
        self.records.append((
            rs.request_id, r.arrival_s, r.prompt_tokens, r.output_tokens, rs.predicted_output,
            rs.cached_tokens, status, rs.reject_reason, rs.prefill_group, rs.decode_group,
            rs.token1_s, rs.token2_s, rs.finish_s, rs.max_gap_s, rs.preemptions, rs.generated,
        ))
        self.num_active -= 1

    def _report(self, g: GroupState, now_s: float) -> None:
        v = self.views[g.group_id]
        v.kv_blocks_free = g.kv.num_free
        v.num_prefill_queued = g.num_pending_prefill
        v.prefill_queued_tokens = g.pending_prefill_tokens
        v.num_decode_queued = len(g.decode_queue)
        v.num_decoding = g.num_decoding
        v.reported_s = now_s
