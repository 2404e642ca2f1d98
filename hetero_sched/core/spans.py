"""Spans: what a group runs, what its device reports back, and the closed-form maths of both.

A group runs one *span* at a time (DESIGN contract §1): a prefill iteration over a batch of
prompts, or up to ``k`` decode steps of the running batch. Inside a decode span the batch and
the step-time line ``a + s·context`` are fixed and the context grows by ``b`` tokens a step, so
its duration is an arithmetic series: ``k·a + s·(k·C0 + b·k(k-1)/2)``.

The core *plans* a span and its expected end; a *device* runs it and answers with a
:class:`SpanReport` — when it really started and ended, how many steps it really made — and
the core applies the report, not the plan (contract §3). :func:`planned_report` is what a
device that runs exactly to plan reports (the simulator's virtual devices); a device emulator
that runs slower, or a real backend, reports what it measured.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Any, Optional

from mypy_extensions import mypyc_attr

from hetero_sched.core.request import RequestState
from hetero_sched.core.kvtiers import PrefixPlan
from hetero_sched.costmodel import Line


class SpanKind(Enum):
    PREFILL = "prefill"
    DECODE = "decode"
    MIXED = "mixed"
    """Chunked prefill (Sarathi-Serve): one decode step of the running batch plus prefill chunks."""


class Span:
    """A planned span of one group. ``span_id`` names it; ``cuts`` counts how often the core
    shortened it since it started (each cut moves the expected end: an older end is stale).

    A plain class, not a dataclass: compiled, a dataclass's generated ``__init__`` stays
    interpreted, and a span is made for every prefill and decode span of a run.
    """

    def __init__(self, group_id: int, span_id: int, kind: SpanKind, start_s: float, duration_s: float,
                 steps: int, batch: list[RequestState], line: Line = (0.0, 0.0), batch_size: int = 0,
                 context0: int = 0, new_tokens: int = 0, cached_tokens: int = 0,
                 chunks: tuple[tuple[RequestState, int, int], ...] = ()) -> None:
        self.group_id = group_id
        self.span_id = span_id
        self.cuts = 0
        self.kind = kind
        self.start_s = start_s
        self.duration_s = duration_s
        """The cost model's duration (what a modeled device holds the span for, at its own pace)."""
        self.end_s = start_s + duration_s
        """The core's expectation (what policies predict with; a deadline for a silent device)."""
        self.steps = steps
        """Steps expected (a cut lowers it); the device reports how many it really made."""
        self.planned_steps = steps
        """Steps the device was asked for: it may stop sooner, never later."""
        self.batch = batch
        """Prefill: the prompts. Decode and mixed: the requests joining the batch in this span."""
        self.line = line
        self.batch_size = batch_size
        self.context0 = context0
        self.new_tokens = new_tokens
        self.cached_tokens = cached_tokens
        self.chunks = chunks
        """Mixed spans: ``(request, start, end)`` — prefill-token positions this span computes."""
        self.fetches: tuple[tuple[RequestState, PrefixPlan], ...] = ()
        """With KV tiers: each prompt starting here and how it reuses its prefix (reads from lower tiers)."""
        self.end_event: Any = None
        """The virtual devices' pending ``SPAN_END`` event for it, re-timed at a cut."""


@mypyc_attr(acyclic=True)
class SpanReport:
    """What a device says a span did: the facts the core applies (contract §3).

    Times are on the run's clock. ``steps`` is how many decode steps it completed (prefill: 1;
    at most what was planned — fewer if it was cut or fell short). ``first_step_end_s`` is when
    its first step's tokens were out (a joiner's token 2) and ``max_step_s`` its longest step
    (the largest inter-token gap inside the span).
    """

    __slots__ = ("group_id", "span_id", "start_s", "end_s", "steps", "first_step_end_s", "max_step_s")

    def __init__(self, group_id: int, span_id: int, start_s: float, end_s: float, steps: int,
                 first_step_end_s: float, max_step_s: float) -> None:
        self.group_id = group_id
        self.span_id = span_id
        self.start_s = start_s
        self.end_s = end_s
        self.steps = steps
        self.first_step_end_s = first_step_end_s
        self.max_step_s = max_step_s

    def to_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in self.__slots__}


@mypyc_attr(acyclic=True)
class SpanOutcome:
    """What a finished span changed, for the scheduler to act on (plain class: see :class:`Span`)."""

    def __init__(self) -> None:
        self.prefilled: list[RequestState] = []
        self.completed: list[RequestState] = []
        self.preempted: list[RequestState] = []
        self.failed: list[RequestState] = []
        """Requests that can never fit this group's KV (reject with a reason)."""
        self.cancelled: list[RequestState] = []
        """Requests whose client gave up, out of the batch at this step boundary."""

    def clear(self) -> None:
        """Empty, to be filled again: the scheduler reuses one outcome for every span end (six
        objects fewer to make, track and free per span). An empty list is left alone: a
        compiled ``clear()`` is a generic slice deletion, 2% of a run when done on all five."""
        if self.prefilled:
            self.prefilled.clear()
        if self.completed:
            self.completed.clear()
        if self.preempted:
            self.preempted.clear()
        if self.failed:
            self.failed.clear()
        if self.cancelled:
            self.cancelled.clear()


def decode_span_duration(line: Line, context0: int, batch_size: int, steps: int) -> float:
    """Time of ``steps`` decode steps on one step-time line, context growing by the batch size."""
    a, s = line
    return steps * a + s * (steps * context0 + batch_size * steps * (steps - 1) / 2)


def steps_until(line: Line, context0: int, batch_size: int, elapsed_s: float) -> int:
    """Smallest ``j >= 1`` whose cumulative step time reaches ``elapsed_s`` (next step boundary)."""
    a, s = line
    qa = s * batch_size / 2
    qb = a + s * context0 - qa
    if qa > 0:
        j = math.ceil((-qb + math.sqrt(qb * qb + 4 * qa * elapsed_s)) / (2 * qa))
    else:
        j = math.ceil(elapsed_s / qb)
    j = max(j, 1)
    while j > 1 and decode_span_duration(line, context0, batch_size, j - 1) >= elapsed_s:
        j -= 1
    while decode_span_duration(line, context0, batch_size, j) < elapsed_s:
        j += 1
    return j


def active_line(lines: tuple[Line, ...], context: int, batch_size: int) -> tuple[Line, Optional[int]]:
    """The line giving the step time at ``context``, and for how many steps it stays so (None: forever).

    That count is the roofline kink seen from here: the first step whose context passes the
    point where a steeper line overtakes.
    """
    best = lines[0]
    best_val = best[0] + best[1] * context
    for ln in lines[1:]:
        val = ln[0] + ln[1] * context
        if val > best_val or (val == best_val and ln[1] > best[1]):
            best, best_val = ln, val
    limit: Optional[int] = None
    a, s = best
    for a2, s2 in lines:
        if s2 > s:
            crossing = (a - a2) / (s2 - s)
            k = math.floor((crossing - context) / batch_size) + 1
            if limit is None or k < limit:
                limit = k
    return best, (max(limit, 1) if limit is not None else None)


def planned_report(span: Span) -> SpanReport:
    """The report of a device that runs ``span`` exactly as planned (a virtual device)."""
    start, end = span.start_s, span.end_s
    if span.kind is SpanKind.DECODE:
        a, s = span.line
        c0 = span.context0
        first = start + a + s * c0
        longest = max(a + s * c0, a + s * (c0 + span.batch_size * (span.steps - 1)))
        return SpanReport(span.group_id, span.span_id, start, end, span.steps, first, longest)
    # a prefill, or a mixed iteration: its one decode step (if any) ends with it
    return SpanReport(span.group_id, span.span_id, start, end, span.steps, end, end - start)
