"""Events, their same-time order, and the decision log (DESIGN contract §2).

An event is ``(time_s, priority, seq, kind, payload)``; the queue pops them in that order. At
the same time, lower priority runs first — completions (span ends), then KV arrivals (transfer
events), then request arrivals — and the scheduler's decisions run after every event of that
time (the drivers call :meth:`~hetero_sched.core.scheduler.Scheduler.plan` once the clock is
about to move). ``seq`` is monotonic, so the remaining ties keep insertion order and a run is
reproducible bit for bit.
"""

from __future__ import annotations

import math
from array import array
from typing import Any, Final, Iterator, Optional

from librt.vecs import append, vec
from mypy_extensions import i64, u8


class Priority:
    """Same-time order of events (lower first). Plain ``Final`` ints: compiled, they are constants."""

    SPAN_END: Final = 0
    TRANSFER: Final = 1
    ARRIVAL: Final = 2


class Kind:
    """What an event is; the payload's meaning depends on it."""

    SPAN_END: Final = 0      # payload: (group_id, span_token)
    TRANSFER: Final = 1      # payload: network version (the transfer network's next change)
    KV_ARRIVAL: Final = 2    # payload: transfer_id
    ARRIVAL: Final = 3       # payload: Request


def priority_of(kind: int) -> i64:
    """The same-time priority of an event of ``kind`` (a function, not a constant tuple: compiled,
    a ``Final`` tuple is built anew, its items boxed, at every use)."""
    if kind == Kind.SPAN_END:
        return Priority.SPAN_END
    if kind == Kind.ARRIVAL:
        return Priority.ARRIVAL
    return Priority.TRANSFER


ORDER_BITS: Final = 40
"""An event's same-time order is one int, ``priority << ORDER_BITS | seq`` (seq < 2**40)."""
ORDER_MASK: Final = (1 << ORDER_BITS) - 1


class Event:
    """One pending event. A class, not a tuple, so that the compiled heap compares two events by
    reading two doubles: a tuple comparison costs three rich comparisons, and with G groups'
    span ends pending every pop walks log4(G) levels (at a thousand groups, a sixth of a run)."""

    __slots__ = ("time_s", "order", "kind", "payload", "index")

    def __init__(self, time_s: float, order: i64, kind: int, payload: Any) -> None:
        self.time_s = time_s
        self.order = order
        """``priority << ORDER_BITS | seq``: a machine integer, compared without unboxing."""
        self.kind = kind
        self.payload = payload
        self.index: i64 = -1
        """Its place in the heap while pending (-1: popped)."""


class EventQueue:
    """A heap of events ordered by ``(time_s, priority, seq)``: a total order, so a run is
    reproducible bit for bit."""

    __slots__ = ("_heap", "_times", "_orders", "_seq", "_spare")

    def __init__(self) -> None:
        self._heap: list[Event] = []
        # Each heap place's keys again, in two unboxed arrays: ``_times[i] == _heap[i].time_s``
        # and ``_orders[i] == _heap[i].order`` for i < len(_heap) (they never shrink). A sift
        # compares the (up to four) children of a place by reading one cache line of each array,
        # where reading their events' fields fetched an event per child, scattered in memory
        # when a thousand groups' events are pending.
        self._times = vec[float]()
        self._orders = vec[i64]()
        self._seq: i64 = 0
        self._spare: list[Event] = []
        """Popped events, reused by the next pushes: a new event per push costs an allocation
        and, when it dies, an unlink from the collector's list through neighbours that are
        cold when thousands of events are pending."""

    def push(self, time_s: float, kind: int, payload: Any) -> Event:
        """Schedule ``kind`` at ``time_s``; returns the pending event (valid until popped)."""
        self._seq += 1
        return self._add(self._event(time_s, (priority_of(kind) << ORDER_BITS) | self._seq, kind, payload))

    def move(self, e: Event, time_s: float, payload: Any) -> None:
        """Re-time the pending event ``e`` to ``time_s`` (with ``payload``), ordered as if pushed
        now: what pushing a new event and ignoring ``e`` would do, without ``e`` staying queued
        (a cut decode span's end: with thousands of groups, a third of the heap was stale ends)."""
        self._seq += 1
        e.time_s = time_s
        e.order = (priority_of(e.kind) << ORDER_BITS) | self._seq
        e.payload = payload
        i = e.index
        self._sift_up(e, i)
        if e.index == i:
            self._sift_down(e, i)

    def push_or_move(self, e: Optional[Event], time_s: float, kind: int, payload: Any) -> Event:
        """Schedule ``kind`` at ``time_s``, superseding ``e`` (its owner's pending event, or None):
        ``e`` is moved rather than left queued stale. Returns the pending event."""
        if e is None:
            return self.push(time_s, kind, payload)
        self.move(e, time_s, payload)
        return e

    def remove(self, e: Event) -> None:
        """Take the pending event ``e`` out of the queue (its owner went away)."""
        heap = self._heap
        i = e.index
        last = heap.pop()
        if last is not e:               # the last place's event fills the hole
            self._sift_up(last, i)
            if last.index == i:
                self._sift_down(last, i)
        e.index = -1
        self._spare.append(e)

    def reserve(self) -> i64:
        """Take a place in the same-time order now, for an event whose time is known only later
        (a device's report of a span dispatched now): pushed with :meth:`push_reserved`, it sorts
        as if it had been pushed now."""
        self._seq += 1
        return self._seq

    def push_reserved(self, time_s: float, kind: int, payload: Any, seq: i64) -> None:
        """Schedule ``kind`` at ``time_s`` in the place :meth:`reserve` took."""
        self._add(self._event(time_s, (priority_of(kind) << ORDER_BITS) | seq, kind, payload))

    def _add(self, e: Event) -> Event:
        heap = self._heap
        heap.append(e)
        i: i64 = len(heap) - 1
        if i == len(self._times):       # the arrays only grow (past the heap: unread places)
            self._times = append(self._times, 0.0)
            self._orders = append(self._orders, 0)
        self._sift_up(e, i)
        return e

    def _event(self, time_s: float, order: i64, kind: int, payload: Any) -> Event:
        spare = self._spare
        if not spare:
            return Event(time_s, order, kind, payload)
        e = spare.pop()
        e.time_s = time_s
        e.order = order
        e.kind = kind
        e.payload = payload
        return e

    # A 4-ary heap: half the levels of a binary one for the same comparisons per pop, and a
    # place's children are neighbours in the key arrays. "a before b" is written out (time,
    # then order), the moving event's keys read once: with G groups' span ends pending the heap
    # is log4(G) levels deep, and a function call per comparison was most of a level's cost.
    # Each event knows its place (``index``), so a pending one can be moved. The sifts read keys
    # from the arrays only; the moving event's own place there is written when it settles.
    def _sift_up(self, e: Event, i: i64) -> None:
        """Place ``e`` at ``i`` or above it."""
        heap = self._heap
        times = self._times
        orders = self._orders
        t = e.time_s
        order = e.order
        while i > 0:
            parent = (i - 1) >> 2
            pt = times[parent]
            po = orders[parent]
            if pt < t or (pt == t and po < order):
                break
            p = heap[parent]
            heap[i] = p
            times[i] = pt
            orders[i] = po
            p.index = i
            i = parent
        heap[i] = e
        times[i] = t
        orders[i] = order
        e.index = i

    def _sift_down(self, e: Event, i: i64) -> None:
        """Place ``e`` at ``i`` or below it."""
        heap = self._heap
        times = self._times
        orders = self._orders
        n: i64 = len(heap)
        t = e.time_s
        order = e.order
        while True:
            first = 4 * i + 1
            if first >= n:
                break
            c = first
            ct = times[c]
            co = orders[c]
            end = first + 4 if first + 4 < n else n
            j = first + 1
            while j < end:              # the earliest of the (up to four) children
                ot = times[j]
                if ot < ct or (ot == ct and orders[j] < co):
                    c = j
                    ct = ot
                    co = orders[j]
                j += 1
            if t < ct or (t == ct and order < co):
                break
            child = heap[c]
            heap[i] = child
            times[i] = ct
            orders[i] = co
            child.index = i
            i = c
        heap[i] = e
        times[i] = t
        orders[i] = order
        e.index = i

    def pop(self) -> Event:
        """Remove and return the earliest event. Read it before the next push, which reuses it
        (a tuple of its fields per pop boxed its time and order: two allocations per event)."""
        heap = self._heap
        top = heap[0]
        last = heap.pop()
        if len(heap):
            self._sift_down(last, 0)
        top.index = -1
        self._spare.append(top)
        return top

    def peek_time(self) -> float | None:
        """Time of the earliest event, or None when empty."""
        return self._times[0] if len(self._heap) else None

    def due_by(self, time_s: float) -> bool:
        """Whether an event is due at ``time_s`` or before (no boxed time, as :meth:`peek_time`
        returns, once per event)."""
        return len(self._heap) > 0 and self._times[0] <= time_s

    def __len__(self) -> int:
        return len(self._heap)


class DecisionKind:
    """Names of decision-log entries (strings, so logs read as text and Parquet)."""

    PLACE: Final = "place"            # request placed: group = prefill group
    REJECT: Final = "reject"
    PREFILL: Final = "prefill"        # span planned on a group
    DECODE: Final = "decode"          # span planned on a group
    CUT: Final = "cut"                # running decode span shortened
    ADMIT: Final = "admit"            # decode admission (KV reserved): group = decode group
    TRANSFER: Final = "transfer"      # KV transfer start: group = source
    KV_ARRIVED: Final = "kv_arrived"  # group = destination
    PREEMPT: Final = "preempt"
    COMPLETE: Final = "complete"      # group = the group that produced the last token
    CHUNK: Final = "chunk"            # mixed span planned (one decode step + prefill chunks)
    DRAIN: Final = "drain"            # a group starts draining to switch roles (role: 0 prefill, 1 decode)
    ROLE: Final = "role"              # a drained group takes its new role
    FAIL: Final = "fail"              # a group's device failed: what it held is re-placed
    RESTORE: Final = "restore"        # a failed group is back in service (empty)
    KV_BAD: Final = "kv_bad"          # KV reached its decode group damaged or lost: sent again
    CANCEL: Final = "cancel"          # the client gave up: what it held is freed (group: where it left)
    FETCH: Final = "fetch"            # prefix blocks read into a prefill group: tier 1 dram, 2 ssd, 3 store
    STORE_WRITE: Final = "store_write"  # a prefill's new prefix blocks written to the cluster KV store


DETAIL_FIELDS: dict[str, tuple[tuple[str, type], ...]] = {
    DecisionKind.PLACE: (("decode_group", int),),                  # chosen at placement (else null)
    DecisionKind.REJECT: (("reason", str),),
    DecisionKind.PREFILL: (("num_requests", int), ("prefill_tokens", int), ("cached_tokens", int),
                           ("duration_s", float)),                 # planned duration
    DecisionKind.DECODE: (("batch_size", int), ("steps", int), ("duration_s", float)),
    DecisionKind.CUT: (("steps", int), ("end_s", float)),          # the span's new length and end
    DecisionKind.ADMIT: (("blocks", int),),                        # KV blocks reserved
    DecisionKind.TRANSFER: (("dst_group", int), ("bytes", int)),
    DecisionKind.KV_ARRIVED: (),
    DecisionKind.PREEMPT: (("generated", int),),
    DecisionKind.COMPLETE: (),
    DecisionKind.CHUNK: (("batch_size", int), ("num_chunks", int), ("prefill_tokens", int), ("duration_s", float)),
    DecisionKind.DRAIN: (("role", int),),                          # 0 prefill, 1 decode
    DecisionKind.ROLE: (("role", int), ("drain_s", float)),
    DecisionKind.FAIL: (("resumed", int),),                        # requests placed again
    DecisionKind.RESTORE: (),
    DecisionKind.KV_BAD: (),
    DecisionKind.CANCEL: (),
    DecisionKind.FETCH: (("tier", int), ("tokens", int), ("bytes", int), ("duration_s", float)),
    DecisionKind.STORE_WRITE: (("blocks", int), ("bytes", int)),
}
"""The values of a decision's ``detail`` tuple, per kind: name and type. A name means the same
(and has the same type) in every kind that has it: each is one column of ``decisions.parquet``."""

DETAIL_COLUMNS: dict[str, type] = {name: typ for fields in DETAIL_FIELDS.values() for name, typ in fields}
"""Every detail field once, in first-seen order, with its type."""

KIND_NAMES: tuple[str, ...] = tuple(DETAIL_FIELDS)
"""Each kind's name by its code in the log."""


NO_ID: Final = -1
"""A decision's group or request id when it has none (it reads back as None)."""


def log_id(value: Optional[int]) -> i64:
    """``value`` as the log keeps an id (:data:`NO_ID` for None)."""
    return NO_ID if value is None else value


class DecisionCode:
    """Each :class:`DecisionKind`'s code in the log (its index in :data:`KIND_NAMES`; a test keeps
    the two in step). The scheduler logs codes: a name looked up per decision cost a dict lookup,
    and a boxed code to pack, ~3% of a run."""

    PLACE: Final = 0
    REJECT: Final = 1
    PREFILL: Final = 2
    DECODE: Final = 3
    CUT: Final = 4
    ADMIT: Final = 5
    TRANSFER: Final = 6
    KV_ARRIVED: Final = 7
    PREEMPT: Final = 8
    COMPLETE: Final = 9
    CHUNK: Final = 10
    DRAIN: Final = 11
    ROLE: Final = 12
    FAIL: Final = 13
    RESTORE: Final = 14
    KV_BAD: Final = 15
    CANCEL: Final = 16
    FETCH: Final = 17
    STORE_WRITE: Final = 18

DECISION_COLUMNS = ("time_s", "kind", "group_id", "request_id", "detail")
"""A decision reads as ``(time_s, kind, group_id | None, request_id | None, detail: tuple)``."""

TABLE_COLUMNS = ("time_s", "kind", "group_id", "request_id", "request_ids", *DETAIL_COLUMNS)
"""The columns of :meth:`DecisionLog.columns` (``decisions.parquet``): the decision, the request
ids of a span (prefill: its prompts; decode: the requests joining the batch with it — the rest
joined before and have not left; chunk: the prompts it computes a chunk of), then one column per
detail field, null where the kind has no such field."""

Decision = tuple[float, str, Optional[int], Optional[int], tuple]


PENDING_DECISIONS: Final = 1024
"""Decisions kept in fixed arrays before they are packed into the typed columns."""
_NAN: Final = math.nan


class DecisionLog:
    """Every decision of a run, in typed columns.

    A million-request run makes ~9 million decisions: as Python tuples they would take
    gigabytes, as ``array`` columns ~60 bytes each. Details are at most four numbers (NaN
    for none) plus, for rejections, the reason text. Iterating yields :data:`Decision` tuples.
    """

    def __init__(self) -> None:
        self.time_s = array("d")
        self.kind = array("b")
        self.group_id = array("q")      # -1: none (internal; reads back as None)
        self.request_id = array("q")
        self.details = (array("d"), array("d"), array("d"), array("d"))
        self.reasons: dict[int, str] = {}
        # Decisions not yet in the columns: the first ``_pending`` items of one unboxed array
        # per column, packed 1,024 at a time. Nothing is made per decision: a boxed time, id or
        # detail per decision, held until its pack, was an allocation, and a free of memory cold
        # by then when a thousand groups are simulated.
        self._pending = 0
        self._time_s = vec[float]([0.0] * PENDING_DECISIONS)
        self._kind = vec[u8]([0] * PENDING_DECISIONS)              # a DecisionCode
        self._group_id = vec[i64]([-1] * PENDING_DECISIONS)       # -1: none
        self._request_id = vec[i64]([-1] * PENDING_DECISIONS)
        self._d0 = vec[float]([math.nan] * PENDING_DECISIONS)
        self._d1 = vec[float]([math.nan] * PENDING_DECISIONS)
        self._d2 = vec[float]([math.nan] * PENDING_DECISIONS)
        self._d3 = vec[float]([math.nan] * PENDING_DECISIONS)
        # Packed decisions not yet joined into the columns: per column (time_s, kind, group_id,
        # request_id, the four details, span_rows, span_ends, span_ids), a list of bytes.
        self._chunks: list[list[bytes]] = [[] for _ in range(11)]
        self._packed = 0
        self._packed_ids = 0
        # Request ids of span decisions, as ragged rows: row index, end offset into span_ids
        # (pending ones in unboxed arrays too, packed with the rest).
        self.span_rows = array("q")
        self.span_ends = array("q")
        self.span_ids = array("q")
        self._span_rows = vec[i64]()
        self._span_ends = vec[i64]()
        self._span_ids = vec[i64]()

    def add(self, time_s: float, kind: u8, group_id: i64, request_id: i64,
            d0: float = math.nan, d1: float = math.nan, d2: float = math.nan, d3: float = math.nan) -> None:
        """Append one decision of ``kind`` (a :class:`DecisionCode`) on ``group_id`` about
        ``request_id`` (:data:`NO_ID`: none; machine ints: an optional int is a boxed one, an
        allocation per request id); ``d0..d3`` are its detail values in DETAIL_FIELDS order (NaN: none).

        Decisions wait in fixed per-column arrays and move into the typed columns 1,024 at a
        time (stores into unboxed arrays on the hot path; bounded memory).
        """
        i = self._pending
        self._time_s[i] = time_s
        self._kind[i] = kind
        self._group_id[i] = group_id
        self._request_id[i] = request_id
        # one NaN for "none" (a computed NaN may differ in its bits, and logs compare bytewise)
        self._d0[i] = d0 if d0 == d0 else _NAN
        self._d1[i] = d1 if d1 == d1 else _NAN
        self._d2[i] = d2 if d2 == d2 else _NAN
        self._d3[i] = d3 if d3 == d3 else _NAN
        self._pending = i + 1
        if i + 1 >= PENDING_DECISIONS:
            self._pack()

    def _pack(self) -> None:
        """Pending decisions into packed chunks, one bytes object per column.

        The pending arrays are machine values already: a chunk is a copy of their first bytes
        (array.extend would convert item by item through a format parser). The chunks are joined
        into the typed columns only when the log is read: growing an array by a chunk at a time
        reallocates and copies the whole column every few chunks (half the 5-group run's
        cache misses)."""
        chunks = self._chunks
        if len(self._span_rows):
            chunks[8].append(memoryview(self._span_rows).tobytes())
            chunks[9].append(memoryview(self._span_ends).tobytes())
            chunks[10].append(memoryview(self._span_ids).tobytes())
            self._packed_ids += len(self._span_ids)
            self._span_rows = vec[i64]()
            self._span_ends = vec[i64]()
            self._span_ids = vec[i64]()
        n = self._pending
        if not n:
            return
        chunks[1].append(memoryview(self._kind)[:n].tobytes())     # (codes < 128: as signed bytes too)
        for i, column in ((0, self._time_s), (4, self._d0), (5, self._d1), (6, self._d2), (7, self._d3)):
            chunks[i].append(memoryview(column)[:n].tobytes())
        chunks[2].append(memoryview(self._group_id)[:n].tobytes())
        chunks[3].append(memoryview(self._request_id)[:n].tobytes())
        self._packed += n
        self._pending = 0

    def _compact(self) -> None:
        """Every decision into the typed columns (before the log is read)."""
        self._pack()
        if not self._packed and not self._packed_ids:
            return
        columns: list[array] = [self.time_s, self.kind, self.group_id, self.request_id, *self.details,
                                self.span_rows, self.span_ends, self.span_ids]
        for column, chunks in zip(columns, self._chunks):
            if chunks:
                column.frombytes(b"".join(chunks))
                chunks.clear()
        self._packed = 0
        self._packed_ids = 0

    def add_ids(self, request_ids: list[int]) -> None:
        """The request ids of the decision just added (a span's requests)."""
        for request_id in request_ids:
            self.add_span_id(request_id)
        self.end_span_ids()

    def add_span_id(self, request_id: i64) -> None:
        """One request id of the decision just added; :meth:`end_span_ids` closes the row. (The
        scheduler adds a span's ids one by one: a list of them was a boxed id per request.)"""
        self._span_ids = append(self._span_ids, request_id)

    def end_span_ids(self) -> None:
        """The ids added since the last row are the decision just added's."""
        self._span_rows = append(self._span_rows, len(self) - 1)
        self._span_ends = append(self._span_ends, len(self.span_ids) + self._packed_ids + len(self._span_ids))

    def drain(self) -> "DecisionLog":
        """Move every decision so far into a new log and start empty (a streamed run writes
        its log out in chunks: memory holds one chunk, not the run)."""
        self._compact()
        chunk = DecisionLog()
        chunk.time_s, chunk.kind, chunk.group_id, chunk.request_id = self.time_s, self.kind, self.group_id, self.request_id
        chunk.details, chunk.reasons = self.details, self.reasons
        chunk.span_rows, chunk.span_ends, chunk.span_ids = self.span_rows, self.span_ends, self.span_ids
        self.time_s, self.kind, self.group_id, self.request_id = array("d"), array("b"), array("q"), array("q")
        self.details = (array("d"), array("d"), array("d"), array("d"))
        self.reasons = {}
        self.span_rows, self.span_ends, self.span_ids = array("q"), array("q"), array("q")
        return chunk

    def add_reject(self, time_s: float, request_id: int, reason: str) -> None:
        """Append a rejection and its reason."""
        self.reasons[len(self)] = reason
        self.add(time_s, DecisionCode.REJECT, NO_ID, request_id)

    def __len__(self) -> int:
        return len(self.time_s) + self._packed + self._pending

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DecisionLog):
            return NotImplemented
        # bytewise: "no value" is NaN, which never equals itself
        return self._column_bytes() == other._column_bytes() and self.reasons == other.reasons

    def _column_bytes(self) -> list[bytes]:
        self._compact()
        columns: list[array] = [self.time_s, self.kind, self.group_id, self.request_id, *self.details,
                                self.span_rows, self.span_ends, self.span_ids]
        return [c.tobytes() for c in columns]

    def row(self, i: int) -> Decision:
        """Decision ``i`` as a tuple."""
        self._compact()
        kind = KIND_NAMES[self.kind[i]]
        if i in self.reasons:
            detail: tuple = (self.reasons[i],)
        else:
            detail = tuple(None if math.isnan(self.details[j][i]) else typ(self.details[j][i])
                           for j, (_, typ) in enumerate(DETAIL_FIELDS[kind]))
        g, r = self.group_id[i], self.request_id[i]
        return (self.time_s[i], kind, None if g < 0 else g, None if r < 0 else r, detail)

    def __iter__(self) -> Iterator[Decision]:
        self._compact()
        return (self.row(i) for i in range(len(self.time_s)))

    def state(self) -> dict[str, Any]:
        """Plain, picklable contents (to send the log between processes)."""
        self._compact()
        return {"time_s": self.time_s, "kind": self.kind, "group_id": self.group_id,
                "request_id": self.request_id, "details": list(self.details), "reasons": self.reasons,
                "span_rows": self.span_rows, "span_ends": self.span_ends, "span_ids": self.span_ids}

    @staticmethod
    def from_state(state: dict[str, Any]) -> "DecisionLog":
        """The log :meth:`state` described."""
        log = DecisionLog()
        log.time_s = array("d", state["time_s"])
        log.kind = array("b", state["kind"])
        log.group_id = array("q", state["group_id"])
        log.request_id = array("q", state["request_id"])
        d = [array("d", column) for column in state["details"]]
        log.details = (d[0], d[1], d[2], d[3])
        log.reasons = dict(state["reasons"])
        if "span_rows" in state:          # (a log journaled before span ids were kept has none)
            log.span_rows = array("q", state["span_rows"])
            log.span_ends = array("q", state["span_ends"])
            log.span_ids = array("q", state["span_ids"])
        return log

    def columns(self) -> dict[str, list]:
        """Columns for Arrow/Parquet (:data:`TABLE_COLUMNS`): one typed value per detail field,
        None where the decision's kind has no such field."""
        self._compact()
        n = len(self.time_s)
        cols: dict[str, list] = {"time_s": self.time_s.tolist(), "kind": [KIND_NAMES[k] for k in self.kind],
                                 "group_id": [None if g < 0 else g for g in self.group_id],
                                 "request_id": [None if r < 0 else r for r in self.request_id],
                                 "request_ids": [None] * n}
        start = 0
        for row, end in zip(self.span_rows, self.span_ends):
            cols["request_ids"][row] = self.span_ids[start:end].tolist()
            start = end
        for name in DETAIL_COLUMNS:
            cols[name] = [None] * n
        for i in range(n):
            detail = self.row(i)[4]
            for (name, _), value in zip(DETAIL_FIELDS[cols["kind"][i]], detail):
                cols[name][i] = value
        return cols
