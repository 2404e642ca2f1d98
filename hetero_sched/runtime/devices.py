"""The engine's devices on Ray: each group's ``DeviceGroupActor`` runs its spans and reports.

The engine (``engine/loop.py``) hands every planned span — and every cut of a running one —
to :meth:`RayDevices.dispatch`, which sends it to the group's actor at once. The actor runs
the span on its own clock and answers with a report; :meth:`RayDevices.wait`, called before
the engine takes its next event, turns answers into ``SPAN_END`` events:

- **virtual clock**: an actor answers a span at once with its timeline on the device's clock
  (provisional: a cut answers with the revised one). ``wait`` collects an answer only before
  the engine's next event could come after the span's end: each device says how fast it can be
  at most (:meth:`DeviceGroupActor.pace_bounds`), which gives every span an earliest end
  (:func:`~hetero_sched.engine.pacing.earliest_end`), and until then the engine runs on while
  the devices answer — a conservative lookahead, as in parallel discrete-event simulation. A
  report takes the place in the event order its span took when dispatched, so the run is the
  simulator's, but through what the devices said (a report earlier than promised fails the run).
  A device whose promise is exact (no jitter, no short steps; modeled tokens, no KV store)
  needs no answer to move on: its report is its promise, queued at once as the simulator's
  virtual devices do, and its spans, cuts and KV steps go out ``BATCH_ITEMS`` at a time in one
  ``run_batch`` call; each answer is checked against its promise when it comes in, and one that
  differs fails the run;
- **wall clock**: an actor answers when the span has really ended; ``wait`` sleeps until the
  next timer is due *or* a report comes in, and a report becomes an event *now*. A span whose
  report is ``call_timeout_s`` past its expected end is stuck: its actor is restarted.

KV moves as the core decides (these are the core's ``ExecutorHooks``): a prefill exports the
KV of requests that will decode elsewhere as it ends (one bundle per span); when the core
starts a transfer, the bundle's ref goes to the destination actor with an ``import`` at once,
and the KV may be decoded from only when both the modeled transfer has finished and the
destination reported it imported intact (:meth:`RayDevices.kv_ready`). ObjectRefs travel as
call arguments; msgpack carries the rest.

With a cluster KV store (``runtime/store.py``): a write the core starts makes the prefill group's
actor export those prefix blocks, whose bundle goes on to the store actors (each keeps its
blocks as objects it owns); a read the core starts asks the store actors for the blocks' refs and
hands them to the reading group's actor with an ``import_blocks`` before its prefill. A read
waits until the writes of its blocks have reached the store.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait as wait_futures
from dataclasses import dataclass, field
from typing import Any, Optional

import ray

from hetero_sched.core.events import EventQueue, Kind
from hetero_sched.core.request import Phase, RequestState
from hetero_sched.core.spans import Span, SpanKind, SpanReport, decode_span_duration
from hetero_sched.engine.devices import Devices
from hetero_sched.engine.pacing import Timeline, earliest_end, span_report
from hetero_sched.errors import RunFailed
from hetero_sched.runtime.clock import WallClock
from hetero_sched.runtime.inbox import Cancel, Inbox
from hetero_sched.runtime.messages import pack, unpack
from hetero_sched.runtime.recovery import RunJournal
from hetero_sched.runtime.store import shard


def ask_all(actors: list[Any], method: str, timeout_s: float, *args: Any) -> list[Any]:
    """Call ``method`` on every actor and return the answers, asking again any actor that is
    restarting (Ray is bringing it back) until ``timeout_s``; a dead actor raises."""
    deadline = time.monotonic() + timeout_s
    answers: list[Any] = [None] * len(actors)
    todo = list(range(len(actors)))
    while todo:
        futs = [getattr(actors[i], method).remote(*args) for i in todo]
        again = []
        for i, fut in zip(todo, futs):
            try:
                answers[i] = ray.get(fut, timeout=max(0.1, deadline - time.monotonic()))
            except ray.exceptions.ActorUnavailableError:
                if time.monotonic() >= deadline:
                    raise
                again.append(i)
        if again:
            time.sleep(0.2)
        todo = again
    return answers


@dataclass(eq=False)
class _Outbox:
    """What one actor will be asked to do at the next send: KV operations (one ``step``) and, for
    a device that runs on its promise, the spans and cuts between them (one ``batch``)."""

    group_id: int
    ops: list[dict[str, Any]] = field(default_factory=list)
    refs: list[Any] = field(default_factory=list)
    """KV bundles the import ops read: ObjectRefs, or the outbox of a batch not sent yet (its
    exports' bundle, once it is)."""
    imports: dict[int, int] = field(default_factory=dict)       # request id -> transfer id of its import
    exports: list[int] = field(default_factory=list)            # transfer ids of export ops, in order
    block_puts: list[tuple[int, tuple[int, ...]]] = field(default_factory=list)   # store writes' (flow, blocks)
    items: list[bytes] = field(default_factory=list)
    """Batch: the packed span, cut and step messages, in order."""
    promised: list["_Promise"] = field(default_factory=list)
    """Batch: per item, what its report must say."""
    num_exports: int = 0
    """Batch: KV batches its items export so far (an export's index in the bundle)."""
    bundle: Optional[ray.ObjectRef] = None
    """Batch, once sent: every KV batch it exported, as one bundle (the call's second return)."""

    def waits(self) -> bool:
        """Whether an import here reads a batch not sent yet."""
        return any(isinstance(r, _Outbox) and r.bundle is None for r in self.refs)


@dataclass
class _Promise:
    """A batch item's expected answer: a span's (or a cut's) times on the device's clock, or,
    for a step, the step's outbox (its imports' verdicts are applied as for a ``step`` call)."""

    span: Optional[Span] = None
    times: Optional[dict[str, float]] = None
    step: Optional[_Outbox] = None


@dataclass
class _Call:
    """A call in flight: what it was, so its answer (or its actor's death) can be applied."""

    group_id: int
    kind: str                          # "span" | "cut" | "step" | "batch" | "store" (a store actor's put)
    span: Optional[Span] = None
    cuts: int = 0
    box: Optional[_Outbox] = None
    future: Optional["Future[Any]"] = None
    """Wall clock: done when the answer is in (what the engine's wait sleeps on)."""
    flow: int = 0                      # store: the write it carries
    seq: int = 0
    """Virtual clock: the place in the event order its report takes (reserved at dispatch)."""
    earliest_s: float = math.inf
    """Virtual clock: the earliest its answer can end a span (inf: it ends none)."""



@dataclass
class DeviceStats:
    """What the devices did, for the run summary and the benchmarks."""

    actor_calls: int = 0
    span_reports: int = 0
    events_ahead: int = 0
    """Virtual clock: events the engine took while devices' answers were still out (0 if it
    waited for every answer before time moved on)."""
    transfers: int = 0
    bytes_moved: int = 0
    import_s: float = 0.0
    min_margin: Optional[float] = None
    report_delay_s: list[float] = field(default_factory=list)
    """Wall clock: how long after a span's reported end its report was applied."""
    dispatch_delay_s: list[float] = field(default_factory=list)
    """Wall clock: how long after the core planned a span (uncut) its device started it."""
    pace: dict[int, list[float]] = field(default_factory=dict)
    """Per group: each span's reported duration over the cost model's for the steps it reported
    (1.0: the device runs as modeled; 2.0: at half the speed)."""
    kv_damaged: int = 0
    """Imports whose KV failed its checksum (or was lost) and were sent again."""
    import_wait_s: list[float] = field(default_factory=list)
    """Per KV import call: from sent to answered (fetching the bytes, checking them, the turn)."""
    fetch_s: list[float] = field(default_factory=list)
    queued_s: list[float] = field(default_factory=list)
    unverified_bad: int = 0
    """Imports that failed their check after the modeled link had landed them (verify_imports off)."""
    stuck: int = 0
    """Actors killed (and restarted) because a report missed its deadline."""
    store_put_bytes: int = 0
    """Prefix-block bytes the KV store actors took in (after verifying them)."""
    store_read_bytes: int = 0
    """Prefix-block bytes group actors read from the KV store (verified, into their prefix caches)."""
    store_puts: int = 0
    store_reads: int = 0


class RayDevices(Devices):
    """The engine's ``Devices`` and the core's ``ExecutorHooks``, over one actor per group."""

    def __init__(self, actors: list[Any], *, wall: Optional[WallClock], real_tokens: bool,
                 verify_imports: bool = True, journal: Optional[RunJournal] = None,
                 call_timeout_s: float = 120.0, inbox: Optional[Inbox] = None,
                 progress: bool = False, store_actors: Optional[list[Any]] = None) -> None:
        """``wall``: the run's wall clock (None: virtual time). ``real_tokens``: the backend makes
        tokens (numpy), kept per request for the result and for prefilling again.
        ``verify_imports``: KV may be decoded from only once its destination reported it imported
        intact (always with real tokens). Without it — the modeled backend, whose decode reads no
        KV — the modeled link's time alone says when KV lands: the scaled bytes still move and are
        checked, but the laptop's object store (milliseconds per fetch) is not the modeled link.
        ``inbox``: requests and cancellations arriving while the run goes (serving, wall clock);
        the run then lasts until the inbox is closed. ``progress``: tell each span's device which
        requests are running, so it can report their tokens step by step (serving streams them).
        ``call_timeout_s``: a report this late past its span's expected end (or any answer
        this late) means the actor is stuck: it is killed and restarted like a crashed one."""
        self.actors = actors
        self.store_actors = store_actors or []
        """The cluster KV store's actors (block ``h`` on ``h % n``); none without a store."""
        self._put_pending: dict[int, int] = {}   # block -> the write (flow id) not yet in its store actor
        self.wall = wall
        self.real_tokens = real_tokens
        self.inbox = inbox
        self.progress = progress
        self.verify_imports = verify_imports or real_tokens
        self.journal = journal
        self.call_timeout_s = call_timeout_s
        self.scheduler: Any = None
        """The core: told of deaths (``fail_group``), returns (``restore_group``), bad KV."""
        self.tokens: dict[int, list[int]] = {}
        self.stats = DeviceStats()
        self.failures: list[tuple[float, int, bool]] = []
        """(time, group, restarted) for every actor death seen; ``restarted`` turns True when the
        group is back in service (a group whose actor never returns stays False)."""
        self._incarnations: list[int] = ask_all(actors, "incarnation_id", call_timeout_s)
        self._bounds: list[tuple[float, float, int]] = [tuple(b) for b in ask_all(actors, "pace_bounds", call_timeout_s)]
        """Per group: the device's least and most seconds per modeled second, steps it may stop short."""
        self._promised = [wall is None and not real_tokens and not self.store_actors and lo == hi
                          and math.isfinite(lo) and not short for lo, hi, short in self._bounds]
        """Per group: its device promises its pace exactly (virtual clock, modeled tokens, no KV
        store) — its reports are known when its spans are sent, so they go out in batches
        (:meth:`_promise`). Real tokens are needed as they are made (a request prefilled again
        carries them), and a store's reads wait for its writes: those run call by call."""
        self._reap = False                    # a batch went out since its answers were last taken
        self._timelines: dict[int, tuple[Span, Timeline]] = {}
        """Promised groups: the span each device runs and its timeline, for the cuts that follow."""
        self._seqs = [0] * len(actors)
        self._calls: dict[ray.ObjectRef, _Call] = {}
        self._outbox: dict[int, _Outbox] = {}
        self._exported: dict[int, tuple[Any, int]] = {}   # request -> its prefill's export (a ref, or a batch's outbox)
        self._transfers: dict[int, tuple[int, int, int]] = {}       # transfer -> (request, src, dst)
        self._refs: dict[int, tuple[Any, int]] = {}        # transfer -> (KV bundle or a batch's outbox, index)
        self._verdicts: dict[int, bool] = {}                         # transfer -> imported intact
        self._awaiting: set[int] = set()      # transfers done on the network, waiting for their import
        self._dead: set[int] = set()
        self._killed: set[int] = set()        # stuck actors killed, their death not seen yet
        self._restarting: dict[int, ray.ObjectRef] = {}
        self._now = 0.0
        self._changed: Optional[float] = None
        self._queue = EventQueue()
        """The engine's event queue (reports become its events); set by :meth:`wait`."""

    # --- engine: Devices ---------------------------------------------------------------------
    def dispatch(self, now_s: float, span: Span, queue: EventQueue) -> None:
        gid = span.group_id
        self._now = now_s
        if self._promised[gid]:
            self._promise(now_s, span, queue)
            return
        actor = self.actors[gid]
        self._send(gid)                        # its KV operations go first: the span may need them
        if span.cuts == 0:
            # in order after the KV operations sent before it — unless nothing it does depends on
            # them (wall clock, modeled KV): then a span never waits behind a slow KV fetch
            ordered = self.wall is None or self.verify_imports
            ref = actor.run_span.remote(pack("span", span=self._span_message(span), expect=self._incarnations[gid],
                                             seq=self._next_seq(gid) if ordered else -1))
            call = _Call(gid, "span", span, 0, future=self._future(ref))
            if self.wall is None:
                call.seq, call.earliest_s = queue.reserve(), earliest_end(span, *self._bounds[gid])
            self._calls[ref] = call
        elif self.wall is None:        # virtual: in order; the answer is the revised timeline
            ref = actor.cut.remote(pack("cut", span_id=span.span_id, at_s=float(now_s),
                                        expect=self._incarnations[gid], seq=self._next_seq(gid)))
            self._calls[ref] = _Call(gid, "cut", span, span.cuts, seq=queue.reserve(),
                                     earliest_s=earliest_end(span, *self._bounds[gid], cut_at_s=now_s))
        else:                          # wall: at once, past whatever the actor is doing
            actor.cut.remote(pack("cut", span_id=span.span_id, at_s=float(now_s),
                                  expect=self._incarnations[gid], seq=-1))
        self.stats.actor_calls += 1

    def _promise(self, now_s: float, span: Span, queue: EventQueue) -> None:
        """A span (or a cut) for a device that promised its pace exactly: its report is known
        now — the span's timeline on the device's clock — so its end is queued at once, as the
        simulator's virtual devices do, and the span joins the actor's next batch; the report
        that comes back must be the promised one to the bit, or the run fails (:meth:`_kept`).
        One Ray call per span costs more than a span: on this clock nothing waits for it."""
        gid = span.group_id
        box = self._box(gid)
        self._close_step(box)
        if span.cuts == 0:
            timeline = Timeline.of_span(span, span.start_s, self._bounds[gid][0])
            self._timelines[gid] = (span, timeline)
            message = self._span_message(span)
            for item in message["requests"]:
                if item["export"]:              # the device exports it as the span ends: the batch's bundle
                    self._exported[item["id"]] = (box, box.num_exports)
                    box.num_exports += 1
            box.items.append(pack("span", span=message, expect=self._incarnations[gid], seq=self._next_seq(gid)))
        else:
            running = self._timelines[gid]
            assert running[0] is span, "a cut of a span its device is not running"
            timeline = running[1]
            timeline.steps = min(timeline.steps, timeline.stop_at(now_s))
            box.items.append(pack("cut", span_id=span.span_id, at_s=float(now_s),
                                  expect=self._incarnations[gid], seq=self._next_seq(gid)))
        times = timeline.report(timeline.steps)
        box.promised.append(_Promise(span=span, times=times))
        queue.push(times["end_s"], Kind.SPAN_END, (span, span.cuts, {**times, "tokens": {}, "margins": {}, "exports": []}, []))

    def _close_step(self, box: _Outbox) -> None:
        """A batch's KV operations so far become one step item (the spans after them may need them)."""
        if not box.ops:
            return
        box.items.append(pack("step", ops=box.ops, expect=self._incarnations[box.group_id],
                              seq=self._next_seq(box.group_id)))
        step = _Outbox(box.group_id, imports=box.imports)
        box.promised.append(_Promise(step=step))
        box.ops, box.imports = [], {}

    def _kept(self, gid: int, promise: _Promise, msg: dict[str, Any]) -> None:
        """A promised device's report of a span (or a cut) is what it promised, else the run fails."""
        assert promise.span is not None and promise.times is not None
        want = promise.times
        if (msg["start_s"], msg["end_s"], msg["steps"]) != (want["start_s"], want["end_s"], want["steps"]):
            when = "before the earliest" if msg["end_s"] < want["end_s"] else "not when"
            raise RunFailed(f"device-group actor {gid} reported span {promise.span.span_id} ending at {msg['end_s']:.9f} s "
                            f"after {msg['steps']} step(s), {when} its pace allows ({want['end_s']:.9f} s after "
                            f"{want['steps']}; it promised its pace exactly)")

    def report(self, now_s: float, payload: Any) -> Optional[SpanReport]:
        span, cuts, msg, refs = payload
        gid = span.group_id
        if (cuts is not None and cuts != span.cuts) or self.scheduler.groups[gid].span is not span:
            return None                           # superseded by a cut, or its device died since
        self._now = now_s
        for rid, toks in msg["tokens"].items():
            rid = int(rid)
            self.tokens.setdefault(rid, []).extend(toks)
            if self.journal is not None:
                self.journal.delivered(now_s, rid, toks)
        for margin in msg["margins"].values():
            if self.stats.min_margin is None or margin < self.stats.min_margin:
                self.stats.min_margin = margin
        for index, rid in enumerate(msg["exports"]):
            self._exported[int(rid)] = (refs[0], index)
        self.stats.span_reports += 1
        modeled = (decode_span_duration(span.line, span.context0, span.batch_size, int(msg["steps"]))
                   if span.kind is SpanKind.DECODE else span.duration_s)
        if modeled > 0:
            self.stats.pace.setdefault(gid, []).append((msg["end_s"] - msg["start_s"]) / modeled)
        if self.wall is not None:
            self.stats.report_delay_s.append(now_s - msg["end_s"])
            if span.cuts == 0:
                self.stats.dispatch_delay_s.append(msg["start_s"] - span.start_s)
        return span_report(span, msg)

    def wait(self, queue: EventQueue) -> Optional[float]:
        """Bring in the answers the next event may depend on; returns the time the core changed
        at if an actor's death was applied meanwhile (the engine plans then), else None."""
        self._changed = None
        self._queue = queue
        if self.wall is None:
            while True:
                next_s = queue.peek_time()
                self._send(min_ops=0 if next_s is None else self.LAZY_OPS)
                if self._reap:
                    self._take_batches()
                    if self._changed is not None:
                        return self._changed
                due = self._answers_due(next_s)
                if not due:
                    self.stats.events_ahead += 1 if self._calls or self._outbox else 0
                    return self._changed
                self._collect(due, timeout_s=self.call_timeout_s)
                if self._changed is not None:
                    return self._changed
        while True:
            if self.inbox is not None and self._take_inbox():
                break                                   # requests came in, or a client gave up
            if not (self._calls or self._outbox or (self.inbox is not None and not self.inbox.closed)):
                break
            self._send()
            next_s = queue.peek_time()
            if next_s is not None and self._due(next_s):
                break
            futures = [c.future for c in self._calls.values() if c.future is not None]
            if self.inbox is not None:
                futures.append(self.inbox.bell)
            wait_futures(futures, timeout=self._wall_timeout(next_s), return_when=FIRST_COMPLETED)
            ready = [ref for ref, c in self._calls.items() if c.future is not None and c.future.done()]
            if ready:
                if self._apply_answers(ready) or self._changed is not None:
                    break
            else:
                self._check_deadlines()
                if self._changed is not None:
                    break
        return self._changed

    def _take_inbox(self) -> bool:
        """Arrivals become events (at their arrival time); cancellations are applied now. True if
        anything came in."""
        assert self.inbox is not None and self.wall is not None
        items = self.inbox.take()
        for item in items:
            if isinstance(item, Cancel):
                now = self.wall.now()
                if self.scheduler.cancel(now, item.request_id):
                    self._changed = now
            else:
                self._queue.push(item.arrival_s, Kind.ARRIVAL, item)
        return bool(items)

    def kv_ready(self, now_s: float, transfer_id: int) -> bool:
        """True once the KV may be decoded from: imported intact, or cancelled (the core ignores
        it), or damaged (the core sends it again). Else the destination has not answered yet:
        virtual clock, wait for it; wall clock, the arrival is queued again when it answers."""
        self._now = now_s
        if transfer_id not in self._transfers:
            return True
        if not self.verify_imports:          # the modeled link says it landed; the bytes follow
            del self._transfers[transfer_id]
            return True
        while transfer_id not in self._verdicts and self.wall is None:
            if not self._calls and not self._outbox:
                raise RunFailed(f"KV of transfer {transfer_id} was never imported")
            self._send()
            self._collect(self._calls_list(), timeout_s=self.call_timeout_s)
            if transfer_id not in self._transfers:
                return True
        verdict = self._verdicts.pop(transfer_id, None)
        if verdict is None:
            self._awaiting.add(transfer_id)
            return False
        del self._transfers[transfer_id]
        if not verdict:
            self.stats.kv_damaged += 1
            self.scheduler.kv_damaged(now_s, transfer_id)
            if self.journal is not None:
                self.journal.faults(now_s, self.failures, self.stats.kv_damaged)
        return True

    def after_plan(self, now_s: float) -> bool:
        self._now = now_s
        if self.journal is not None:            # group commit: one write per plan
            self.journal.commit(now_s, self.scheduler.decisions, [g.busy_s for g in self.scheduler.groups])
        self._check_restarts()
        self._send(min_ops=0 if self.wall is not None else self.LAZY_OPS)
        return True                              # a restart may have changed the core: ask it

    # --- core: ExecutorHooks --------------------------------------------------------------------
    def request_placed(self, now_s: float, rs: RequestState, group_id: int) -> None:
        if self.journal is not None:
            self.journal.accepted(now_s, rs)

    def request_finished(self, now_s: float, rs: RequestState) -> None:
        if self.journal is not None:
            self.journal.finished(now_s, rs, self.scheduler.records[-1])
        if rs.phase is Phase.REJECTED and rs.prefill_group is not None:   # maybe prefilled first
            self._exported.pop(rs.request_id, None)
            self._forget(rs.prefill_group, rs.request_id)

    def span_planned(self, now_s: float, group_id: int, span: Span) -> None:
        return None

    def span_cut(self, now_s: float, group_id: int, span: Span) -> None:
        return None

    def span_applied(self, now_s: float, group_id: int, span: Span, report: SpanReport) -> None:
        return None

    def transfer_started(self, now_s: float, transfer_id: int, rs: RequestState, src: int, dst: int,
                         num_bytes: int) -> None:
        self._transfers[transfer_id] = (rs.request_id, src, dst)
        self.stats.transfers += 1
        exported = self._exported.pop(rs.request_id, None)
        if exported is not None:               # exported as its prefill ended: send it on now
            self._refs[transfer_id] = exported
            self._import(transfer_id)
            return
        box = self._box(src)                   # sent again (damaged) or from retained KV: export again
        box.ops.append({"op": "export", "id": rs.request_id, "true_bytes": int(num_bytes)})
        box.exports.append(transfer_id)

    def kv_landed(self, now_s: float, transfer_id: int, rs: RequestState, src: int, dst: int) -> None:
        self._forget(src, rs.request_id)

    def transfer_cancelled(self, now_s: float, transfer_id: int, rs: RequestState, src: int, dst: int) -> None:
        self._transfers.pop(transfer_id, None)
        self._refs.pop(transfer_id, None)
        self._verdicts.pop(transfer_id, None)
        self._awaiting.discard(transfer_id)

    def request_left(self, now_s: float, group_id: int, rs: RequestState, how: str) -> None:
        self._exported.pop(rs.request_id, None)
        self._forget(group_id, rs.request_id)

    def kv_fetched(self, now_s: float, rs: RequestState, group_id: int, tier: int, start_s: float, end_s: float,
                   num_bytes: float, tokens: int) -> None:
        return None                  # host tiers are modeled time; the backend keeps every block it made

    def store_write_started(self, now_s: float, flow_id: int, group_id: int, request_id: int,
                            hashes: tuple[int, ...]) -> None:
        """The group's actor exports the blocks; their bundle goes on to the store actors."""
        if group_id in self._dead or not self.store_actors:
            return
        box = self._box(group_id)
        box.ops.append({"op": "export_blocks", "id": request_id, "flow": flow_id, "hashes": list(hashes),
                        "block_bytes": int(self.scheduler.store.block_bytes)})
        box.block_puts.append((flow_id, tuple(hashes)))
        for h in hashes:
            self._put_pending[h] = flow_id

    def store_read_started(self, now_s: float, flow_id: int, rs: RequestState, group_id: int,
                           hashes: tuple[int, ...]) -> None:
        """The reading group's actor gets the blocks' refs from the store actors before its prefill."""
        if not self.store_actors:
            return
        self._await_puts(hashes)
        box = self._box(group_id)
        for index, sub in sorted(shard(hashes, len(self.store_actors)).items()):
            box.ops.append({"op": "import_blocks", "id": rs.request_id, "hashes": sub, "ref": len(box.refs)})
            box.refs.append(self.store_actors[index].get.remote(sub))
        self.stats.store_reads += 1

    def store_evicted(self, now_s: float, blocks: list[tuple[int, int]]) -> None:
        for index, sub in shard([h for h, _ in blocks], len(self.store_actors)).items():
            version = dict(blocks)
            self.store_actors[index].evict.remote([(h, version[h]) for h in sub])

    def _await_puts(self, hashes: tuple[int, ...]) -> None:
        """Wait until the writes of ``hashes`` reached their store actors."""
        deadline = time.monotonic() + self.call_timeout_s
        while True:
            flows = {self._put_pending[h] for h in hashes if h in self._put_pending}
            if not flows:
                return
            self._send()
            refs = [r for r, c in self._calls.items()
                    if (c.kind == "store" and c.flow in flows)
                    or (c.kind == "step" and c.box is not None and any(f in flows for f, _ in c.box.block_puts))]
            if not refs or time.monotonic() > deadline:
                raise RunFailed(f"prefix blocks of KV store write(s) {sorted(flows)} never reached the store")
            ready, _ = ray.wait(refs, num_returns=1, timeout=max(0.1, deadline - time.monotonic()))
            self._apply_answers(ready)

    def ship_spans(self, group_id: int, request_id: int, spans: list[dict[str, Any]]) -> None:
        """A finished request's spans for ``group_id``'s actor to emit (tracing's ``remote``)."""
        if group_id not in self._dead:
            self._box(group_id).ops.append({"op": "trace", "id": request_id, "spans": spans})

    def finish(self) -> None:
        """Send and collect what is left; afterwards no actor should hold any request."""
        while self._outbox or self._calls:
            self._send()
            self._collect(self._calls_list(), timeout_s=self.call_timeout_s)

    # --- messages -------------------------------------------------------------------------------
    def _span_message(self, span: Span) -> dict[str, Any]:
        kind = "decode" if span.kind is SpanKind.DECODE else "prefill" if span.kind is SpanKind.PREFILL else "mixed"
        if span.kind is SpanKind.PREFILL:
            requests = [self._prefill_item(span, rs) for rs in span.batch]
            joiners: list[int] = []
        else:
            requests = [dict(self._prefill_item(span, rs), start=start, end=end) for rs, start, end in span.chunks]
            joiners = [rs.request_id for rs in span.batch]
        msg = {"span_id": span.span_id, "kind": kind, "steps": span.planned_steps,
               "start_s": float(span.start_s), "duration_s": float(span.duration_s),
               "line": [float(span.line[0]), float(span.line[1])], "context0": span.context0,
               "batch_size": span.batch_size, "joiners": joiners, "requests": requests}
        if self.progress and span.kind is not SpanKind.PREFILL:   # who gets a token each step, from which index
            batch = self.scheduler.groups[span.group_id].batch
            msg["running"] = {rs.request_id: rs.generated + batch.made(rs) for rs in batch.running.values()}
        return msg

    def _prefill_item(self, span: Span, rs: RequestState) -> dict[str, Any]:
        r = rs.request
        cost = self.scheduler.groups[span.group_id].cost
        return {"id": rs.request_id, "prompt": r.prompt_tokens, "cached": rs.cached_tokens,
                "generated": list(self.tokens.get(rs.request_id, ())) if self.real_tokens else [],
                "done": rs.generated, "total": rs.prefill_tokens,
                "tokens": list(r.token_ids) if r.token_ids is not None else None,
                "hashes": list(r.prefix_hashes) if r.prefix_hashes else None, "block": r.prefix_block_tokens,
                # decoded elsewhere: export the KV (prompt + the token this prefill makes) as it ends
                "export": rs.decode_group != span.group_id,
                "true_bytes": int((rs.prefill_tokens + 1) * cost.transfer_bytes_per_token)}

    def _box(self, group_id: int) -> _Outbox:
        box = self._outbox.get(group_id)
        if box is None:
            box = self._outbox[group_id] = _Outbox(group_id)
        return box

    def _forget(self, group_id: int, request_id: int) -> None:
        if group_id in self._dead:
            return                                              # its KV died with it
        ops = self._box(group_id).ops
        if ops and ops[-1]["op"] == "forget":
            ops[-1]["ids"].append(request_id)
        else:
            ops.append({"op": "forget", "ids": [request_id]})

    def _import(self, transfer_id: int) -> None:
        """Send the transfer's KV to its destination actor (its ref is known)."""
        rid, _, dst = self._transfers[transfer_id]
        bundle, index = self._refs.pop(transfer_id)             # the scheduler's reference goes with it
        if isinstance(bundle, _Outbox):         # exported by a batch: its bundle's ref, once sent
            if bundle.bundle is None and bundle.waits():
                self._send(bundle.group_id)     # send it first, so outboxes never wait on each other in a cycle
            bundle = bundle.bundle if bundle.bundle is not None else bundle
        box = self._box(dst)
        k = next((i for i, r in enumerate(box.refs) if r is bundle or r == bundle), None)
        if k is None:
            k = len(box.refs)
            box.refs.append(bundle)
        last = self.tokens[rid][-1] if self.real_tokens else 0
        box.ops.append({"op": "import", "id": rid, "last": last, "ref": k, "index": index})
        box.imports[rid] = transfer_id

    LAZY_OPS = 512
    """Virtual clock: KV operations wait in an actor's outbox until its next span (which needs
    them first) or until this many gather; nothing on that clock depends on them sooner
    (imports whose verdict is waited for are sent then) — one call instead of one per plan."""

    BATCH_ITEMS = 128
    """Virtual clock, a promised device: its spans, cuts and steps go out this many at a time."""

    def _send(self, only: Optional[int] = None, min_ops: int = 0) -> None:
        """One call per actor with something waiting (or for actor ``only``; or for actors with
        at least ``min_ops`` KV operations, or a full batch, waiting); calls to one actor run in
        the order sent: a ``step`` of KV operations, or a promised device's ``batch``."""
        if not self._outbox:
            return
        if min_ops > 0:
            outbox = {gid: box for gid, box in self._outbox.items()
                      if len(box.ops) >= min_ops or len(box.items) >= self.BATCH_ITEMS}
            for gid in outbox:
                del self._outbox[gid]
        elif only is None:
            outbox, self._outbox = self._outbox, {}
        elif only in self._outbox:
            outbox = {only: self._outbox.pop(only)}
        else:
            return
        # an import may read a batch about to go: that batch goes first (its bundle's ref is its answer)
        for gid, box in sorted(outbox.items(), key=lambda kv: kv[1].waits()):
            if gid in self._dead:
                continue
            refs = self._ready_refs(box)
            if self._promised[gid]:
                self._send_batch(box, refs)
                continue
            ref = self.actors[gid].step.remote(pack("step", ops=box.ops, expect=self._incarnations[gid],
                                                    seq=self._next_seq(gid)), refs)
            box.refs = []                       # the call holds them now
            self._calls[ref] = _Call(gid, "step", box=box, future=self._future(ref))
            self.stats.actor_calls += 1

    def _ready_refs(self, box: _Outbox) -> list[ray.ObjectRef]:
        """``box``'s KV bundles as ObjectRefs: a batch they come from not sent yet is sent now."""
        refs: list[ray.ObjectRef] = []
        for source in box.refs:
            if isinstance(source, _Outbox):
                if source.bundle is None:
                    self._send(source.group_id)
                if source.bundle is None:       # its group died first: the KV is lost, the import says so
                    source.bundle = ray.put(None)
                source = source.bundle
            refs.append(source)
        return refs

    def _send_batch(self, box: _Outbox, refs: list[ray.ObjectRef]) -> None:
        gid = box.group_id
        self._close_step(box)
        if not box.items:
            return
        ref, box.bundle = self.actors[gid].run_batch.remote(
            pack("batch", items=box.items, expect=self._incarnations[gid]), refs)
        self._calls[ref] = _Call(gid, "batch", box=box)
        box.refs, box.items = [], []            # the call holds them now
        self.stats.actor_calls += 1
        self._reap = True

    def _take_batches(self) -> None:
        """Check the promised devices' answers that are in (nothing waits for them but the check:
        taken at the next event after a batch is sent, and at the end)."""
        self._reap = False
        refs = [r for r, c in self._calls.items() if c.kind == "batch"]
        if refs:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            self._apply_answers(ready)

    def _future(self, ref: ray.ObjectRef) -> "Optional[Future[Any]]":
        """Wall clock: a future of the call's answer, for the wait to sleep on with others."""
        return ref.future() if self.wall is not None else None

    def _next_seq(self, gid: int) -> int:
        """The next ordered call's sequence number for ``gid``'s actor (from 0 per incarnation)."""
        seq = self._seqs[gid]
        self._seqs[gid] = seq + 1
        return seq

    def _calls_list(self) -> list[ray.ObjectRef]:
        return list(self._calls)

    def _answers_due(self, next_s: Optional[float]) -> list[ray.ObjectRef]:
        """Virtual clock: the calls to collect before the event at ``next_s`` (None: the run's
        end) — those whose span may end by then, with every call sent before them to the same
        actor (answered already: an actor answers in order). Which calls these are depends on
        the plan alone, never on how fast the actors answered, so a run is reproducible."""
        calls = list(self._calls.items())
        last: dict[int, int] = {}
        for i, (_, call) in enumerate(calls):
            if next_s is None or call.earliest_s <= next_s:
                last[call.group_id] = i
        return [ref for i, (ref, call) in enumerate(calls) if i <= last.get(call.group_id, -1)]

    # --- answers --------------------------------------------------------------------------------
    def _collect(self, refs: list[ray.ObjectRef], timeout_s: float) -> None:
        """Wait for ``refs`` (virtual clock, or the end of a run) and apply their answers; an
        actor that does not answer within ``timeout_s`` is stuck: killed, restarted, failed."""
        if not refs:
            return
        _, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        if pending:
            for gid in sorted({self._calls[r].group_id for r in pending}):
                self._stuck(gid)
            _, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
            if pending:
                raise RunFailed(f"{len(pending)} device-group actor call(s) did not answer within "
                                f"{self.call_timeout_s:.0f} s (call_timeout_s), even after a restart")
        self._apply_answers(refs)

    def _apply_answers(self, refs: list[ray.ObjectRef]) -> bool:
        """Apply answered calls, in the order given; True if an event for *now* was queued."""
        died: list[int] = []
        queued = False
        for ref in refs:
            call = self._calls.pop(ref)
            if call.kind == "store":
                self._stored(ref, call)
                continue
            gid = call.group_id
            if gid in self._dead:
                continue
            msg, out_refs = self._answer(ref, call)
            if msg is None or msg["incarnation"] != self._incarnations[gid]:   # died, or restarted between two calls
                if gid not in died:
                    died.append(gid)
                continue
            if call.kind == "batch":
                assert call.box is not None
                self._batch_answered(gid, call.box, msg["reports"])
                continue
            if call.kind == "step":
                assert call.box is not None
                queued |= self._step_answered(call.box, msg, out_refs)
                continue
            if msg["span_id"] < 0:
                continue                                            # a cut noted (wall clock)
            span = call.span
            assert span is not None
            if self.wall is None:   # provisional until its time comes: a later cut supersedes it
                end_s = float(msg["end_s"])
                if end_s < call.earliest_s - 1e-9 * max(1.0, abs(call.earliest_s)):
                    raise RunFailed(f"device-group actor {gid} reported span {span.span_id} ending at {end_s:.9f} s, "
                                    f"before the earliest its pace allows ({call.earliest_s:.9f} s)")
                self._queue.push_reserved(end_s, Kind.SPAN_END, (span, call.cuts, msg, out_refs), call.seq)
            else:                   # final: the device is done with it, whatever the core cut since
                self._queue.push(self.wall.now(), Kind.SPAN_END, (span, None, msg, out_refs))
                queued = True
        for gid in died:
            self._group_died(gid)
        return queued

    @staticmethod
    def _answer(ref: ray.ObjectRef, call: _Call) -> tuple[Optional[dict[str, Any]], list[ray.ObjectRef]]:
        """A device call's answer, unpacked, with the object refs it returned: ``(None, [])`` if
        its actor died (the caller fails the group over); an error inside the actor ends the run."""
        try:
            answer = ray.get(ref)
        except ray.exceptions.RayActorError:
            return None, []
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            raise RunFailed(f"device-group actor {call.group_id} failed: {cause}") from None
        if call.kind == "batch":
            return unpack(answer, "batch_report"), []
        msg_bytes, out_refs = answer
        return unpack(msg_bytes, "step_report" if call.kind == "step" else "span_report"), out_refs

    def _batch_answered(self, gid: int, box: _Outbox, reports: list[bytes]) -> None:
        """Check a promised device's reports against its promises; apply its steps' verdicts."""
        for promise, data in zip(box.promised, reports):
            if promise.step is not None:
                self._step_answered(promise.step, unpack(data, "step_report"), [])
            else:
                self._kept(gid, promise, unpack(data, "span_report"))

    def _step_answered(self, box: _Outbox, msg: dict[str, Any], out_refs: list[ray.ObjectRef]) -> bool:
        """Exports go on to their destinations; import verdicts settle their KV arrivals; prefix
        blocks exported for the KV store go on to its actors."""
        for index, tid in enumerate(box.exports):
            if tid in self._transfers:
                self._refs[tid] = (out_refs[0], index)
                self._import(tid)
        if box.block_puts:
            self._put_blocks(box.block_puts, out_refs[1 if msg["exports"] else 0])
        self.stats.store_read_bytes += msg["store_bytes"]
        self.stats.bytes_moved += msg["import_bytes"]
        self.stats.import_s += msg["import_s"]
        if box.imports:
            self.stats.fetch_s.append(msg["fetch_s"])
            self.stats.queued_s.append(msg["queued_s"])
        pushed = False
        self.stats.unverified_bad += 0 if self.verify_imports else len(msg["bad_kv"])
        for rid, ok in [*((r, True) for r in msg["imported"]), *((r, False) for r in msg["bad_kv"])]:
            imported = box.imports.get(int(rid))
            if imported is None or imported not in self._transfers:
                continue
            self._verdicts[imported] = ok
            if imported in self._awaiting and self.wall is not None:
                self._awaiting.discard(imported)
                self._queue.push(self.wall.now(), Kind.KV_ARRIVAL, imported)
                pushed = True
        return pushed

    def _put_blocks(self, puts: list[tuple[int, tuple[int, ...]]], bundle: ray.ObjectRef) -> None:
        """Hand one step's exported prefix blocks to the store actors (each its own blocks)."""
        offset = 0
        for flow, hashes in puts:
            position = {h: offset + i for i, h in enumerate(hashes)}
            for index, sub in sorted(shard(hashes, len(self.store_actors)).items()):
                ref = self.store_actors[index].put.remote(flow, sub, [position[h] for h in sub], bundle)
                self._calls[ref] = _Call(-1, "store", flow=flow, future=self._future(ref))
            offset += len(hashes)

    def _stored(self, ref: ray.ObjectRef, call: _Call) -> None:
        """A store actor kept a write's blocks (or could not: the run cannot go on token-exact)."""
        try:
            kept = ray.get(ref)
        except ray.exceptions.RayError as exc:
            raise RunFailed(f"a KV store actor failed to keep prefix blocks: {str(exc).splitlines()[0]}") from None
        self.stats.store_put_bytes += kept
        self.stats.store_puts += 1
        if not any(c.kind == "store" and c.flow == call.flow for c in self._calls.values()):
            for h in [h for h, f in self._put_pending.items() if f == call.flow]:
                del self._put_pending[h]

    # --- wall clock ----------------------------------------------------------------------------
    def _wall_timeout(self, next_s: Optional[float]) -> Optional[float]:
        assert self.wall is not None
        timeouts = []
        if next_s is not None:
            timeouts.append(max(0.0, self.wall.seconds_until(next_s)))
        for call in self._calls.values():
            if call.kind == "span" and call.span is not None:
                timeouts.append(max(0.0, self.wall.seconds_until(call.span.end_s) + self.call_timeout_s))
        return min(timeouts) if timeouts else self.call_timeout_s

    def _due(self, t_s: float) -> bool:
        assert self.wall is not None
        return self.wall.seconds_until(t_s) <= 0.0

    def _check_deadlines(self) -> None:
        """A span whose report is ``call_timeout_s`` past its expected end: its actor is stuck."""
        assert self.wall is not None
        late = sorted({c.group_id for c in self._calls.values()
                       if c.kind == "span" and c.span is not None
                       and self.wall.seconds_until(c.span.end_s) + self.call_timeout_s <= 0.0})
        for gid in late:
            self._stuck(gid)

    # --- faults ---------------------------------------------------------------------------------
    def _stuck(self, gid: int) -> None:
        """Kill a stuck actor so Ray restarts it; its pending calls then fail like a crash's."""
        if gid in self._killed:
            return
        self._killed.add(gid)
        ray.kill(self.actors[gid], no_restart=False)
        self.stats.stuck += 1

    RESTART_WAIT_S = 60.0

    def _group_died(self, gid: int) -> None:
        """Tell the core, and get the group back once Ray has restarted its actor.

        If other live groups can take its role, the core resumes its requests there at once
        and the group rejoins when a ping answers (checked after every plan, never waited
        for). If it was the last of its role, the run waits (bounded) for the restart first,
        so its requests are resumed rather than rejected. No restart: the group is retired.
        """
        if self.scheduler is None or gid in self._dead:
            raise RunFailed(f"device-group actor {gid} died")
        now = self.wall.now() if self.wall is not None else self._now
        self._dead.add(gid)
        self._killed.discard(gid)
        self._outbox.pop(gid, None)
        for ref in [r for r, c in self._calls.items() if c.group_id == gid]:
            del self._calls[ref]
        groups = self.scheduler.groups
        g = groups[gid]
        peers = [o for o in groups if o is not g and o.alive
                 and ((g.role.can_prefill and o.can_prefill) or (g.role.can_decode and o.can_decode))]
        back = False if peers else self._wait_restart(gid)
        if back:
            self._incarnations[gid] = ray.get(self.actors[gid].incarnation_id.remote(), timeout=self.call_timeout_s)
            self._seqs[gid] = 0
        self.failures.append((now, gid, back))
        delivered = {rid: len(toks) for rid, toks in self.tokens.items()} if self.real_tokens else None
        self.scheduler.fail_group(now, gid, delivered, restarted=back)
        self._changed = now
        if back:
            self._dead.discard(gid)
        elif peers:
            self._restarting[gid] = self.actors[gid].held.remote()
        if self.journal is not None:
            self.journal.faults(now, self.failures, self.stats.kv_damaged)

    def _check_restarts(self) -> None:
        """Groups whose restarted actor answers its ping rejoin (never waits)."""
        if not self._restarting:
            return
        ready, _ = ray.wait(list(self._restarting.values()), num_returns=len(self._restarting), timeout=0)
        for gid, ping in list(self._restarting.items()):
            if ping not in ready:
                continue
            try:
                ray.get(ping)
            except ray.exceptions.ActorUnavailableError:
                self._restarting[gid] = self.actors[gid].held.remote()      # still restarting
                continue
            except ray.exceptions.RayActorError:
                del self._restarting[gid]                                   # restarts used up: retired
                continue
            del self._restarting[gid]
            last = max(i for i, f in enumerate(self.failures) if f[1] == gid)
            self.failures[last] = (self.failures[last][0], gid, True)
            if self.journal is not None:
                self.journal.faults(self._now, self.failures, self.stats.kv_damaged)
            self._incarnations[gid] = ray.get(self.actors[gid].begin.remote(self._origin_unix_s()),
                                              timeout=self.call_timeout_s)
            self._seqs[gid] = 0
            self._dead.discard(gid)
            self.scheduler.restore_group(self._now, gid)

    def _origin_unix_s(self) -> float:
        return self.wall.origin_unix_s(0.0) if self.wall is not None else time.time()

    def _wait_restart(self, gid: int) -> bool:
        """Whether Ray brought the actor back within ``RESTART_WAIT_S`` (False: restarts used up)."""
        deadline = time.monotonic() + self.RESTART_WAIT_S
        while time.monotonic() < deadline:
            try:
                ray.get(self.actors[gid].begin.remote(self._origin_unix_s()),
                        timeout=max(0.1, deadline - time.monotonic()))
                return True
            except ray.exceptions.ActorUnavailableError:         # restarting: ask again shortly
                time.sleep(0.2)
            except ray.exceptions.ActorDiedError:
                return False
            except ray.exceptions.GetTimeoutError:
                return False
        return False
