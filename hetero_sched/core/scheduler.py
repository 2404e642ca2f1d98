"""The scheduler: turns events into decisions by asking a policy, and plans spans.

Plain Python, no Ray, no clock: every handler takes ``now_s``. A driver (the engine's event
loop, in the simulator or the runtime) feeds it events in the contract's order and, once all
events of a time are in, calls :meth:`Scheduler.plan`, which returns what to do next as
``(time_s, Kind, payload)``: spans to run (``SPAN_END`` with the :class:`Span`, at its expected
end: the driver hands it to the group's *device*) and transfer progress. That is the
plan/execute/apply split: the scheduler plans; a device executes and reports
(:class:`~hetero_sched.core.spans.SpanReport`); the scheduler applies the report
(:meth:`Scheduler.on_span_end`). Stale timers (a transfer re-rated) carry an old version and
are ignored here, so drivers never cancel anything.

Every decision is added to :attr:`Scheduler.decisions` (a
:class:`~hetero_sched.core.events.DecisionLog`); a finished request becomes one row of
:attr:`Scheduler.records` (see :data:`RECORD_COLUMNS`).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, cast

from hetero_sched.core.events import NO_ID, DecisionCode as D, DecisionLog, Kind, log_id
from hetero_sched.core.fleet import Fleet
from hetero_sched.core.costmemo import CostMemo
from hetero_sched.core.group import GroupState, Role
from hetero_sched.core.hooks import ExecutorHooks
from hetero_sched.core.kvblocks import PrefixHolders
from hetero_sched.core.kvstore import ClusterKVStore, PrefixPlanner
from hetero_sched.core.kvtiers import STORE, fetch_windows
from hetero_sched.core.placement import Placement, RequestInfo
from hetero_sched.core.rejection import capacity, infeasible
from hetero_sched.core.request import Phase, Request, RequestState
from hetero_sched.core.spans import Span, SpanKind, SpanOutcome, SpanReport
from hetero_sched.core.transfer import LayerwiseStreaming, TransferNetwork, layerwise_tail
from hetero_sched.errors import UserError
from hetero_sched.policies.base import GroupView, Policy, PolicyFailed, Reject, RejectCode as R, RoleSwitch

Timer = tuple[float, int, Any]
"""``(time_s, Kind.*, payload)``: something the driver must call back at ``time_s``."""


def _is_group_id(value: object) -> bool:
    """Whether a policy's answer is a group id at all (an int, not a bool); its range is checked apart."""
    return isinstance(value, int) and not isinstance(value, bool)


RECORD_COLUMNS = (
    "request_id", "arrival_s", "prompt_tokens", "output_tokens", "predicted_output",
    "cached_tokens", "status", "reason", "prefill_group", "decode_group",
    "token1_s", "token2_s", "finish_s", "max_gap_s", "preemptions", "generated", "reason_code",
)
"""One row per finished request. Times are absolute (same clock as ``arrival_s``); a rejection's
``reason`` is a sentence, its ``reason_code`` one of :class:`~hetero_sched.policies.base.RejectCode`."""


def _log_span_ids(log: DecisionLog, requests: list[RequestState]) -> None:
    """The request ids of the span decision just logged, one by one (a list of the ids was a
    boxed int per request)."""
    for rs in requests:
        log.add_span_id(rs.request_id)
    log.end_span_ids()


class Scheduler:
    """Places requests, plans spans and transfers, keeps the decision log and the records."""

    def __init__(self, groups: Sequence[GroupState], policy: Policy, predicted_output: Sequence[int],
                 report_interval_s: float = 0.0, layerwise: Optional[LayerwiseStreaming] = None,
                 max_inflight: Optional[int] = None, max_context_tokens: Optional[int] = None,
                 store: Optional[ClusterKVStore] = None) -> None:
        self.groups = list(groups)
        self.store = store
        """The cluster KV store (None: none), one more endpoint of the transfer network."""
        self._planners: list[Optional[PrefixPlanner]] = [
            None if g.memory.tiers is None else PrefixPlanner(g.memory.tiers, store, g.cost.ingress_bytes_per_s)
            for g in self.groups]
        self.max_inflight = max_inflight
        """Admission control: an arrival finding this many requests in flight is rejected at once."""
        self.policy = policy
        self.predicted_output = predicted_output
        self.report_interval_s = report_interval_s
        self.layerwise = layerwise
        """Stream KV layer by layer during prefill (None: send after prefill)."""
        memos: dict[int, CostMemo] = {}
        for g in self.groups:
            g.share_cost_memo(memos.setdefault(id(g.cost), CostMemo(g.cost)))
        self.views = [GroupView(g.group_id, g.name, g.device, g.pool, g.role, g.cost, g.kv.num_blocks,
                                block_size=g.limits.block_size, max_batch_tokens=g.limits.max_batch_tokens,
                                max_num_seqs=g.limits.max_num_seqs, prefix_probe=g.cached_prefix_blocks,
                                prefix_planner=None if planner is None else planner.plan, memo=memos[id(g.cost)])
                      for g, planner in zip(self.groups, self._planners)]
        # with KV tiers a group's device-memory prefix blocks live in its tiers, not in a prefix
        # cache the index hears from: the Fleet then asks each view (O(G), tiers only)
        tiered = any(g.memory.tiers is not None for g in self.groups)
        holders = None if tiered else PrefixHolders()
        self.fleet = Fleet(self.views, holders)
        """The views as policies get them, with the indexes that spare them a scan of every group."""
        self._seen = cast(Sequence[GroupView], self.fleet)    # a Fleet is a sequence of views
        if holders is not None:
            for g in self.groups:
                g.memory.index_prefixes(holders, g.group_id)
        try:
            policy.check(self._seen)
        except UserError:
            raise
        except Exception as exc:
            raise PolicyFailed.raised(policy, "check", exc) from exc
        self._rebalances = policy.rebalances
        self.capacity = capacity(self.groups, policy.rebalances or policy.serves_any_role, max_context_tokens)
        """What no group can ever serve is rejected at arrival (:func:`infeasible`)."""
        budget = policy.chunk_budget_tokens
        if budget is not None:
            for g in self.groups:
                if g.role is Role.BOTH:
                    g.chunk_budget = budget
        egress = [g.cost.egress_bytes_per_s for g in self.groups]
        ingress = [g.cost.ingress_bytes_per_s for g in self.groups]
        if store is not None:
            store.endpoint = len(egress)
            egress.append(store.bytes_per_s)
            ingress.append(store.bytes_per_s)
        self.network = TransferNetwork(egress, ingress)
        self.decisions = DecisionLog()
        self.records: list[tuple] = []
        self.num_active = 0
        self._active: dict[int, RequestState] = {}
        """Requests accepted and not yet ended, by id (what :meth:`cancel` looks up)."""
        self._transfers: dict[int, tuple[RequestState, int, int, float]] = {}   # id -> (request, src, dst, delay)
        self._next_transfer_id = 0
        self._dirty: set[int] = set()
        self._boxed_ids: list[Any] = list(range(len(self.groups)))
        """Each group id as one Python int, made once, for what goes into ``_dirty``: compiled
        code keeps ints unboxed and boxes one at every such store, and CPython has only ids up
        to 256 ready-made, so past 257 groups each store allocated an int."""
        self._network_version = -1
        self._outcome = SpanOutcome()
        """What the span being applied changed (one, emptied for each span end)."""
        self._timers: list[Timer] = []
        """Timers made between plans (a re-sent transfer), handed out by the next :meth:`plan`."""
        self._failed: set[int] = set()
        """Groups out of service after a failure (policies see them unable to take either role)."""
        self.hooks: Optional[ExecutorHooks] = None
        self.resumed: dict[int, tuple[int, Optional[float], Optional[float], float]] = {}
        """After a scheduler restart: what each request arriving again had already delivered
        (tokens, first- and second-token times, last-token time), from the journal."""

    # --- events ----------------------------------------------------------------------------
    def on_arrival(self, now_s: float, request: Request) -> None:
        """A request arrives: ask the policy where it goes."""
        rs = RequestState(request, int(self.predicted_output[request.request_id]))
        self.num_active += 1
        self._active[request.request_id] = rs
        if self.resumed and request.request_id in self.resumed:
            self._resume_delivered(now_s, rs)
            return
        never = infeasible(self.capacity, request.prompt_tokens, rs.predicted_output, request.max_tokens)
        if never is not None:
            self._reject(now_s, rs, never[1], never[0])
            return
        if self.max_inflight is not None and self.num_active > self.max_inflight:
            # overload: reject early, with a reason, rather than queue without bound
            self._reject(now_s, rs, f"overloaded: {self.max_inflight} requests already in flight "
                                    "(admission.max_inflight)", R.OVERLOADED)
            return
        self._place(now_s, rs)

    def on_span_end(self, now_s: float, report: SpanReport) -> None:
        """A group's device reports that its span ended: apply what it did (ignored if that span
        is no longer the group's: its device died since).

        Raises ValueError for a report no device may send (more steps than planned, or none).
        """
        group_id = report.group_id
        g = self.groups[group_id]
        span = g.span
        if span is None or span.span_id != report.span_id:
            return
        planned = span.planned_steps
        if span.kind is SpanKind.DECODE and not 1 <= report.steps <= planned \
                or span.kind is not SpanKind.DECODE and report.steps != planned:
            raise ValueError(f"group {g.name} reported {report.steps} step(s) for a {span.kind.value} span "
                             f"planned with {planned}")
        out = g.finish(now_s, report, self._outcome)
        if self.hooks is not None:
            self.hooks.span_applied(now_s, group_id, span, report)
        self._apply(now_s, g, out)
        interval = self.report_interval_s   # (0, the default: every span end reports, no view read)
        if interval <= 0.0 or now_s - self.views[group_id].reported_s >= interval:
            self._report(g, now_s)
        self._mark_dirty(group_id)

    def on_transfer(self, now_s: float, version: int) -> list[Timer]:
        """The transfer network's next change is due: returns KV-arrival timers."""
        if version != self.network.version:
            return []
        return self._arrivals(now_s, self.network.finish_due(now_s))

    def on_kv_arrival(self, now_s: float, transfer_id: int) -> None:
        """A request's KV landed at its decode group: free the prefill copy, join next span.
        (A negative id: a read from, or write to, the cluster KV store landed.)"""
        if transfer_id < 0:
            self._store_landed(now_s, transfer_id)
            return
        entry = self._transfers.pop(transfer_id, None)
        if entry is None:
            return                          # cancelled: an endpoint failed while the KV was on its way
        rs, src_id, dst_id, _ = entry
        src = self.groups[src_id]
        dst = self.groups[dst_id]
        src.release_prefill_kv(rs)
        dst.kv_arrived(rs)
        if self.hooks is not None:
            self.hooks.kv_landed(now_s, transfer_id, rs, src_id, dst_id)
        self.decisions.add(now_s, D.KV_ARRIVED, dst.group_id, rs.request_id)
        self._mark_dirty(src.group_id)
        self._mark_dirty(dst.group_id)

    def fail_group(self, now_s: float, group_id: int, delivered: Optional[dict[int, int]] = None,
                   restarted: bool = False) -> None:
        """The device behind ``group_id`` died: nothing it held survives, no request is lost.

        Every request with state there is resumed elsewhere (DESIGN contract §7, KV lifecycle):
        one whose KV still sits at a live prefill group (waiting for decode admission, or in
        flight to the dead group) is routed to another decode group and transferred again from
        that retained KV; every other one (queued, prefilling or decoding there, or whose KV was
        coming *from* there) is placed again and prefilled again, prompt plus the tokens it has
        delivered. ``delivered`` (live runs) is how many tokens each request really delivered:
        tokens of a span whose answer died with the actor are made again. The group takes no
        work until :meth:`restore_group` — or at once, empty, if its device already
        ``restarted`` (a restarted actor), so it may take some of the resumed work itself.
        """
        g = self.groups[group_id]
        if not g.alive:
            return
        g.account_kv(now_s)
        lost = g.fail(now_s)
        g.account_kv(now_s)                                    # its KV is gone from now on
        if self.store is not None:                             # its store reads and writes die with it
            self.store.cancel_group(now_s, group_id, self.network)
        self._failed.add(group_id)
        self.fleet.set_roles(group_id, False, False)
        self._report(g, now_s)
        hooks = self.hooks
        again: dict[int, RequestState] = {}                    # prefill again
        reroute: dict[int, RequestState] = {}                  # decode elsewhere from retained KV
        for tid in sorted(self._transfers):
            rs, src_id, dst_id, _ = self._transfers[tid]
            if group_id not in (src_id, dst_id):
                continue
            del self._transfers[tid]
            self.network.cancel(now_s, tid)
            if hooks is not None:
                hooks.transfer_cancelled(now_s, tid, rs, src_id, dst_id)
            if src_id == group_id:                             # the KV's source is gone
                self.groups[dst_id].cancel_admission(rs)
                self._mark_dirty(dst_id)
                again[rs.request_id] = rs
            else:                                              # the destination is gone
                reroute[rs.request_id] = rs
        for other in self.groups:                              # prefilled there, waiting elsewhere
            for rs in other.unqueue_decode(group_id):
                self.fleet.routed_decode(other.group_id, -1)
                again[rs.request_id] = rs
        for rs in lost:
            src = rs.prefill_group
            if (rs.phase is Phase.WAITING_DECODE and src is not None and src != group_id
                    and rs.prefill_blocks):
                reroute[rs.request_id] = rs
            elif rs.request_id not in reroute:
                again[rs.request_id] = rs
        self.decisions.add(now_s, D.FAIL, group_id, NO_ID, len(again) + len(reroute))
        if hooks is not None:
            for rs in [*again.values(), *reroute.values()]:
                hooks.request_left(now_s, group_id, rs, "failed")
        if restarted:
            self.restore_group(now_s, group_id)
        for rs in again.values():
            self._resume(now_s, rs, group_id, delivered)
        for rs in reroute.values():
            rs.decode_blocks = 0
            rs.decode_group = None
            rs.transfer_id = None
            retained = rs.prefill_group
            assert retained is not None
            self._route_decode(now_s, rs, self.groups[retained])

    def cancel(self, now_s: float, request_id: int) -> bool:
        """The client gave up on a request (serving: it disconnected): free what it holds
        everywhere — its queue place, its KV at every group, its transfer — and end it
        ``cancelled``. A prefill under way finishes first (a span is not interrupted); a decoding
        request leaves at its group's next step boundary (the running span is cut for it).
        Returns False if the request already ended (or never arrived)."""
        rs = self._active.get(request_id)
        if rs is None or rs.cancelled:
            return False
        rs.cancelled = True
        hooks = self.hooks
        phase = rs.phase
        if phase is Phase.WAITING_PREFILL and rs.prefill_group is not None:
            g = self.groups[rs.prefill_group]
            g.unqueue_prefill(rs)
            self.fleet.placed(g.group_id, -rs.prefill_tokens, -1)
            self._mark_dirty(g.group_id)
            self._end_cancelled(now_s, rs, None)
        elif phase is Phase.WAITING_DECODE and rs.decode_group is not None:
            self.groups[rs.decode_group].decode_queue.remove(rs)
            self.fleet.routed_decode(rs.decode_group, -1)
            self._release_source(now_s, rs)
            self._end_cancelled(now_s, rs, None)
        elif phase is Phase.TRANSFERRING and rs.transfer_id is not None and rs.transfer_id in self._transfers:
            tid = rs.transfer_id
            _, src_id, dst_id, _ = self._transfers.pop(tid)
            self.network.cancel(now_s, tid)
            if hooks is not None:
                hooks.transfer_cancelled(now_s, tid, rs, src_id, dst_id)
            self.groups[dst_id].cancel_admission(rs)
            rs.decode_blocks = 0
            self._mark_dirty(dst_id)
            self._release_source(now_s, rs)
            self._end_cancelled(now_s, rs, None)
        elif phase is Phase.DECODING and rs.decode_group is not None:
            g = self.groups[rs.decode_group]
            self._mark_dirty(g.group_id)      # a running span is cut for it at the next plan
            if g.cancel_decode(rs, now_s):
                if hooks is not None:
                    hooks.request_left(now_s, g.group_id, rs, "cancelled")
                self._end_cancelled(now_s, rs, g.group_id)
        return True                          # prefilling: it ends when its prefill does

    def _release_source(self, now_s: float, rs: RequestState) -> None:
        """Free the prompt KV the prefill group retained for ``rs`` (it will never be sent)."""
        src = rs.prefill_group
        if src is not None and rs.prefill_blocks:
            self.groups[src].release_prefill_kv(rs)
            if self.hooks is not None:
                self.hooks.request_left(now_s, src, rs, "cancelled")
            self._mark_dirty(src)

    def whereabouts(self) -> dict[int, str]:
        """Where each request the core still holds sits (for the "unfinished request" error)."""
        out: dict[int, str] = {}
        for g in self.groups:
            out.update(g.requests_held())
        for tid, (rs, src, dst, _) in self._transfers.items():
            out[rs.request_id] = f"transfer {tid} {self.groups[src].name}->{self.groups[dst].name}"
        return out

    def needs_plan(self) -> bool:
        """Whether something changed since the last :meth:`plan` (a driver's hook reported news)."""
        return bool(self._dirty or self._timers) or self.network.version != self._network_version

    def kv_damaged(self, now_s: float, transfer_id: int) -> None:
        """The KV of ``transfer_id`` reached its decode group damaged (checksum) or lost: send it
        again. The prefill side keeps its copy until KV lands intact (contract §7), and the
        decode reservation stays, so nothing is decoded from bad KV and nothing is prefilled again.
        """
        entry = self._transfers.pop(transfer_id, None)
        if entry is None:
            return
        rs, src_id, dst_id, _ = entry
        self.decisions.add(now_s, D.KV_BAD, dst_id, rs.request_id)
        if self.hooks is not None:
            self.hooks.transfer_cancelled(now_s, transfer_id, rs, src_id, dst_id)
        self._start_transfer(now_s, rs, dst_id, self._timers, admitted=False)

    def restore_group(self, now_s: float, group_id: int) -> None:
        """A failed group's device is back (restarted, empty): it serves its role again."""
        g = self.groups[group_id]
        if g.alive:
            return
        g.restore()
        self._failed.discard(group_id)
        self.fleet.set_roles(group_id, g.can_prefill, g.can_decode)
        self._report(g, now_s)
        self.decisions.add(now_s, D.RESTORE, group_id, NO_ID)
        self._mark_dirty(group_id)

    def _resume_delivered(self, now_s: float, rs: RequestState) -> None:
        """A request the previous scheduler accepted: continue after the tokens it delivered.

        Like a preemption (prefilled again with prompt plus delivered tokens, on any group),
        but never rejected by admission control: it was accepted once.
        """
        rs.generated, rs.token1_s, rs.token2_s, rs.last_token_s = self.resumed.pop(rs.request_id)
        self._start_over(now_s, rs, None)

    def _resume(self, now_s: float, rs: RequestState, failed_id: int, delivered: Optional[dict[int, int]]) -> None:
        """Place ``rs`` again after ``failed_id`` failed: its KV there (and its reservations) are gone."""
        if delivered is not None:
            rs.generated = min(rs.generated, delivered.get(rs.request_id, 0))
        src_id = rs.prefill_group
        if src_id is not None and src_id != failed_id and rs.prefill_blocks:
            self.groups[src_id].release_prefill_kv(rs)         # a live group's copy, no longer wanted
            self._mark_dirty(src_id)
            if self.hooks is not None:
                self.hooks.request_left(now_s, src_id, rs, "failed")
        rs.prefill_blocks = 0
        rs.decode_blocks = 0
        rs.reserved_tokens = 0
        rs.decode_group = None
        rs.transfer_id = None
        rs.cached_tokens = 0
        self._start_over(now_s, rs, failed_id)

    def _start_over(self, now_s: float, rs: RequestState, group_id: Optional[int]) -> None:
        """A preemption that lost ``rs``'s KV (at ``group_id``; None: the scheduler's restart):
        complete it if every token was already delivered, else place it to be prefilled again."""
        rs.preemptions += 1
        self.decisions.add(now_s, D.PREEMPT, log_id(group_id), rs.request_id, rs.generated)
        if rs.generated >= rs.output_tokens:
            self._complete(now_s, rs, group_id)
        else:
            self._place(now_s, rs)

    # --- planning ---------------------------------------------------------------------------
    def plan(self, now_s: float) -> list[Timer]:
        """Decisions at ``now_s`` after all of its events: admissions, transfers, spans, cuts."""
        timers: list[Timer] = self._timers
        self._timers = []
        dirty: set[Any] = self._dirty          # Any: group ids kept boxed (see _boxed_ids)
        # (len(): a set's truth value is a generic call in compiled code, ~25 per request)
        if not len(dirty) and self.network.version == self._network_version:
            return timers
        if self._rebalances:
            self._rebalance(now_s)
        while len(dirty):
            if len(dirty) == 1:                # the usual case: sorting a one-item set costs 4% of a run
                self._plan_group(now_s, dirty.pop(), timers)
            else:
                ids: list[Any] = sorted(dirty)
                dirty.clear()
                for gid in ids:
                    self._plan_group(now_s, gid, timers)
        if self.network.version != self._network_version:
            self._network_version = self.network.version
            nxt = self.network.next_finish_s()
            if nxt is not None:
                timers.append((max(nxt, now_s), Kind.TRANSFER, self.network.version))
        return timers

    def _plan_group(self, now_s: float, gid: int, timers: list[Timer]) -> None:
        """Admissions, a span or a cut on the group ``gid``, with their timers into ``timers``."""
        g = self.groups[gid]
        log = self.decisions   # the log itself: compiled, its bound .add would be a slow Python call
        if g.draining_to is not None and g.drained():
            self._take_role(now_s, g)
        if g.decode_queue:
            for rs in g.admit_decode():
                if rs.prefill_group == gid:
                    self._local_handoff(now_s, rs, g)
                else:
                    self._start_transfer(now_s, rs, gid, timers)
        if g.span is None:
            span = g.plan(now_s)
            if span is not None:
                dur = span.end_s - span.start_s
                if span.kind is SpanKind.PREFILL:
                    log.add(now_s, D.PREFILL, gid, NO_ID, len(span.batch), span.new_tokens, span.cached_tokens, dur)
                    _log_span_ids(log, span.batch)
                elif span.kind is SpanKind.DECODE:
                    log.add(now_s, D.DECODE, gid, NO_ID, span.batch_size, span.steps, dur)
                    if span.batch:                     # the requests joining the batch
                        _log_span_ids(log, span.batch)
                else:
                    log.add(now_s, D.CHUNK, gid, NO_ID, span.batch_size, len(span.chunks), span.new_tokens, dur)
                    _log_span_ids(log, [c[0] for c in span.chunks])
                timers.append((span.end_s, Kind.SPAN_END, span))
                if self.hooks is not None:
                    self.hooks.span_planned(now_s, gid, span)
                if span.fetches:
                    self._log_fetches(now_s, gid, span)
        elif g.wants_interrupt() and g.cut(now_s):
            span = g.span
            log.add(now_s, D.CUT, gid, NO_ID, span.steps, span.end_s)
            timers.append((span.end_s, Kind.SPAN_END, span))
            if self.hooks is not None:
                self.hooks.span_cut(now_s, gid, span)
        g.account_kv(now_s)

    # --- internals --------------------------------------------------------------------------
    def _mark_dirty(self, group_id: int) -> None:
        """``group_id`` changed: the next :meth:`plan` looks at it."""
        self._dirty.add(self._boxed_ids[group_id])

    def _info(self, rs: RequestState) -> RequestInfo:
        r = rs.request
        return RequestInfo(rs.request_id, r.arrival_s, rs.prefill_tokens, rs.predicted_output,
                           r.prefix_hashes, r.prefix_block_tokens, rs.prefill_group, rs.generated)

    def _place(self, now_s: float, rs: RequestState) -> None:
        if rs.cancelled:                    # its client gave up while it was being resumed
            self._end_cancelled(now_s, rs, None)
            return
        if self._failed and not self.fleet.num_prefill:
            self._reject(now_s, rs, "no live group can prefill (failed: "
                         + ", ".join(self.groups[i].name for i in sorted(self._failed)) + ")", R.NO_LIVE_GROUP)
            return
        try:   # typed object: compiled code would otherwise cast a bad return inside this try
            decision: object = self.policy.place(self._info(rs), self._seen, now_s)
        except UserError:
            raise
        except Exception as exc:
            raise PolicyFailed.raised(self.policy, "place", exc) from exc
        if isinstance(decision, Reject):
            self._reject(now_s, rs, decision.reason, decision.code)
            return
        if not isinstance(decision, Placement):
            raise PolicyFailed.returned(self.policy, "place", decision, "a Placement or a Reject")
        prefill: object = decision.prefill_group        # untyped: a bad field is the policy's error
        decode: object = decision.decode_group
        if not _is_group_id(prefill) or not (decode is None or _is_group_id(decode)):
            raise PolicyFailed.returned(self.policy, "place", decision, "a Placement of group ids (int)")
        prefill_id: int = cast(int, prefill)
        decode_id: Optional[int] = cast(Optional[int], decode)
        check = self._check(prefill_id, decode_id, rs)
        if check is not None:
            self._reject(now_s, rs, check[1], check[0])
            return
        g = self.groups[prefill_id]
        rs.decode_group = decode_id
        if decode_id is not None and not g.colocated:
            g.local_decodes = True          # a fallback may have placed it to decode here too
        rs.staged = None
        if self.store is None or not self._read_from_store(now_s, rs, g):
            g.enqueue_prefill(rs, front=rs.preemptions > 0)
        self.fleet.placed(g.group_id, rs.prefill_tokens)
        self.decisions.add(now_s, D.PLACE, g.group_id, rs.request_id, math.nan if decode_id is None else decode_id)
        if self.hooks is not None:
            self.hooks.request_placed(now_s, rs, g.group_id)
        self._mark_dirty(g.group_id)

    def _check(self, prefill: int, decode: Optional[int], rs: RequestState) -> Optional[tuple[str, str]]:
        """Capacity check of a policy's placement (the policy decides, the scheduler verifies):
        ``(code, reason)`` if it cannot stand."""
        groups = self.groups
        n = len(groups)
        # a group serving a request end to end (a heterogeneous fallback) may take either role
        local = decode == prefill
        if not 0 <= prefill < n or not self._serves(groups[prefill].can_prefill, local, groups[prefill]):
            return (R.POLICY, f"policy chose group {prefill}, which cannot prefill")
        g = groups[prefill]
        need = rs.context_tokens + 1
        if not g.fits_ever(rs.decode_need_tokens if g.colocated or local else need):
            return (R.KV_CAPACITY, f"prompt of {rs.prefill_tokens} tokens exceeds the KV capacity of group {g.name}")
        if decode is not None:
            if not 0 <= decode < n or not self._serves(groups[decode].can_decode, local, groups[decode]):
                return (R.POLICY, f"policy chose group {decode}, which cannot decode")
            if not groups[decode].fits_ever(rs.decode_need_tokens):
                return (R.KV_CAPACITY, f"prompt of {rs.prefill_tokens} tokens exceeds the KV capacity of group "
                                       f"{groups[decode].name}")
        return None

    @staticmethod
    def _serves(role_allows: bool, local: bool, g: GroupState) -> bool:
        """Whether ``g`` may take a request: its role allows it, or it keeps the request (fallback)."""
        return g.alive and (role_allows or (local and g.draining_to is None))

    def _apply(self, now_s: float, g: GroupState, out: SpanOutcome) -> None:
        hooks = self.hooks
        if hooks is not None:
            for rs in out.completed:
                hooks.request_left(now_s, g.group_id, rs, "completed")
            for rs in out.preempted:
                hooks.request_left(now_s, g.group_id, rs, "preempted")
            for rs in out.failed:
                hooks.request_left(now_s, g.group_id, rs, "failed")
        for rs in out.cancelled:
            if hooks is not None:
                hooks.request_left(now_s, g.group_id, rs, "cancelled")
            self._end_cancelled(now_s, rs, g.group_id)
        for rs in out.prefilled:
            rs.prefilled_s = now_s
            if self.store is not None:
                self._write_to_store(now_s, rs, g)
            if rs.cancelled:                # its client gave up during the prefill
                if hooks is not None:
                    hooks.request_left(now_s, g.group_id, rs, "cancelled")
                g.release_decode_kv(rs)
                g.release_prefill_kv(rs)
                self._end_cancelled(now_s, rs, g.group_id)
            elif rs.generated >= rs.output_tokens:
                if hooks is not None:
                    hooks.request_left(now_s, g.group_id, rs, "completed")
                g.release_decode_kv(rs)         # decoding here: its reservation; else: none
                g.release_prefill_kv(rs)
                self._complete(now_s, rs, g.group_id)
            elif (g.colocated or g.local_decodes) and rs.decode_group == g.group_id and rs.decode_blocks:
                g.decode_here(rs)               # colocated, or a fallback placement
            else:
                self._route_decode(now_s, rs, g)
        for rs in out.completed:
            self._complete(now_s, rs, g.group_id)
        for rs in out.preempted:
            self.decisions.add(now_s, D.PREEMPT, g.group_id, rs.request_id, rs.generated)
            if g.role is Role.BOTH:
                if not g.fits_ever(rs.decode_need_tokens):      # grown past what it could ever decode on
                    out.failed.append(rs)
                    continue
                g.enqueue_prefill(rs, front=True)
            else:
                rs.decode_group = None
                self._place(now_s, rs)
        for rs in out.failed:
            self._reject(now_s, rs, f"KV of {rs.context_tokens} tokens outgrew group {g.name}", R.KV_CAPACITY)

    def _route_decode(self, now_s: float, rs: RequestState, src: GroupState) -> None:
        target = rs.decode_group
        if target is not None and not self.groups[target].alive:
            target = rs.decode_group = None                    # chosen at placement, failed since
        if target is None and self._failed and not self.fleet.num_decode \
                and not src.can_decode:
            src.release_prefill_kv(rs)
            self._reject(now_s, rs, "no live group can decode (failed: "
                         + ", ".join(self.groups[i].name for i in sorted(self._failed)) + ")", R.NO_LIVE_GROUP)
            return
        if target is None:
            try:
                choice: object = self.policy.place_decode(self._info(rs), self._seen, now_s)
            except UserError:
                raise
            except Exception as exc:
                raise PolicyFailed.raised(self.policy, "place_decode", exc) from exc
            if isinstance(choice, Reject):
                src.release_prefill_kv(rs)
                self._reject(now_s, rs, choice.reason, choice.code)
                return
            if not _is_group_id(choice) or not 0 <= cast(int, choice) < len(self.groups):
                raise PolicyFailed.returned(self.policy, "place_decode", choice,
                                            f"a group id (0..{len(self.groups) - 1}) or a Reject")
            target = cast(int, choice)
        dst = self.groups[target]
        if not self._serves(dst.can_decode, target == src.group_id, dst):
            src.release_prefill_kv(rs)
            self._reject(now_s, rs, f"policy chose group {dst.name}, which cannot decode", R.POLICY)
            return
        if not dst.fits_ever(rs.context_tokens + 1):
            src.release_prefill_kv(rs)
            self._reject(now_s, rs, f"decode group {dst.name} cannot hold {rs.context_tokens} tokens", R.KV_CAPACITY)
            return
        dst.enqueue_decode(rs)
        self.fleet.routed_decode(target, 1)
        self._mark_dirty(target)

    def _start_transfer(self, now_s: float, rs: RequestState, dst_id: int, timers: list[Timer],
                        admitted: bool = True) -> None:
        src_id = rs.prefill_group
        assert src_id is not None
        src = self.groups[src_id]
        tid = self._next_transfer_id
        self._next_transfer_id += 1
        rs.transfer_id = tid
        nbytes = rs.context_tokens * src.cost.transfer_bytes_per_token
        net_bytes = float(nbytes)
        delay = src.cost.message_cost_s
        lw = self.layerwise
        if lw is not None and rs.prefilled_s == now_s:
            # the decode side was ready when the prefill ended, so the stream ran during it
            dst = self.groups[dst_id]
            msg = src.cost.message_cost_s if lw.layer_message_s is None else lw.layer_message_s
            rate = min(src.cost.egress_bytes_per_s, dst.cost.ingress_bytes_per_s)
            net_bytes, extra = layerwise_tail(net_bytes, rs.prefill_s, lw.num_layers, rate, msg)
            delay = msg + extra
        self._transfers[tid] = (rs, src_id, dst_id, delay)
        if admitted:
            self.decisions.add(now_s, D.ADMIT, dst_id, rs.request_id, rs.decode_blocks)
        self.decisions.add(now_s, D.TRANSFER, src_id, rs.request_id, dst_id, nbytes)
        if self.hooks is not None:
            self.hooks.transfer_started(now_s, tid, rs, src_id, dst_id, nbytes)
        timers.extend(self._arrivals(now_s, self.network.start(now_s, tid, src_id, dst_id, net_bytes)))

    def _local_handoff(self, now_s: float, rs: RequestState, g: GroupState) -> None:
        """A fallback decode where the prefill ran: the KV is already here, nothing moves."""
        self.decisions.add(now_s, D.ADMIT, g.group_id, rs.request_id, rs.decode_blocks)
        g.kv_arrived(rs)
        self.decisions.add(now_s, D.KV_ARRIVED, g.group_id, rs.request_id)

    def _arrivals(self, now_s: float, done: list[int]) -> list[Timer]:
        out = []
        for tid in done:
            delay = self._transfers[tid][3] if tid >= 0 else self._store_message_s()
            out.append((now_s + delay, Kind.KV_ARRIVAL, tid))
        return out

    # --- KV tiers and the cluster KV store ------------------------------------------------------
    def _store_message_s(self) -> float:
        store = self.store
        assert store is not None
        return store.message_s

    def _log_fetches(self, now_s: float, gid: int, span: Span) -> None:
        """Reads from a group's lower tiers that a planned prefill span starts with."""
        hooks = self.hooks
        for index, tier, start, end in fetch_windows(now_s, list(enumerate(p for _, p in span.fetches))):
            rs, plan = span.fetches[index]
            self.decisions.add(now_s, D.FETCH, gid, rs.request_id, tier, plan.tier_tokens[tier],
                               plan.tier_bytes[tier], end - start)
            if hooks is not None:
                hooks.kv_fetched(now_s, rs, gid, tier, start, end, plan.tier_bytes[tier], plan.tier_tokens[tier])

    def _read_from_store(self, now_s: float, rs: RequestState, g: GroupState) -> bool:
        """Fetch ``rs``'s prefix blocks from the cluster store into ``g`` if that is cheaper than
        recomputing them (the core's plan); True if a fetch started (``rs`` waits for it)."""
        planner = self._planners[g.group_id]
        store = self.store
        r = rs.request
        if planner is None or store is None or not r.prefix_hashes:
            return False
        plan = planner.plan(r.prefix_hashes, r.prefix_block_tokens, r.prompt_tokens, rs.prefill_tokens)
        if plan.tier_bytes[STORE] <= 0:
            return False
        hashes = planner.from_store(r.prefix_hashes, plan)
        tid, done = store.read(now_s, rs, g.group_id, hashes, self.network)
        g.await_fetch(rs)
        self.decisions.add(now_s, D.FETCH, g.group_id, rs.request_id, STORE, plan.tier_tokens[STORE],
                           len(hashes) * store.block_bytes, plan.tier_s[STORE])
        if self.hooks is not None:
            self.hooks.store_read_started(now_s, tid, rs, g.group_id, hashes)
        self._timers.extend(self._arrivals(now_s, done))
        return True

    def _write_to_store(self, now_s: float, rs: RequestState, g: GroupState) -> None:
        """``rs``'s prefill ended on ``g``: write its prompt's full blocks the store lacks to it."""
        store = self.store
        r = rs.request
        if store is None or not r.prefix_hashes or g.memory.tiers is None:
            return
        block = r.prefix_block_tokens
        full = r.prefix_hashes[:r.prompt_tokens // block]
        if not full:
            return
        store.sized(block)
        started = store.write(now_s, g.group_id, full, self.network)
        if started is None:
            return
        tid, new, done = started
        self.decisions.add(now_s, D.STORE_WRITE, g.group_id, rs.request_id, len(new), len(new) * store.block_bytes)
        if self.hooks is not None:
            self.hooks.store_write_started(now_s, tid, g.group_id, rs.request_id, new)
        self._timers.extend(self._arrivals(now_s, done))

    def _store_landed(self, now_s: float, tid: int) -> None:
        """A store read landed (its request joins the prefill queue) or a write did (readable now)."""
        store = self.store
        assert store is not None
        flow, evicted = store.landed(now_s, tid)
        if evicted and self.hooks is not None:
            self.hooks.store_evicted(now_s, evicted)
        if flow is None or flow.request is None:
            return
        rs = flow.request
        if rs.cancelled:                    # its client gave up while the prefix was on its way
            return
        g = self.groups[flow.group_id]
        g.fetch_landed(rs, frozenset(flow.hashes))
        self._mark_dirty(g.group_id)
        if self.hooks is not None:
            tokens = min(len(flow.hashes) * store.block_tokens, rs.prefill_tokens - 1)
            self.hooks.kv_fetched(now_s, rs, g.group_id, STORE, flow.start_s, now_s, flow.num_bytes, tokens)

    def _rebalance(self, now_s: float) -> None:
        """Start the role switches the policy asks for, keeping both roles served meanwhile."""
        try:
            switches: list[object] = list(self.policy.rebalance(self._seen, now_s))
        except UserError:
            raise
        except Exception as exc:
            raise PolicyFailed.raised(self.policy, "rebalance", exc) from exc
        for switch in switches:
            if not isinstance(switch, RoleSwitch):
                raise PolicyFailed.returned(self.policy, "rebalance", switch, "RoleSwitch items")
            if not 0 <= switch.group_id < len(self.groups):
                continue
            g = self.groups[switch.group_id]
            role = Role(switch.role)
            if g.draining_to is not None or role is g.role:
                continue
            # another group must keep each role meanwhile (a draining or failed one has neither)
            if self.fleet.num_prefill - g.can_prefill < 1 or self.fleet.num_decode - g.can_decode < 1:
                continue
            g.start_drain(role, now_s)
            self.fleet.set_roles(g.group_id, False, False)
            self.decisions.add(now_s, D.DRAIN, g.group_id, NO_ID, role.code)
            self._mark_dirty(g.group_id)

    def _take_role(self, now_s: float, g: GroupState) -> None:
        drain_s = now_s - g.drain_start_s
        g.take_role()
        self.fleet.set_roles(g.group_id, g.can_prefill, g.can_decode, g.role)
        self.decisions.add(now_s, D.ROLE, g.group_id, NO_ID, g.role.code, drain_s)

    def _complete(self, now_s: float, rs: RequestState, group_id: Optional[int]) -> None:
        rs.phase = Phase.COMPLETED
        # its last token's time as its device reported it (a live report reaches the core later)
        rs.finish_s = rs.last_token_s if rs.last_token_s > 0 else now_s
        self.decisions.add(now_s, D.COMPLETE, log_id(group_id), rs.request_id)
        self._record(rs, "completed")
        if self.hooks is not None:
            self.hooks.request_finished(now_s, rs)

    def _end_cancelled(self, now_s: float, rs: RequestState, group_id: Optional[int]) -> None:
        rs.phase = Phase.CANCELLED
        rs.reject_reason = "cancelled by the client"
        rs.reject_code = R.CANCELLED
        rs.finish_s = now_s
        self.decisions.add(now_s, D.CANCEL, log_id(group_id), rs.request_id)
        self._record(rs, "cancelled")
        if self.hooks is not None:
            self.hooks.request_finished(now_s, rs)

    def _reject(self, now_s: float, rs: RequestState, reason: str, code: str) -> None:
        rs.phase = Phase.REJECTED
        rs.reject_reason = reason
        rs.reject_code = code
        rs.finish_s = now_s
        self.decisions.add_reject(now_s, rs.request_id, reason)
        self._record(rs, "rejected")
        if self.hooks is not None:
            self.hooks.request_finished(now_s, rs)

    def _record(self, rs: RequestState, status: str) -> None:
        r = rs.request
        self.records.append((
            rs.request_id, r.arrival_s, r.prompt_tokens, r.output_tokens, rs.predicted_output,
            rs.cached_tokens, status, rs.reject_reason, rs.prefill_group, rs.decode_group,
            rs.token1_s, rs.token2_s, rs.finish_s, rs.max_gap_s, rs.preemptions, rs.generated, rs.reject_code,
        ))
        self.num_active -= 1
        del self._active[rs.request_id]

    def _report(self, g: GroupState, now_s: float) -> None:
        self.fleet.report(g.group_id, now_s, g.kv.num_free, g.num_pending_prefill, g.pending_prefill_tokens,
                          len(g.decode_queue), g.num_decoding)
