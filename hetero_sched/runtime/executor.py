"""The scheduler actor's executor: the core's decisions → one batched call per actor per time.

The core (in the scheduler actor) tells this object what it decided — spans, cuts,
transfers, departures — and the event loop tells it when a span ends and when KV lands.
Each becomes an *operation* queued for the group's actor; after every plan, each actor with
work gets one ``step`` call carrying all its operations in order (calls to different actors
run in parallel), and the loop waits for them: prefill and decode report their tokens,
exports return ObjectRefs of Arrow KV blocks, imports read KV by ref and verify checksums,
forgets free what left. ObjectRefs travel as call arguments; msgpack carries the rest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

import ray

from hetero_sched.core.group import Span, SpanKind
from hetero_sched.core.request import RequestState
from hetero_sched.errors import RunFailed
from hetero_sched.runtime.messages import pack, unpack
from hetero_sched.runtime.recovery import RunJournal


def ask_all(actors: list[Any], method: str, timeout_s: float) -> list[Any]:
    """Call ``method`` on every actor and return the answers, asking again any actor that is
    restarting (Ray is bringing it back) until ``timeout_s``; a dead actor raises."""
    deadline = time.monotonic() + timeout_s
    answers: list[Any] = [None] * len(actors)
    todo = list(range(len(actors)))
    while todo:
        futs = [getattr(actors[i], method).remote() for i in todo]
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


@dataclass
class _PlannedSpan:
    token: int
    kind: SpanKind
    batch: list[RequestState]
    steps: int
    chunks: list[tuple[RequestState, int, int]] = field(default_factory=list)


@dataclass
class _Outbox:
    """What one actor will be asked to do at the next flush."""

    ops: list[dict[str, Any]] = field(default_factory=list)
    refs: list[ray.ObjectRef] = field(default_factory=list)     # KV bundles the import ops read
    exports: list[int] = field(default_factory=list)            # transfer ids of export ops, in order
    imports: dict[int, int] = field(default_factory=dict)       # request id -> transfer id of its import op


@dataclass
class ExecutorStats:
    """What the executor did, for the run summary and the benchmarks."""

    actor_calls: int = 0
    flushes: int = 0
    transfers: int = 0
    bytes_moved: int = 0
    import_s: float = 0.0
    min_margin: Optional[float] = None
    flush_s: list[float] = field(default_factory=list)
    kv_damaged: int = 0
    """Imports whose KV failed its checksum (or was lost) and were sent again."""
    stuck: int = 0
    """Actors killed (and restarted) because a call missed ``call_timeout_s``."""


class LiveExecutor:
    """Implements the core's ``ExecutorHooks`` and the engine's ``DriverHooks`` with Ray actors."""

    MAX_PENDING_OPS = 4096

    def __init__(self, actors: list[Any], real_tokens: bool, send_every_step: bool,
                 verify_imports: bool = False, journal: Optional[RunJournal] = None,
                 call_timeout_s: float = 120.0) -> None:
        """When to send and when to wait.

        With real tokens (numpy backend) the next decisions need what the actors return, so
        every step is sent and awaited. Otherwise no decision depends on the answers: calls are
        sent after every plan when ``send_every_step`` (wall clock: actors work in real time,
        overlapping the scheduler's waiting) or coalesced until an import needs KV not yet
        exported (virtual clock), and answers are collected only when a ref is needed, when
        many are outstanding, and at the end. ``verify_imports`` (always with real tokens) waits
        for each import's checksum verdict before the core lets the request decode, so damaged KV
        is sent again from the prefill side's copy instead of being decoded from. ``journal``
        hears every acceptance, delivered token and end, committed once per plan.
        ``call_timeout_s``: an actor call not answered by then is stuck: its actor is killed and
        restarted like a crashed one (its requests resumed, its KV reservations freed).
        """
        self.journal = journal
        self.call_timeout_s = call_timeout_s
        self.verify_imports = verify_imports or real_tokens
        self.actors = actors
        self.real_tokens = real_tokens
        self.send_every_step = send_every_step
        self._pending_ops = 0
        self._inflight: list[tuple[int, _Outbox, ray.ObjectRef]] = []
        self.tokens: dict[int, list[int]] = {}
        self.stats = ExecutorStats()
        self._spans: dict[int, _PlannedSpan] = {}
        self._outbox: dict[int, _Outbox] = {}
        self._transfers: dict[int, tuple[int, int, int]] = {}       # transfer -> (request, src, dst group)
        self._refs: dict[int, tuple[ray.ObjectRef, int]] = {}        # transfer -> (KV bundle, index in it)
        self._cancelled: set[int] = set()                           # transfers an endpoint failure ended
        self._verifying: dict[int, tuple[int, ray.ObjectRef]] = {}  # transfer -> (dst, call importing it)
        self._dead: set[int] = set()                                # groups whose actor died (not back yet)
        self._restarting: dict[int, ray.ObjectRef] = {}            # dead group -> ping of its restarted actor
        self._incarnations: list[int] = ask_all(actors, "incarnation_id", self.call_timeout_s)
        self._now = 0.0
        self.scheduler: Any = None
        """The core, told when an actor dies (``fail_group``) and when it is back (``restore_group``)."""
        self.failures: list[tuple[float, int, bool]] = []
        """(time, group, restarted) for every actor death seen; ``restarted`` turns True when the
        group is back in service (a group whose actor never returns, e.g. its node is gone, stays False)."""

    def _box(self, group_id: int) -> _Outbox:
        box = self._outbox.get(group_id)
        if box is None:
            box = self._outbox[group_id] = _Outbox()
        self._pending_ops += 1
        return box

    # --- core hooks ---------------------------------------------------------------------------
    def span_planned(self, now_s: float, group_id: int, span: Span) -> None:
        self._spans[group_id] = _PlannedSpan(span.token, span.kind, list(span.batch), span.steps, list(span.chunks))

    def span_cut(self, now_s: float, group_id: int, span: Span) -> None:
        planned = self._spans[group_id]
        planned.token = span.token
        planned.steps = span.steps

    def transfer_started(self, now_s: float, transfer_id: int, rs: RequestState, src: int, dst: int, num_bytes: int) -> None:
        box = self._box(src)
        box.ops.append({"op": "export", "id": rs.request_id, "true_bytes": int(num_bytes)})
        box.exports.append(transfer_id)
        self._transfers[transfer_id] = (rs.request_id, src, dst)

    def kv_landed(self, now_s: float, transfer_id: int, rs: RequestState, src: int, dst: int) -> None:
        self._forget(src, rs.request_id)

    def transfer_cancelled(self, now_s: float, transfer_id: int, rs: RequestState, src: int, dst: int) -> None:
        self._transfers.pop(transfer_id, None)
        self._refs.pop(transfer_id, None)
        self._cancelled.add(transfer_id)
        self._verifying.pop(transfer_id, None)

    def request_left(self, now_s: float, group_id: int, rs: RequestState, how: str) -> None:
        self._forget(group_id, rs.request_id)

    def request_placed(self, now_s: float, rs: RequestState, group_id: int) -> None:
        if self.journal is not None:
            self.journal.accepted(now_s, rs)

    def request_finished(self, now_s: float, rs: RequestState) -> None:
        if self.journal is not None:
            self.journal.finished(now_s, rs, self.scheduler.records[-1])

    def ship_spans(self, group_id: int, request_id: int, spans: list[dict[str, Any]]) -> None:
        """A finished request's spans for ``group_id``'s actor to emit (tracing's ``remote``)."""
        self._box(group_id).ops.append({"op": "trace", "id": request_id, "spans": spans})

    def _forget(self, group_id: int, request_id: int) -> None:
        if group_id in self._dead:
            return                                              # its KV died with it
        ops = self._box(group_id).ops
        if ops and ops[-1]["op"] == "forget":
            ops[-1]["ids"].append(request_id)
        else:
            ops.append({"op": "forget", "ids": [request_id]})

    # --- driver hooks -------------------------------------------------------------------------
    def before_span_end(self, now_s: float, group_id: int, token: int) -> None:
        self._now = now_s
        planned = self._spans.get(group_id)
        if planned is None or planned.token != token:
            return                                              # a stale end: the span was cut
        del self._spans[group_id]
        if planned.kind is SpanKind.PREFILL:
            op = {"op": "prefill", "requests": [self._prefill_item(rs) for rs in planned.batch]}
        elif planned.kind is SpanKind.DECODE or not planned.chunks:
            op = {"op": "decode", "steps": planned.steps, "joiners": [rs.request_id for rs in planned.batch]}
        else:   # chunked prefill: one decode step of the running batch, then the prefill chunks
            if planned.steps:
                self._box(group_id).ops.append(
                    {"op": "decode", "steps": planned.steps, "joiners": [rs.request_id for rs in planned.batch]})
            op = {"op": "prefill", "requests": [dict(self._prefill_item(rs), start=start, end=end)
                                                for rs, start, end in planned.chunks]}
        self._box(group_id).ops.append(op)
        if self.real_tokens:
            # the tokens must be back before the core counts them (and maybe completes the
            # request): an actor that died doing the span is then found before, not after
            self._send()
            self._collect()

    VERIFY_POLL_S = 0.005
    """How soon (virtual seconds) a KV arrival whose checksum verdict is not in yet is looked at again."""

    def before_kv_arrival(self, now_s: float, transfer_id: int) -> Optional[float]:
        """Import the KV at its decode actor; None once it may be decoded from (verified, if asked).

        Wall clock without real tokens: the verdict is not waited for — the arrival is put off by
        ``VERIFY_POLL_S`` until the import's call has answered, and the loop goes on meanwhile.
        """
        self._now = now_s
        checking = self._verifying.pop(transfer_id, None)
        if checking is not None:
            dst, call = checking
            if not ray.wait([call], timeout=0)[0]:
                self._verifying[transfer_id] = checking
                return now_s + self.VERIFY_POLL_S
            self._collect(dst)          # damaged: kv_damaged sends it again, this arrival is void
            return None
        if transfer_id in self._transfers and transfer_id not in self._refs:
            self._send()                         # its export is still in an outbox or in flight
            self._collect(self._transfers[transfer_id][1])
        entry = self._transfers.pop(transfer_id, None)
        if entry is None:
            return None                          # cancelled: an endpoint's actor died
        rid, _, dst = entry
        box = self._box(dst)
        last = self.tokens[rid][-1] if self.real_tokens else 0
        bundle, index = self._refs.pop(transfer_id)             # the scheduler's reference goes with it
        k = next((i for i, r in enumerate(box.refs) if r == bundle), None)
        if k is None:
            k = len(box.refs)
            box.refs.append(bundle)
        box.ops.append({"op": "import", "id": rid, "last": last, "ref": k, "index": index})
        box.imports[rid] = transfer_id
        self.stats.transfers += 1
        if self.verify_imports:
            sent = self._send()
            if self.send_every_step and not self.real_tokens:
                self._verifying[transfer_id] = (dst, sent[dst])
                return now_s + self.VERIFY_POLL_S
            self._collect(dst)
        return None

    def after_plan(self, now_s: float) -> None:
        self._now = now_s
        if self.journal is not None:            # group commit: one write per plan
            self.journal.commit(now_s, self.scheduler.decisions, [g.busy_s for g in self.scheduler.groups])
        self._check_restarts()
        if self.real_tokens:
            self._send()
            self._collect()
        elif self.send_every_step or self._pending_ops > self.MAX_PENDING_OPS:
            self._send()
            if len(self._inflight) > self.MAX_INFLIGHT:
                self._collect()

    MAX_INFLIGHT = 256

    def _send(self) -> dict[int, ray.ObjectRef]:
        """One ``step`` call per actor with work (calls to one actor run in the order sent)."""
        sent: dict[int, ray.ObjectRef] = {}
        if not self._outbox:
            return sent
        self._pending_ops = 0
        for gid, box in self._outbox.items():
            sent[gid] = self.actors[gid].step.remote(pack("step", ops=box.ops, expect=self._incarnations[gid]), box.refs)
            self._inflight.append((gid, box, sent[gid]))
            box.refs = []                       # the call holds them now
        self._outbox = {}
        return sent

    def _collect(self, group_id: Optional[int] = None) -> None:
        """Wait for every call in flight (or every call to ``group_id``, when no decision needs the
        others' answers yet: no real tokens) and take in the reports (tokens, exported refs).

        A call whose actor died marks its group failed in the core (after every other report
        is in, so ``delivered`` counts every token that really came back). A call that misses
        ``call_timeout_s`` is stuck: its actor is killed and Ray restarts it, so it is a death
        like any other — never an unbounded wait.
        """
        if not self._inflight:
            return
        t0 = time.perf_counter()
        if group_id is None or self.real_tokens:
            inflight, self._inflight = self._inflight, []
        else:   # calls to one actor run in order: its answers need no other actor's
            inflight = [c for c in self._inflight if c[0] == group_id]
            self._inflight = [c for c in self._inflight if c[0] != group_id]
        futs = [fut for _, _, fut in inflight]
        if not futs:
            return
        _, pending = ray.wait(futs, num_returns=len(futs), timeout=self.call_timeout_s)
        if pending:
            late = set(pending)
            for gid in sorted({gid for gid, _, fut in inflight if fut in late}):
                ray.kill(self.actors[gid], no_restart=False)
                self.stats.stuck += 1
            _, pending = ray.wait(futs, num_returns=len(futs), timeout=self.call_timeout_s)
            if pending:
                raise RunFailed(f"{len(pending)} device-group actor call(s) did not answer within "
                                f"{self.call_timeout_s:.0f} s (call_timeout_s), even after a restart")
        self.stats.actor_calls += len(inflight)
        self.stats.flushes += 1
        died: list[int] = []
        damaged: list[int] = []
        for gid, box, fut in inflight:
            try:
                report_bytes, refs = ray.get(fut)
            except ray.exceptions.RayActorError:
                if gid not in died:
                    died.append(gid)
                continue
            except ray.exceptions.RayTaskError as exc:
                cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                raise RunFailed(f"device-group actor {gid} failed a step: {cause}") from None
            report = unpack(report_bytes, "step_report")
            if report["incarnation"] != self._incarnations[gid]:
                if gid not in died:                             # restarted between two calls
                    died.append(gid)
                continue
            for rid, toks in report["tokens"].items():
                self.tokens.setdefault(int(rid), []).extend(toks)
                if self.journal is not None:
                    self.journal.delivered(self._now, int(rid), toks)
            for m in report["margins"].values():
                if self.stats.min_margin is None or m < self.stats.min_margin:
                    self.stats.min_margin = m
            self.stats.bytes_moved += report["import_bytes"]
            self.stats.import_s += report["import_s"]
            for index, tid in enumerate(box.exports):
                if tid not in self._cancelled:
                    self._refs[tid] = (refs[0], index)
            damaged.extend(box.imports[rid] for rid in report["bad_kv"])
        self.stats.flush_s.append(time.perf_counter() - t0)
        for gid in died:
            self._group_died(gid)
        for tid in damaged:
            self.stats.kv_damaged += 1
            if self.scheduler is None:
                raise RunFailed(f"KV of transfer {tid} failed its checksum")
            self.scheduler.kv_damaged(self._now, tid)
        if (died or damaged) and self.journal is not None:
            self.journal.faults(self._now, self.failures, self.stats.kv_damaged)

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
        self._dead.add(gid)
        self._outbox.pop(gid, None)
        self._spans.pop(gid, None)
        groups = self.scheduler.groups
        g = groups[gid]
        peers = [o for o in groups if o is not g and o.alive
                 and ((g.role.can_prefill and o.can_prefill) or (g.role.can_decode and o.can_decode))]
        back = False if peers else self._wait_restart(gid)
        if back:
            self._incarnations[gid] = ray.get(self.actors[gid].incarnation_id.remote(), timeout=self.call_timeout_s)
        self.failures.append((self._now, gid, back))
        delivered = {rid: len(toks) for rid, toks in self.tokens.items()} if self.real_tokens else None
        self.scheduler.fail_group(self._now, gid, delivered, restarted=back)
        if back:
            self._dead.discard(gid)
        elif peers:
            self._restarting[gid] = self.actors[gid].held.remote()

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
            self._incarnations[gid] = ray.get(self.actors[gid].incarnation_id.remote(), timeout=self.call_timeout_s)
            self._dead.discard(gid)
            self.scheduler.restore_group(self._now, gid)

    def _wait_restart(self, gid: int) -> bool:
        """Whether Ray brought the actor back within ``RESTART_WAIT_S`` (False: restarts used up)."""
        deadline = time.monotonic() + self.RESTART_WAIT_S
        while time.monotonic() < deadline:
            try:
                ray.get(self.actors[gid].held.remote(), timeout=max(0.1, deadline - time.monotonic()))
                return True
            except ray.exceptions.ActorUnavailableError:         # restarting: ask again shortly
                time.sleep(0.2)
            except ray.exceptions.ActorDiedError:
                return False
            except ray.exceptions.GetTimeoutError:
                return False
        return False

    def finish(self) -> None:
        """Send and collect what is left; afterwards no actor should hold any request."""
        self._send()
        self._collect()

    def _prefill_item(self, rs: RequestState) -> dict[str, Any]:
        r = rs.request
        return {"id": rs.request_id, "prompt": r.prompt_tokens, "cached": rs.cached_tokens,
                "generated": list(self.tokens.get(rs.request_id, ())) if self.real_tokens else [],
                "hashes": list(r.prefix_hashes) if r.prefix_hashes else None, "block": r.prefix_block_tokens}
