"""The simulator: the engine with virtual devices, in virtual time, in one process."""

from __future__ import annotations

from typing import Callable, Optional

from hetero_sched.engine.assembly import ExperimentLike, build_scheduler, finish_run, resolve, tracing_summary
from hetero_sched.engine.lagged import LaggedDevices
from hetero_sched.engine.loop import run_events
from hetero_sched.experiment import build_workload
from hetero_sched.results import RunResult
from hetero_sched.tracing import ProcessTracing, TraceSettings, attach_tracer, epoch_for
from hetero_sched.workload import Workload

__all__ = ["simulate"]


def simulate(experiment: ExperimentLike = None, *, workload: Optional[Workload] = None,
             progress: Optional[Callable[[int], None]] = None,
             trace: Optional[TraceSettings] = None) -> RunResult:
    """Simulate an experiment (path, mapping, :class:`Experiment`, or None for the default).

    ``workload`` replaces the experiment's own (used by rate sweeps and goodput searches).
    ``trace`` exports one OpenTelemetry trace per request, virtual times laid onto a wall-clock
    epoch; the run returns once every span is exported or counted as dropped
    (``summary["tracing"]``). Tracing only observes: the results are the same without it.
    """
    exp, base = resolve(experiment)
    if workload is None:
        workload = build_workload(exp.workload, exp.seed, base)
    scheduler = build_scheduler(exp, workload, base)
    tracing = None
    if trace is not None:
        tracing = ProcessTracing(trace, instance="simulator")
        last = float(workload.arrival_s[-1]) if len(workload) else 0.0
        attach_tracer(scheduler, tracing, model=exp.model, epoch_ns=epoch_for(last))
    lag = exp.control_plane
    devices = (LaggedDevices(lag.dispatch_ms / 1e3, lag.report_ms / 1e3)
               if lag.dispatch_ms > 0 or lag.report_ms > 0 else None)
    run_events(scheduler, workload.requests(), progress, devices=devices)
    result = finish_run(exp, scheduler, workload, "simulated")
    if tracing is not None:
        result.summary["tracing"] = tracing_summary(trace, [tracing.shutdown()])
    return result
