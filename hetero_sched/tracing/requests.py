"""One trace per request, built from what the core decides — the same in simulation and live.

:class:`RequestTracer` implements the core's ``ExecutorHooks``: it watches each request's life
(placed → prefill → transfer → decode → finished, with preemptions and retries) and keeps a
small timeline of :class:`SpanSpec` per request in flight. When the request ends,
:func:`emit_request` turns the timeline into spans:

- the simulator emits every span itself, with virtual times laid onto a wall-clock epoch;
- the live runtime emits the root, queue and transfer spans in the scheduler actor and ships
  each group-side span (prefill, decode, KV encode/decode) to the actor that did the work, with
  its parent's W3C trace context, inside the next msgpack ``step`` message; that actor emits it
  from its own process, adding what it measured (compute time, real bytes, codec time).

Span tree (names and attributes: README "Tracing")::

    text_completion <model>          root: arrival → finished; events first_token / preempt / retry / reject
    ├── queue.prefill                placed → its prefill starts (one per attempt)
    │   └── kv.fetch                 its prefix read from the cluster KV store (while it waits)
    ├── prefill                      on the prefill group
    │   └── kv.fetch                 its prefix read from host DRAM / local SSD (one per tier)
    ├── queue.decode                 prefill done → first decode step
    │   └── kv_transfer              disaggregated only
    │       ├── kv.encode            live only, on the prefill group's actor
    │       └── kv.decode            live only, on the decode group's actor
    └── decode                       first decode step → left the group (finished or preempted)

Times are the scheduler's clock (virtual seconds; the wall clock in a wall-clock live run), so
a trace shows exactly the durations the metrics are computed from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from hetero_sched.core.group import GroupState
from hetero_sched.core.kvtiers import TIER_NAMES
from hetero_sched.core.spans import Span, SpanKind, SpanReport
from hetero_sched.core.request import RequestState

_PROPAGATOR = TraceContextTextMapPropagator()
ROOT = -1


@dataclass(slots=True)
class SpanSpec:
    """A span to emit once its request ends: what, when, where, under which parent."""

    name: str
    start_s: float
    end_s: float = math.nan
    attrs: dict[str, Any] = field(default_factory=dict)
    parent: int = ROOT
    """Index of the parent spec in the timeline, or ``ROOT``."""
    where: Optional[int] = None
    """Group whose actor emits it in a live run (None: the scheduler)."""
    measure: Optional[str] = None
    """Live only: what the emitting actor measured and adds (``prefill``, ``encode``, ``decode``)."""
    live_only: bool = False


@dataclass(slots=True)
class Timeline:
    """One request's spans so far, and which of them are still open."""

    specs: list[SpanSpec] = field(default_factory=list)
    events: list[tuple[str, float, dict[str, Any]]] = field(default_factory=list)
    open: dict[str, int] = field(default_factory=dict)
    groups: set[int] = field(default_factory=set)
    attempt: int = 0
    prefill_end_s: float = math.nan
    decoded_at_join: int = 0

    def start(self, name: str, now_s: float, **kw: Any) -> SpanSpec:
        spec = SpanSpec(name, now_s, **kw)
        self.open[name] = len(self.specs)
        self.specs.append(spec)
        if spec.where is not None:
            self.groups.add(spec.where)
        return spec

    def end(self, name: str, now_s: float) -> Optional[SpanSpec]:
        i = self.open.pop(name, None)
        if i is None:
            return None
        spec = self.specs[i]
        spec.end_s = now_s
        return spec


RemoteFn = Callable[[int, int, list[dict[str, Any]]], None]
"""``remote(group_id, request_id, span payloads)``: ship group-side spans to that group's actor."""
SinkFn = Callable[[RequestState, Timeline], None]


class RequestTracer:
    """Core hooks → per-request timelines → ``sink(request, timeline)`` when a request ends.

    ``inner`` (the live executor) hears every hook first: tracing only observes.
    """

    def __init__(self, groups: Sequence[GroupState], sink: SinkFn, inner: Any = None) -> None:
        self.groups = list(groups)
        self.sink = sink
        self.inner = inner
        self.parents: dict[int, dict[str, str]] = {}
        """Trace contexts requests belong under (serving: their HTTP spans), by request id."""
        self._timelines: dict[int, Timeline] = {}
        self._prefilling: dict[int, list[RequestState]] = {}

    def _tl(self, rs: RequestState) -> Timeline:
        tl = self._timelines.get(rs.request_id)
        if tl is None:
            tl = self._timelines[rs.request_id] = Timeline()
        return tl

    def _group_attrs(self, gid: int) -> dict[str, Any]:
        g = self.groups[gid]
        return {"hetero.group": g.name, "hetero.device": g.device}

    # --- core hooks ---------------------------------------------------------------------------
    def request_placed(self, now_s: float, rs: RequestState, group_id: int) -> None:
        if self.inner is not None:
            self.inner.request_placed(now_s, rs, group_id)
        tl = self._tl(rs)
        if "queue.prefill" not in tl.open:
            self._queue_prefill(tl, now_s, group_id)

    def _queue_prefill(self, tl: Timeline, now_s: float, group_id: int) -> None:
        tl.attempt += 1
        if tl.attempt > 1:
            tl.events.append(("retry", now_s, {"hetero.attempt": tl.attempt}))
        tl.start("queue.prefill", now_s, attrs={**self._group_attrs(group_id), "hetero.attempt": tl.attempt})

    def span_planned(self, now_s: float, group_id: int, span: Span) -> None:
        if self.inner is not None:
            self.inner.span_planned(now_s, group_id, span)
        if span.kind is SpanKind.PREFILL:
            self._prefilling[group_id] = list(span.batch)
            for rs in span.batch:
                self._prefill_part(self._tl(rs), now_s, span.end_s, group_id, rs, len(span.batch))
            return
        for rs in span.batch:                       # the requests joining this decode span
            tl = self._tl(rs)
            tl.open.pop("prefill", None)
            if "queue.decode" not in tl.open:       # colocated: waited on its own group
                tl.start("queue.decode", tl.prefill_end_s, attrs=self._group_attrs(group_id))
            tl.end("queue.decode", now_s)
            tl.decoded_at_join = rs.generated
            tl.start("decode", now_s, where=group_id, attrs=self._group_attrs(group_id))
        if span.kind is SpanKind.MIXED:             # chunked prefill: chunks ride along a decode step
            self._prefilling[group_id] = [rs for rs, _, _ in span.chunks]
            for rs, _, _ in span.chunks:
                self._prefill_part(self._tl(rs), now_s, span.end_s, group_id, rs, len(span.chunks))

    def _prefill_part(self, tl: Timeline, now_s: float, end_s: float, group_id: int, rs: RequestState,
                      batch_size: int) -> None:
        """A prefill (or a chunk of one) of ``rs`` runs ``now_s``→``end_s``: one span per attempt."""
        if "queue.prefill" in tl.open or "prefill" not in tl.open:
            tl.end("queue.prefill", now_s)
            tl.start("prefill", now_s, where=group_id, measure="prefill", attrs={
                **self._group_attrs(group_id), "hetero.batch_size": batch_size,
                "gen_ai.usage.input_tokens": rs.prompt_tokens,
                "hetero.prefill_tokens": rs.prefill_tokens,
                "gen_ai.usage.cache_read.input_tokens": rs.cached_tokens,
                "hetero.attempt": tl.attempt, "hetero.chunks": 0})
        spec = tl.specs[tl.open["prefill"]]
        spec.attrs["hetero.chunks"] += 1
        spec.end_s = tl.prefill_end_s = end_s

    def span_cut(self, now_s: float, group_id: int, span: Span) -> None:
        if self.inner is not None:
            self.inner.span_cut(now_s, group_id, span)
        if span.kind is SpanKind.PREFILL:
            for rs in self._prefilling.get(group_id, ()):
                tl = self._timelines.get(rs.request_id)
                if tl is not None and "prefill" in tl.open:
                    tl.specs[tl.open["prefill"]].end_s = span.end_s
                    tl.prefill_end_s = span.end_s

    def span_applied(self, now_s: float, group_id: int, span: Span, report: SpanReport) -> None:
        """The device's report is the fact: a prefill ends, and joiners' decode starts, when it says."""
        if self.inner is not None:
            self.inner.span_applied(now_s, group_id, span, report)
        prefilled = [rs for rs, _, end in span.chunks if end >= rs.prefill_tokens] \
            if span.kind is SpanKind.MIXED else span.batch if span.kind is SpanKind.PREFILL else []
        for rs in prefilled:
            tl = self._timelines.get(rs.request_id)
            if tl is not None and "prefill" in tl.open:
                tl.specs[tl.open["prefill"]].end_s = tl.prefill_end_s = report.end_s
        if span.kind is not SpanKind.PREFILL:
            for rs in span.batch:
                tl = self._timelines.get(rs.request_id)
                if tl is not None and "decode" in tl.open:
                    tl.specs[tl.open["decode"]].start_s = report.start_s

    def transfer_started(self, now_s: float, transfer_id: int, rs: RequestState, src: int, dst: int,
                         num_bytes: int) -> None:
        if self.inner is not None:
            self.inner.transfer_started(now_s, transfer_id, rs, src, dst, num_bytes)
        tl = self._tl(rs)
        tl.open.pop("prefill", None)
        if "queue.decode" not in tl.open:
            tl.start("queue.decode", tl.prefill_end_s, attrs=self._group_attrs(dst))
        parent = tl.open["queue.decode"]
        src_g, dst_g = self.groups[src], self.groups[dst]
        tl.start("kv_transfer", now_s, parent=parent, attrs={
            "hetero.kv.bytes_true": int(num_bytes), "hetero.kv.tokens": rs.context_tokens,
            "hetero.kv.blocks": rs.decode_blocks, "hetero.link": f"{src_g.name}->{dst_g.name}",
            "hetero.link.src": src_g.name, "hetero.link.dst": dst_g.name})
        link = tl.open["kv_transfer"]
        enc = tl.start("kv.encode", now_s, parent=link, where=src, measure="encode", live_only=True,
                       attrs=self._group_attrs(src))
        enc.end_s = now_s
        tl.open.pop("kv.encode")
        tl.start("kv.decode", now_s, parent=link, where=dst, measure="decode", live_only=True,
                 attrs=self._group_attrs(dst))

    def kv_landed(self, now_s: float, transfer_id: int, rs: RequestState, src: int, dst: int) -> None:
        if self.inner is not None:
            self.inner.kv_landed(now_s, transfer_id, rs, src, dst)
        tl = self._tl(rs)
        tl.end("kv_transfer", now_s)
        spec = tl.end("kv.decode", now_s)
        if spec is not None:
            spec.start_s = now_s

    def transfer_cancelled(self, now_s: float, transfer_id: int, rs: RequestState, src: int, dst: int) -> None:
        if self.inner is not None:
            self.inner.transfer_cancelled(now_s, transfer_id, rs, src, dst)
        tl = self._tl(rs)
        spec = tl.end("kv_transfer", now_s)
        if spec is not None:
            spec.attrs["hetero.cancelled"] = True
        tl.open.pop("kv.decode", None)

    def kv_fetched(self, now_s: float, rs: RequestState, group_id: int, tier: int, start_s: float, end_s: float,
                   num_bytes: float, tokens: int) -> None:
        if self.inner is not None:
            self.inner.kv_fetched(now_s, rs, group_id, tier, start_s, end_s, num_bytes, tokens)
        tl = self._tl(rs)
        parent = tl.open.get("prefill", tl.open.get("queue.prefill", ROOT))
        spec = SpanSpec("kv.fetch", start_s, end_s, parent=parent, attrs={
            **self._group_attrs(group_id), "hetero.kv.tier": TIER_NAMES[tier], "hetero.kv.bytes": int(num_bytes),
            "hetero.kv.tokens": tokens, "hetero.attempt": tl.attempt})
        tl.specs.append(spec)

    def store_read_started(self, now_s: float, flow_id: int, rs: RequestState, group_id: int,
                           hashes: tuple[int, ...]) -> None:
        if self.inner is not None:
            self.inner.store_read_started(now_s, flow_id, rs, group_id, hashes)

    def store_write_started(self, now_s: float, flow_id: int, group_id: int, request_id: int,
                            hashes: tuple[int, ...]) -> None:
        if self.inner is not None:
            self.inner.store_write_started(now_s, flow_id, group_id, request_id, hashes)

    def store_evicted(self, now_s: float, blocks: list[tuple[int, int]]) -> None:
        if self.inner is not None:
            self.inner.store_evicted(now_s, blocks)

    def request_left(self, now_s: float, group_id: int, rs: RequestState, how: str) -> None:
        if self.inner is not None:
            self.inner.request_left(now_s, group_id, rs, how)
        tl = self._tl(rs)
        if how == "failed" and not self.groups[group_id].alive:      # its device died: all that was open ends
            tl.events.append(("group_failed", now_s, self._group_attrs(group_id)))
            for i in list(tl.open.values()):
                if math.isnan(tl.specs[i].end_s) or tl.specs[i].end_s > now_s:
                    tl.specs[i].end_s = now_s
            tl.open.clear()
            tl.prefill_end_s = now_s                            # a later queue.decode starts here
            return
        tl.open.pop("prefill", None)
        spec = tl.end("decode", now_s)
        if spec is not None:
            tokens = rs.generated - tl.decoded_at_join
            spec.attrs["gen_ai.usage.output_tokens"] = tokens
            spec.attrs["hetero.tpot_s"] = (now_s - spec.start_s) / tokens if tokens > 0 else 0.0
            spec.attrs["hetero.left"] = how
        if how == "preempted":
            tl.events.append(("preempt", now_s, {**self._group_attrs(group_id), "hetero.generated": rs.generated}))
            if self.groups[group_id].can_prefill and self.groups[group_id].can_decode:
                self._queue_prefill(tl, now_s, group_id)     # colocated: re-queued on the same group

    def request_finished(self, now_s: float, rs: RequestState) -> None:
        if self.inner is not None:
            self.inner.request_finished(now_s, rs)
        tl = self._timelines.pop(rs.request_id, None) or Timeline()
        for i in tl.open.values():
            if math.isnan(tl.specs[i].end_s):
                tl.specs[i].end_s = now_s
        tl.open.clear()
        self.sink(rs, tl)


def ns(epoch_ns: int, t_s: float) -> int:
    """Scheduler time (seconds) → wall-clock nanoseconds since the Unix epoch."""
    return epoch_ns + int(round(t_s * 1e9))


def root_attributes(rs: RequestState, model: str, group_names: Sequence[str]) -> dict[str, Any]:
    """GenAI semantic-convention attributes of a request's root span, plus the scheduler's own."""
    r = rs.request
    attrs: dict[str, Any] = {
        "gen_ai.operation.name": "text_completion",
        "gen_ai.request.model": model,
        "gen_ai.response.id": str(rs.request_id),
        "gen_ai.usage.input_tokens": r.prompt_tokens,
        "gen_ai.usage.output_tokens": rs.generated,
        "gen_ai.usage.cache_read.input_tokens": rs.cached_tokens,
        "hetero.request.id": rs.request_id,
        "hetero.status": rs.phase.value,
        "hetero.preemptions": rs.preemptions,
        "hetero.predicted_output_tokens": rs.predicted_output,
    }
    if rs.prefill_group is not None:
        attrs["hetero.prefill_group"] = group_names[rs.prefill_group]
    if rs.decode_group is not None:
        attrs["hetero.decode_group"] = group_names[rs.decode_group]
    if rs.reject_reason:
        attrs["hetero.reason"] = rs.reject_reason
    if rs.token1_s is not None:
        attrs["gen_ai.server.time_to_first_token"] = rs.token1_s - r.arrival_s
        if rs.generated > 1 and rs.finish_s is not None:
            attrs["gen_ai.server.time_per_output_token"] = (rs.finish_s - rs.token1_s) / (rs.generated - 1)
    return attrs


def emit_request(tracer: Tracer, rs: RequestState, tl: Timeline, *, model: str, group_names: Sequence[str],
                 epoch_ns: int, remote: Optional[RemoteFn] = None,
                 parent: Optional[dict[str, str]] = None) -> int:
    """Emit one request's trace; returns the number of spans emitted in this process.

    Without ``remote`` (the simulator) every span is emitted here and live-only specs are
    skipped; with it, specs that name a group go to that group's actor with their parent's
    trace context. Unsampled requests still notify their groups (with no spans), so an actor
    can forget what it measured for them. ``parent``: a W3C trace context the request's span
    belongs under (serving: the HTTP request's span); None: it starts its own trace.
    """
    root = tracer.start_span(f"text_completion {model}", start_time=ns(epoch_ns, rs.request.arrival_s),
                             attributes=root_attributes(rs, model, group_names),
                             context=_PROPAGATOR.extract(parent) if parent else None)
    shipped: dict[int, list[dict[str, Any]]] = {g: [] for g in tl.groups} if remote is not None else {}
    emitted = 1
    if root.is_recording():
        contexts: list[Optional[Context]] = []
        root_ctx = trace.set_span_in_context(root)
        for spec in tl.specs:
            parent_ctx = root_ctx if spec.parent == ROOT else contexts[spec.parent]
            if parent_ctx is None or (spec.live_only and remote is None):
                contexts.append(None)
                continue
            if spec.where is not None and remote is not None:
                carrier: dict[str, str] = {}
                _PROPAGATOR.inject(carrier, context=parent_ctx)
                shipped[spec.where].append({"name": spec.name, "parent": carrier,
                                            "start_ns": ns(epoch_ns, spec.start_s), "end_ns": ns(epoch_ns, spec.end_s),
                                            "attrs": spec.attrs, "measure": spec.measure})
                contexts.append(None)
                continue
            span = tracer.start_span(spec.name, context=parent_ctx, start_time=ns(epoch_ns, spec.start_s),
                                     attributes=spec.attrs)
            span.end(end_time=ns(epoch_ns, spec.end_s))
            contexts.append(trace.set_span_in_context(span))
            emitted += 1
        if rs.token1_s is not None:
            root.add_event("first_token", timestamp=ns(epoch_ns, rs.token1_s))
        for name, t, attrs in tl.events:
            root.add_event(name, attributes=attrs, timestamp=ns(epoch_ns, t))
        if rs.reject_reason:
            root.add_event("reject", attributes={"hetero.reason": rs.reject_reason},
                           timestamp=ns(epoch_ns, rs.finish_s or rs.request.arrival_s))
            root.set_status(Status(StatusCode.ERROR, rs.reject_reason))
    root.end(end_time=ns(epoch_ns, rs.finish_s if rs.finish_s is not None else rs.request.arrival_s))
    if remote is not None:
        for gid, payloads in shipped.items():
            remote(gid, rs.request_id, payloads)
    return emitted


def emit_shipped(tracer: Tracer, payloads: list[dict[str, Any]], measured: dict[str, list[dict[str, Any]]]) -> int:
    """On an actor: emit the spans the scheduler shipped, with what this actor measured.

    ``measured`` maps a measurement kind to this request's measurements in the order they
    happened (a preempted request may be prefilled and transferred more than once); each
    spec that names a kind takes the next one. Returns the number of spans emitted.
    """
    for p in payloads:
        attrs = dict(p["attrs"])
        start, end = p["start_ns"], p["end_ns"]
        kind = p.get("measure")
        queue = measured.get(kind) if kind else None
        if queue:
            m = queue.pop(0)
            attrs.update({k: v for k, v in m.items() if k != "seconds"})
            seconds_ns = int(m["seconds"] * 1e9)
            if kind == "encode":
                end = start + seconds_ns
            elif kind == "decode":
                start = end - seconds_ns
        ctx = _PROPAGATOR.extract(p["parent"])
        span = tracer.start_span(p["name"], context=ctx, start_time=start, attributes=attrs)
        span.end(end_time=end)
    return len(payloads)
