"""Events, their same-time order, and the decision log (DESIGN contract §2).

Events are ``(time_s, priority, seq, kind, payload)`` tuples on a heap. At the same time,
lower priority runs first — completions (span ends), then KV arrivals (transfer events), then
request arrivals — and the scheduler's decisions run after every event of that time (the
drivers call :meth:`~hetero_sched.core.scheduler.Scheduler.plan` once the clock is about to
move). ``seq`` is monotonic, so the remaining ties keep insertion order and a run is
reproducible bit for bit.
"""

from __future__ import annotations

import math
import struct
from array import array
from heapq import heappop, heappush   # compiled: a global lookup, not a module getattr per event
from typing import Any, Final, Iterator, Optional


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


PRIORITY_OF: Final = (Priority.SPAN_END, Priority.TRANSFER, Priority.TRANSFER, Priority.ARRIVAL)
"""Priority of each kind, indexed by kind."""


class EventQueue:
    """A heap of events with a deterministic same-time order."""

    __slots__ = ("_heap", "_seq")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, int, int, Any]] = []
        self._seq = 0

    def push(self, time_s: float, kind: int, payload: Any) -> None:
        """Schedule ``kind`` at ``time_s``."""
        self._seq += 1
        heappush(self._heap, (time_s, PRIORITY_OF[kind], self._seq, kind, payload))

    def pop(self) -> tuple[float, int, int, int, Any]:
        """Remove and return the earliest event."""
        return heappop(self._heap)

    def peek_time(self) -> float | None:
        """Time of the earliest event, or None when empty."""
        return self._heap[0][0] if self._heap else None

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
    FETCH: Final = "fetch"            # prefix blocks read into a prefill group: tier 1 dram, 2 ssd, 3 store
    STORE_WRITE: Final = "store_write"  # a prefill's new prefix blocks written to the cluster KV store


DETAIL_FIELDS: dict[str, tuple[tuple[str, type], ...]] = {
    DecisionKind.PLACE: (("decode_group", int),),
    DecisionKind.REJECT: (("reason", str),),
    DecisionKind.PREFILL: (("n", int), ("tokens", int), ("cached", int), ("dur", float)),
    DecisionKind.DECODE: (("b", int), ("k", int), ("dur", float)),
    DecisionKind.CUT: (("k", int), ("end", float)),
    DecisionKind.ADMIT: (("blocks", int),),
    DecisionKind.TRANSFER: (("dst", int), ("bytes", int)),
    DecisionKind.KV_ARRIVED: (),
    DecisionKind.PREEMPT: (("generated", int),),
    DecisionKind.COMPLETE: (),
    DecisionKind.CHUNK: (("b", int), ("n", int), ("tokens", int), ("dur", float)),
    DecisionKind.DRAIN: (("role", int),),
    DecisionKind.ROLE: (("role", int), ("drain_s", float)),
    DecisionKind.FAIL: (("resumed", int),),
    DecisionKind.RESTORE: (),
    DecisionKind.KV_BAD: (),
    DecisionKind.FETCH: (("tier", int), ("tokens", int), ("bytes", int), ("dur", float)),
    DecisionKind.STORE_WRITE: (("blocks", int), ("bytes", int)),
}
"""The values of a decision's ``detail`` tuple, per kind: name and type."""

KIND_NAMES: tuple[str, ...] = tuple(DETAIL_FIELDS)
_KIND_CODES: dict[str, int] = {name: i for i, name in enumerate(KIND_NAMES)}

DECISION_COLUMNS = ("time_s", "kind", "group_id", "request_id", "detail")
"""A decision reads as ``(time_s, kind, group_id | None, request_id | None, detail: tuple)``."""

Decision = tuple[float, str, Optional[int], Optional[int], tuple]


def format_detail(kind: str, detail: tuple) -> str:
    """``detail`` as ``name=value`` text (floats in full precision, so logs compare exactly)."""
    return " ".join(f"{name}={value!r}" if isinstance(value, float) else f"{name}={value}"
                    for (name, _), value in zip(DETAIL_FIELDS[kind], detail) if value is not None)


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
        # Decisions not yet in the columns: one list per column, packed 64k at a time.
        self._time_s: list[float] = []
        self._kind: list[str] = []
        self._group_id: list[int] = []
        self._request_id: list[int] = []
        self._details: tuple[list[float], list[float], list[float], list[float]] = ([], [], [], [])

    def add(self, time_s: float, kind: str, group_id: Optional[int], request_id: Optional[int],
            d0: float = math.nan, d1: float = math.nan, d2: float = math.nan, d3: float = math.nan) -> None:
        """Append one decision; ``d0..d3`` are its detail values in DETAIL_FIELDS order (NaN: none).

        Decisions wait in per-column lists and move into the typed columns 64k at a time
        (list appends on the hot path; bounded memory).
        """
        self._time_s.append(time_s)
        self._kind.append(kind)
        self._group_id.append(-1 if group_id is None else group_id)
        self._request_id.append(-1 if request_id is None else request_id)
        p0, p1, p2, p3 = self._details
        p0.append(d0)
        p1.append(d1)
        p2.append(d2)
        p3.append(d3)
        if len(self._time_s) >= 65536:
            self._compact()

    def _compact(self) -> None:
        n = len(self._time_s)
        if not n:
            return
        # array.extend converts item by item through a format parser, and compiled code unboxes
        # a whole row tuple to read one field (together a quarter of a run's instructions);
        # struct packs a whole column list at C speed, into the same bytes.
        self.time_s.frombytes(struct.pack(f"{n}d", *self._time_s))
        codes = _KIND_CODES
        self.kind.frombytes(struct.pack(f"{n}b", *[codes[k] for k in self._kind]))
        self.group_id.frombytes(struct.pack(f"{n}q", *self._group_id))
        self.request_id.frombytes(struct.pack(f"{n}q", *self._request_id))
        for column, pending in zip(self.details, self._details):
            column.frombytes(struct.pack(f"{n}d", *pending))
            pending.clear()
        self._time_s.clear()
        self._kind.clear()
        self._group_id.clear()
        self._request_id.clear()

    def add_reject(self, time_s: float, request_id: int, reason: str) -> None:
        """Append a rejection and its reason."""
        self.reasons[len(self)] = reason
        self.add(time_s, DecisionKind.REJECT, None, request_id)

    def __len__(self) -> int:
        return len(self.time_s) + len(self._time_s)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DecisionLog):
            return NotImplemented
        # bytewise: "no value" is NaN, which never equals itself
        return self._column_bytes() == other._column_bytes() and self.reasons == other.reasons

    def _column_bytes(self) -> list[bytes]:
        self._compact()
        columns: list[array] = [self.time_s, self.kind, self.group_id, self.request_id, *self.details]
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
                "request_id": self.request_id, "details": list(self.details), "reasons": self.reasons}

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
        return log

    def columns(self) -> dict[str, list]:
        """Columns for Arrow/Parquet, the detail formatted as ``name=value`` text."""
        cols: dict[str, list] = {name: [] for name in DECISION_COLUMNS}
        for time_s, kind, group_id, request_id, detail in self:
            cols["time_s"].append(time_s)
            cols["kind"].append(kind)
            cols["group_id"].append(group_id)
            cols["request_id"].append(request_id)
            cols["detail"].append(format_detail(kind, detail))
        return cols
