"""The simulator: the engine with virtual devices, in virtual time, in one process."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Union

from hetero_sched.engine.assembly import ExperimentLike, build_scheduler, finish_run, resolve, tracing_summary
from hetero_sched.engine.lagged import LaggedDevices
from hetero_sched.engine.loop import run_events
from hetero_sched.experiment import build_workload
from hetero_sched.results import RunResult
from hetero_sched.runstream import RunStream
from hetero_sched.tracing import ProcessTracing, TraceSettings, attach_tracer, epoch_for
from hetero_sched.workload import Workload

__all__ = ["simulate"]


def simulate(experiment: ExperimentLike = None, *, workload: Optional[Workload] = None,
             progress: Optional[Callable[[int], None]] = None,
             trace: Optional[TraceSettings] = None, out: Optional[Union[str, Path]] = None) -> RunResult:
    """Simulate an experiment (path, mapping, :class:`Experiment`, or None for the default).

    ``workload`` replaces the experiment's own (used by rate sweeps and goodput searches).
    ``trace`` exports one OpenTelemetry trace per request, virtual times laid onto a wall-clock
    epoch; the run returns once every span is exported or counted as dropped
    (``summary["tracing"]``). Tracing only observes: the results are the same without it.

    ``out`` streams the run into that run folder as it goes (requests.parquet, decisions.parquet,
    then summary.json): memory stays bounded by what is in flight however long the run, and the
    files are the ones an in-memory run writes. The result then holds the summary and the folder
    (``records`` and ``decisions`` are None: read them with ``requests_table()`` and
    ``decisions_table()``, or from the files).
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
    stream = None if out is None else RunStream(out, scheduler, exp.slo_target, progress)
    run_events(scheduler, workload.requests(), progress if stream is None else stream.progress_fn, devices=devices)
    result = finish_run(exp, scheduler, workload, "simulated", stream)
    if tracing is not None:
        result.summary["tracing"] = tracing_summary(trace, [tracing.shutdown()])
    if stream is not None:
        result.write(stream.folder)
    return result
