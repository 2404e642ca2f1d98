"""Events, their same-time order, and the decision log (DESIGN contract §2).

Events are ``(time_s, priority, seq, kind, payload)`` tuples on a heap. At the same time,
lower priority runs first — completions (span ends), then KV arrivals (transfer events), then
request arrivals — and the scheduler's decisions run after every event of that time (the
drivers call :meth:`~hetero_sched.core.scheduler.Scheduler.plan` once the clock is about to
move). ``seq`` is monotonic, so the remaining ties keep insertion order and a run is
reproducible bit for bit.
"""

from __future__ import annotations

import heapq
import math
from array import array
from enum import IntEnum
from typing import Any, Final, Iterator, Optional


class Priority(IntEnum):
    """Same-time order of events (lower first)."""

    SPAN_END = 0
    TRANSFER = 1
    ARRIVAL = 2


class Kind(IntEnum):
    """What an event is; the payload's meaning depends on it."""

    SPAN_END = 0      # payload: (group_id, span_token)
    TRANSFER = 1      # payload: network token (the transfer network's next change)
    KV_ARRIVAL = 2    # payload: transfer_id
    ARRIVAL = 3       # payload: Request


PRIORITY_OF = {Kind.SPAN_END: Priority.SPAN_END, Kind.TRANSFER: Priority.TRANSFER,
               Kind.KV_ARRIVAL: Priority.TRANSFER, Kind.ARRIVAL: Priority.ARRIVAL}


class EventQueue:
    """A heap of events with a deterministic same-time order."""

    __slots__ = ("_heap", "_seq")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, int, int, Any]] = []
        self._seq = 0

    def push(self, time_s: float, kind: Kind, payload: Any) -> None:
        """Schedule ``kind`` at ``time_s``."""
        self._seq += 1
        heapq.heappush(self._heap, (time_s, PRIORITY_OF[kind], self._seq, kind, payload))

    def pop(self) -> tuple[float, int, int, int, Any]:
        """Remove and return the earliest event."""
        return heapq.heappop(self._heap)

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

    def add(self, time_s: float, kind: str, group_id: Optional[int], request_id: Optional[int],
            detail: tuple) -> None:
        """Append one decision."""
        self.time_s.append(time_s)
        self.kind.append(_KIND_CODES[kind])
        self.group_id.append(-1 if group_id is None else group_id)
        self.request_id.append(-1 if request_id is None else request_id)
        nan = math.nan
        d = self.details
        n = len(detail)
        if kind == DecisionKind.REJECT:
            self.reasons[len(self.time_s) - 1] = str(detail[0])
            n = 0
        for i in range(4):
            v = detail[i] if i < n else None
            d[i].append(nan if v is None else float(v))

    def __len__(self) -> int:
        return len(self.time_s)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DecisionLog):
            return NotImplemented
        # bytewise: "no value" is NaN, which never equals itself
        mine = (self.time_s, self.kind, self.group_id, self.request_id, *self.details)
        theirs = (other.time_s, other.kind, other.group_id, other.request_id, *other.details)
        return (all(a.tobytes() == b.tobytes() for a, b in zip(mine, theirs))
                and self.reasons == other.reasons)

    def row(self, i: int) -> Decision:
        """Decision ``i`` as a tuple."""
        kind = KIND_NAMES[self.kind[i]]
        if i in self.reasons:
            detail: tuple = (self.reasons[i],)
        else:
            detail = tuple(None if math.isnan(self.details[j][i]) else typ(self.details[j][i])
                           for j, (_, typ) in enumerate(DETAIL_FIELDS[kind]))
        g, r = self.group_id[i], self.request_id[i]
        return (self.time_s[i], kind, None if g < 0 else g, None if r < 0 else r, detail)

    def __iter__(self) -> Iterator[Decision]:
        return (self.row(i) for i in range(len(self.time_s)))

    def state(self) -> dict[str, Any]:
        """Plain, picklable contents (to send the log between processes)."""
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
