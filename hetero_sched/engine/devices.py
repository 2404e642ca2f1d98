"""Devices: where the spans the core plans run, and who reports what they did (contract §3).

The engine hands every span the core plans — and every cut of a running one — to the group's
device, and applies what the device reports back as a ``SPAN_END`` event. Two kinds exist:

- :class:`Devices` itself, the *virtual devices* of the simulator: a device that runs exactly
  to plan, so its report is the plan (:func:`~hetero_sched.core.spans.planned_report`), due at
  the planned end.
- ``RayDevices`` (``hetero_sched.runtime.devices``): one Ray actor per group runs the span —
  holding it for the cost model's duration on its own clock, or computing it for real — and
  reports asynchronously; the engine waits for reports as it waits for time.
"""

from __future__ import annotations

from typing import Any, Optional

from mypy_extensions import mypyc_attr

from hetero_sched.core.events import EventQueue, Kind
from hetero_sched.core.spans import Span, SpanReport, planned_report


@mypyc_attr(allow_interpreted_subclasses=True)
class Devices:
    """The engine's executor: runs the spans the core plans, reports them, says when landed KV
    may be used.

    This base class runs every span exactly as planned — the simulator's *virtual devices*: a
    span's report is its plan, due at its planned end, and a cut moves that end (the queued
    event is re-timed, :meth:`EventQueue.move`, not left behind stale). The live runtime's
    ``RayDevices`` overrides every method to run spans on Ray actors. (One concrete base rather
    than a Protocol: compiled, the event loop then calls it natively, a tenth of the
    simulator's time.)
    """

    def dispatch(self, now_s: float, span: Span, queue: EventQueue) -> None:
        """Run ``span`` on its group's device (a cut of a running span when ``span.cuts`` grew);
        its report becomes a ``SPAN_END`` event in ``queue``."""
        # A cut moves the span's pending end event, so none is ever stale and the event carries
        # the span alone (a tuple with its cut count lived as long as the span and died cold:
        # with a thousand groups in flight, a cache miss or two per span to free it).
        span.end_event = queue.push_or_move(span.end_event, span.end_s, Kind.SPAN_END, span)

    def report(self, now_s: float, payload: Any) -> Optional[SpanReport]:
        """The report a ``SPAN_END`` event carries (None: the span is no longer worth applying;
        devices that queue a new event at a cut use it for the superseded one)."""
        span: Span = payload
        span.end_event = None               # popped: the queue reuses it
        return planned_report(span)

    def wait(self, queue: EventQueue) -> Optional[float]:
        """Before the next event is taken: bring in what devices reported (a live run waits for
        reports or the next event's time, whichever comes first). Returns the time the core
        changed at if a device's failure was applied meanwhile (the engine plans), else None."""
        return None

    def kv_ready(self, now_s: float, transfer_id: int) -> bool:
        """Whether KV that finished its modeled transfer may be decoded from now; if not, its
        device has not reported it imported yet, and the devices queue the arrival again when
        it does."""
        return True

    def after_plan(self, now_s: float) -> bool:
        """Every decision of ``now_s`` is made: send what they asked of the devices. True if a
        device reported news meanwhile (an actor found dead): the core must decide again."""
        return False

