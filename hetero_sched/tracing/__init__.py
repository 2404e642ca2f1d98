"""OpenTelemetry traces of requests: one trace per request, simulated or live (README "Tracing").

``settings`` resolves where traces go (environment, flags); ``export`` gives each process its
own provider with a span processor that applies backpressure and counts every span;
``requests`` builds each request's span tree from the core's hooks.
"""

from __future__ import annotations

import time
from typing import Optional

from hetero_sched.core.request import RequestState
from hetero_sched.core.scheduler import Scheduler
from hetero_sched.tracing.export import ExportCounts, ProcessTracing, total
from hetero_sched.tracing.requests import RemoteFn, RequestTracer, Timeline, emit_request, emit_shipped
from hetero_sched.tracing.settings import TraceSettings, trace_settings

__all__ = ["ExportCounts", "ProcessTracing", "RequestTracer", "TraceSettings", "attach_tracer",
           "emit_shipped", "epoch_for", "total", "trace_settings"]


def epoch_for(last_arrival_s: float) -> int:
    """Wall-clock epoch (ns) for time 0 of a virtual-time run, chosen so that its last arrival
    lies at "now": a simulated hour then shows up in Jaeger's default look-back window."""
    return time.time_ns() - int(last_arrival_s * 1e9)


def attach_tracer(scheduler: Scheduler, tracing: ProcessTracing, *, model: str, epoch_ns: int,
                  remote: Optional[RemoteFn] = None) -> RequestTracer:
    """Make ``scheduler`` trace every request; its current hooks (an executor) keep working.

    Spans are counted by ``tracing``'s processor (ended, exported, dropped).
    """
    names = [g.name for g in scheduler.groups]

    def sink(rs: RequestState, tl: Timeline) -> None:
        emit_request(tracing.tracer, rs, tl, model=model, group_names=names, epoch_ns=epoch_ns, remote=remote,
                     parent=tracer.parents.pop(rs.request_id, None))

    tracer = RequestTracer(scheduler.groups, sink, inner=scheduler.hooks)
    scheduler.hooks = tracer
    return tracer
