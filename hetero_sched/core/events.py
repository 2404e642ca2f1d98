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
from enum import IntEnum
from typing import Any, Final, Iterable


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


DETAIL_FIELDS: dict[str, tuple[str, ...]] = {
    DecisionKind.PLACE: ("decode_group",),
    DecisionKind.REJECT: ("reason",),
    DecisionKind.PREFILL: ("n", "tokens", "cached", "dur"),
    DecisionKind.DECODE: ("b", "k", "dur"),
    DecisionKind.CUT: ("k", "end"),
    DecisionKind.ADMIT: ("blocks",),
    DecisionKind.TRANSFER: ("dst", "bytes"),
    DecisionKind.KV_ARRIVED: (),
    DecisionKind.PREEMPT: ("generated",),
    DecisionKind.COMPLETE: (),
}
"""What the values of a decision's ``detail`` tuple are, per kind."""

DECISION_COLUMNS = ("time_s", "kind", "group_id", "request_id", "detail")
"""A decision is the tuple ``(time_s, kind, group_id | None, request_id | None, detail: tuple)``.

The detail stays a tuple of numbers while the run goes (formatting strings on the hot path
would cost more than the decision itself) and becomes ``"n=2 tokens=900 ..."`` text when
written out.
"""


def format_detail(kind: str, detail: tuple) -> str:
    """``detail`` as ``name=value`` text (floats in full precision, so logs compare exactly)."""
    return " ".join(f"{name}={value!r}" if isinstance(value, float) else f"{name}={value}"
                    for name, value in zip(DETAIL_FIELDS[kind], detail) if value is not None)


def decisions_to_columns(decisions: Iterable[tuple]) -> dict[str, list]:
    """Columns of a decision log, ready for Arrow/Parquet."""
    cols: dict[str, list] = {name: [] for name in DECISION_COLUMNS}
    for time_s, kind, group_id, request_id, detail in decisions:
        cols["time_s"].append(time_s)
        cols["kind"].append(kind)
        cols["group_id"].append(group_id)
        cols["request_id"].append(request_id)
        cols["detail"].append(format_detail(kind, detail))
    return cols
