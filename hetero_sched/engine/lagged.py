"""Virtual devices behind a control plane: the simulator's prediction when messages take time.

The plain virtual devices (:class:`~hetero_sched.engine.devices.Devices`) hear of a span the
instant the core plans it, and the core hears of its end the instant it ends. A real scheduler
is a process (or a network) away from its devices: a span starts when its message lands, a cut
stops a decode span at the first step boundary after the cut *lands* (the steps made meanwhile
are made), and the core applies a span's end only when the report reaches it. The live runtime
has exactly these delays (``summary["runtime"]``: ``dispatch_delay_ms_*``, ``report_delay_ms_*``).

:class:`LaggedDevices` runs each span on the modeled device timeline the live runtime's device
actors use (:class:`~hetero_sched.engine.pacing.Timeline`), ``dispatch_s`` after the core plans
it, and reports it ``report_s`` after its end — so a run says what a control plane of that
latency costs (experiment field ``control_plane``), and can be compared with a live run whose
latency was measured. With both at 0 the simulator uses the plain virtual devices.
"""

from __future__ import annotations

from typing import Any, Optional

from hetero_sched.core.events import EventQueue, Kind
from hetero_sched.core.spans import Span, SpanReport
from hetero_sched.engine.devices import Devices
from hetero_sched.engine.pacing import Timeline, span_report


class LaggedDevices(Devices):
    """Devices that run spans as modeled, ``dispatch_s`` after the core sends them, and whose
    reports reach the core ``report_s`` after a span ends."""

    def __init__(self, dispatch_s: float, report_s: float) -> None:
        self.dispatch_s = dispatch_s
        self.report_s = report_s
        self._running: dict[int, tuple[Span, Timeline]] = {}
        """Per group: its device's span and that span's timeline on the device's clock."""

    def dispatch(self, now_s: float, span: Span, queue: EventQueue) -> None:
        lands_s = now_s + self.dispatch_s
        if span.cuts == 0:
            timeline = Timeline.of_span(span, lands_s)
            self._running[span.group_id] = (span, timeline)
        else:
            running = self._running.get(span.group_id)
            if running is None or running[0] is not span:
                return                                   # reported already: the cut came too late
            timeline = running[1]
            if lands_s < timeline.end_s():              # still running when the cut lands
                timeline.steps = timeline.stop_at(lands_s)
        # the event queued before this cut is stale now (its cut count differs): queue this one
        queue.push(timeline.end_s() + self.report_s, Kind.SPAN_END, (span, span.cuts))

    def report(self, now_s: float, payload: Any) -> Optional[SpanReport]:
        span, cuts = payload
        running = self._running.get(span.group_id)
        if cuts != span.cuts or running is None or running[0] is not span:
            return None
        del self._running[span.group_id]
        timeline = running[1]
        return span_report(span, timeline.report(timeline.steps))
