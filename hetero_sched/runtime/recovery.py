"""A live run's journal, and what a restarted scheduler actor recovers from it.

The scheduler actor journals (``runtime/journal.py``: msgpack, append-only, group commit) what
it must not forget if its process dies: the run's wall-clock origin, every request it accepted
(with the request's fields), the tokens each request delivered (numpy backend: real tokens),
every request's end with its result row, and the decision log and group busy times as they
grow. One commit per plan: a step's records cost one write.

When Ray restarts the scheduler actor, ``run`` is called again (``max_task_retries``) and finds
the journal: requests with a result keep it and are not served again; accepted-but-unfinished
ones arrive again at once and continue after the tokens they delivered (prefilled again with
prompt plus those tokens; the core's ``Scheduler.resumed``); the rest arrive when due. Before
that, a handshake with every group actor (``DeviceGroupActor.recover``) learns what each still
holds from the dead scheduler's run, drops it and renews the actor's incarnation, so no late
step of the old scheduler can act on the new run's state.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from hetero_sched.core.events import DecisionLog
from hetero_sched.core.request import RequestState
from hetero_sched.runtime.journal import FsyncPolicy, Journal, JournalRecord, fold

_TYPECODES = "dbqqdddd"
"""The decision log's columns (time, kind, group, request, four details), as array typecodes."""


def _columns(state: Mapping[str, Any]) -> list[array]:
    """A ``DecisionLog.state()``'s columns, in ``_TYPECODES`` order."""
    return [state["time_s"], state["kind"], state["group_id"], state["request_id"], *state["details"]]


_SPANS = ("span_rows", "span_ends", "span_ids")
"""The decision log's ragged span request ids: row of each span, end offset of its ids, the ids."""


def _log(columns: list[array], reasons: dict[int, str], spans: Sequence[array] = ()) -> DecisionLog:
    """The decision log of ``_columns``-ordered columns (and span ids, in ``_SPANS`` order)."""
    return DecisionLog.from_state({"time_s": columns[0], "kind": columns[1], "group_id": columns[2],
                                   "request_id": columns[3], "details": columns[4:], "reasons": reasons,
                                   **dict(zip(_SPANS, spans))})


def _shifted(values: Sequence[int], by: int) -> array:
    return array("q", [v + by for v in values])


@dataclass
class Recovered:
    """What a restarted scheduler takes over from its journal (empty for a fresh run)."""

    rows: list[tuple] = field(default_factory=list)
    """Result rows of the requests that finished before the restart."""
    resumed: dict[int, tuple[int, Optional[float], Optional[float], float]] = field(default_factory=dict)
    """Accepted, unfinished requests: (tokens delivered, first/second/last token times)."""
    tokens: dict[int, list[int]] = field(default_factory=dict)
    """Tokens every request delivered (numpy backend): the finished ones' outputs, and what
    the unfinished ones' prefill-again extends."""
    origin_unix_s: Optional[float] = None
    """Wall-clock time of virtual time 0 (wall clock): the restarted run keeps the timeline."""
    restarted_at_s: list[float] = field(default_factory=list)
    """Virtual times of the scheduler restarts before this one."""
    failures: list[tuple[float, int, bool]] = field(default_factory=list)
    """Group-actor deaths seen before (time, group, restarted), for the run summary."""
    kv_damaged: int = 0
    """KV imports sent again before."""
    decisions: DecisionLog = field(default_factory=DecisionLog)
    """The decision log up to the last commit before the restart."""
    busy_s: list[float] = field(default_factory=list)
    """Each group's busy time up to then (empty: none)."""

    def whole_log(self, current: DecisionLog) -> DecisionLog:
        """The run's decision log: what the earlier lives journaled, then ``current``'s."""
        if not len(self.decisions):
            return current
        before, now = self.decisions.state(), current.state()
        base = len(before["time_s"])
        cols = [array(a.typecode, a) for a in _columns(before)]
        for col, more in zip(cols, _columns(now)):
            col.extend(more)
        spans = [array("q", before[k]) for k in _SPANS]
        spans[0].extend(_shifted(now["span_rows"], base))
        spans[1].extend(_shifted(now["span_ends"], len(before["span_ids"])))
        spans[2].extend(now["span_ids"])
        return _log(cols, {**before["reasons"], **{base + i: r for i, r in now["reasons"].items()}}, spans)

    @property
    def finished_ids(self) -> set[int]:
        return {int(row[0]) for row in self.rows}


class RunJournal:
    """The scheduler actor's journal of one live run (written only from its event loop)."""

    def __init__(self, path: str | Path, fsync: FsyncPolicy | str = FsyncPolicy.NEVER) -> None:
        """``fsync``: ``never`` by default: the journal guards against the scheduler *process*
        dying, which a committed record (in the page cache) survives; a crash of this machine
        takes the driver, and so the run, with it."""
        self.journal = Journal(path, fsync=fsync)
        folded = fold(self.journal.recovered.records)
        self._accepted = set(folded.pending)
        self.recovered = Recovered(
            rows=[tuple(d["row"]) for d in folded.finished.values()],
            resumed={rid: (len(p.state.get("tokens", ())), p.state.get("first_s"), p.state.get("second_s"),
                           float(p.state.get("last_s", 0.0))) for rid, p in folded.pending.items()},
            tokens={rid: list(d["tokens"]) for rid, d in [*((i, p.state) for i, p in folded.pending.items()),
                                                             *folded.finished.items()] if d.get("tokens")},
            origin_unix_s=folded.run.get("origin_unix_s"),
            restarted_at_s=list(folded.run.get("restarted_at_s", ())),
            failures=[(float(t), int(g), bool(ok)) for t, g, ok in folded.run.get("failures", ())],
            kv_damaged=int(folded.run.get("kv_damaged", 0)),
            decisions=_joined(folded.decisions),
            busy_s=list(folded.decisions[-1]["busy_s"]) if folded.decisions else [])
        self.is_restart = bool(self.journal.recovered.records)
        self._base = len(self.recovered.decisions)
        self._logged = 0
        """Rows of this life's decision log already journaled."""
        self._logged_spans = 0
        """Span-id entries of this life's decision log already journaled."""

    def started(self, origin_unix_s: Optional[float]) -> None:
        """A fresh run's facts (its wall-clock origin), durable before any request."""
        self.journal.append(JournalRecord.run(0.0, origin_unix_s=origin_unix_s))
        self.journal.commit()

    def restarted(self, now_s: float) -> list[float]:
        """Journal this restart (at virtual time ``now_s``); every restart's time so far."""
        times = [*self.recovered.restarted_at_s, now_s]
        self.journal.append(JournalRecord.run(now_s, restarted_at_s=times))
        self.journal.commit()
        return times

    def faults(self, now_s: float, failures: Sequence[tuple[float, int, bool]], kv_damaged: int) -> None:
        """The run's fault counts so far (so a restarted scheduler reports the whole run's)."""
        self.journal.append(JournalRecord.run(now_s, failures=[list(f) for f in failures], kv_damaged=kv_damaged))

    def accepted(self, now_s: float, rs: RequestState) -> None:
        if rs.request_id not in self._accepted:
            self._accepted.add(rs.request_id)
            self.journal.append(JournalRecord.accepted(rs.request, now_s))

    def delivered(self, now_s: float, request_id: int, tokens: Sequence[int]) -> None:
        self.journal.append(JournalRecord.delivered(request_id, now_s, tokens))

    def finished(self, now_s: float, rs: RequestState, row: Sequence[Any]) -> None:
        self.accepted(now_s, rs)                     # a rejection at arrival was never placed
        self.journal.append(JournalRecord.finished(rs.request_id, now_s, row[6], row[7] or "", row))
        self._accepted.discard(rs.request_id)

    def commit(self, now_s: float, log: DecisionLog, busy_s: Sequence[float]) -> None:
        """Write what this step journaled, with the decision log's new rows and the groups' busy
        time (the run's totals), in one write."""
        state = log.state()
        start, end = self._logged, len(state["time_s"])
        if end > start:
            reasons = state["reasons"]
            first = self._logged_spans
            ends = state["span_ends"]
            lo = ends[first - 1] if first else 0
            self.journal.append(JournalRecord.decisions(
                now_s, [col[start:].tobytes() for col in _columns(state)],
                {str(self._base + i): reasons[i] for i in range(start, end) if i in reasons},   # msgpack: str keys
                busy_s=self.total_busy(busy_s), span_rows=_shifted(state["span_rows"][first:], self._base).tobytes(),
                span_lens=array("q", [e - b for b, e in zip([lo, *ends[first:-1]], ends[first:])]).tobytes(),
                span_ids=state["span_ids"][lo:].tobytes()))
            self._logged = end
            self._logged_spans = len(ends)
        self.journal.commit()

    def total_busy(self, busy_s: Sequence[float]) -> list[float]:
        """Each group's busy time over the whole run, given this life's."""
        before = self.recovered.busy_s or [0.0] * len(busy_s)
        return [a + b for a, b in zip(before, busy_s)]

    def close(self) -> None:
        self.journal.close()


def _joined(slices: Sequence[Mapping[str, Any]]) -> DecisionLog:
    """The decision log the journaled slices make up, in order."""
    cols = [array(code) for code in _TYPECODES]
    reasons: dict[int, str] = {}
    rows, ends, ids = array("q"), array("q"), array("q")
    for s in slices:
        for col, raw in zip(cols, s["columns"]):
            col.frombytes(raw)
        reasons.update({int(i): r for i, r in s["reasons"].items()})
        if "span_rows" in s:
            rows.frombytes(s["span_rows"])
            for n in array("q", s["span_lens"]):
                ends.append((ends[-1] if ends else 0) + n)
            ids.frombytes(s["span_ids"])
    return _log(cols, reasons, (rows, ends, ids))
