"""Experiment assembly shared by the simulator and the runtime: config → core → result.

``build_scheduler`` makes the functional core of an experiment (groups, policy, predicted
output lengths); ``make_result`` turns a finished run's records and decision log into the
stamped :class:`~hetero_sched.results.RunResult` both drivers return.
"""

from __future__ import annotations

import inspect
from array import array
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from hetero_sched.catalog import resolve_assumptions, resolve_catalog
from hetero_sched.core.events import DecisionLog
from hetero_sched.core.scheduler import Scheduler
from hetero_sched.experiment import Experiment, build_groups, load_experiment, parse_experiment, profile_stamp
from hetero_sched.kvcache import build_kv_store
from hetero_sched.kvmetrics import kv_summary
from hetero_sched.metrics import Columns, GroupUsage, records_table, summarize
from hetero_sched.policies import make_policy, policy_class
from hetero_sched.predictor import predict_outputs
from hetero_sched.results import RunResult, make_stamp
from hetero_sched.runstream import REQUESTS_FILE, ParquetColumns, RunStream
from hetero_sched.tracing import ExportCounts, TraceSettings, total
from hetero_sched.workload import Workload

ExperimentLike = Union[str, Path, dict, Experiment, None]


def resolve(experiment: ExperimentLike) -> tuple[Experiment, Path]:
    """An experiment from a path, a mapping, an :class:`Experiment` or None (the shipped default)."""
    if isinstance(experiment, Experiment):
        return experiment, Path.cwd()
    if isinstance(experiment, dict):
        return parse_experiment(experiment), Path.cwd()
    return load_experiment(experiment)


def build_scheduler(exp: Experiment, workload: Workload, base_dir: Optional[Path]) -> Scheduler:
    """The core for an experiment: groups, policy, predictions (relative paths from ``base_dir``)."""
    groups = build_groups(exp, base_dir or Path.cwd())
    params = dict(exp.policy.params)
    accepted = _init_params(exp.policy.name)
    slo = exp.slo_target       # policies that take these get the experiment's seed and SLO by default
    for key, value in (("seed", exp.seed), ("ttft_slo_s", slo.ttft_s), ("tpot_slo_s", slo.tpot_s)):
        if key in accepted and key not in params:
            params[key] = value
    policy = make_policy(exp.policy.name, params)
    predicted = predict_outputs(exp.predictor_spec, workload, exp.seed)
    window = resolve_catalog(exp.overrides, exp.catalog_data).model(exp.model).max_context_tokens
    store = build_kv_store(exp.kv_cache, exp.overrides, exp.catalog_data, groups)
    # array('q'), not a list: 8 bytes a request instead of ~36 (ten million requests: 80 MB, not 360)
    return Scheduler(groups, policy, array("q", predicted.astype(np.int64).tobytes()), exp.report_interval_s, layerwise=exp.layerwise,
                     max_inflight=exp.admission.max_inflight, max_context_tokens=window, store=store)


def _init_params(policy_name: str) -> list[str]:
    return list(inspect.signature(policy_class(policy_name).__init__).parameters)


def finish_run(exp: Experiment, scheduler: Scheduler, workload: Workload, clock: str,
               stream: Optional[RunStream] = None) -> RunResult:
    """A finished run's core → a stamped :class:`RunResult`; with ``stream``, its records and
    decisions are closed into the stream's folder and the summary is read back from there."""
    usage = [GroupUsage(g.name, g.device, g.role.value, g.busy_s, g.cost.dollars_per_hour, g.decode_seq_s,
                        g.kv_block_s, g.limits.max_num_seqs, g.kv.num_blocks) for g in scheduler.groups]
    if stream is None:
        result = make_result(exp, scheduler.records, scheduler.decisions, usage, workload, clock)
        table: Columns = result.records
    else:
        folder = stream.close()
        table = ParquetColumns(folder / REQUESTS_FILE)
        result = RunResult(exp.model_dump(mode="json"), _summary(exp, table, usage), None, None,
                           _stamp(exp, workload, clock), folder=folder)
    kv = kv_summary(table, scheduler.groups, scheduler.store, workload)
    if kv is not None:
        result.summary["kv_cache"] = kv
    return result


def make_result(exp: Experiment, records: list[tuple], decisions: DecisionLog, usage: list[GroupUsage],
                workload: Workload, clock: str) -> RunResult:
    """Records → metrics → a stamped :class:`RunResult` (shared by the simulator and the runtime)."""
    table = records_table(records, exp.slo_target)
    return RunResult(exp.model_dump(mode="json"), _summary(exp, table, usage), table, decisions,
                     _stamp(exp, workload, clock))


def _summary(exp: Experiment, table: Columns, usage: list[GroupUsage]) -> dict[str, Any]:
    summary = summarize(table, exp.slo_target, usage)
    summary["experiment"] = exp.name
    summary["policy"] = exp.policy.name
    return summary


def _stamp(exp: Experiment, workload: Workload, clock: str) -> dict[str, Any]:
    stamp = make_stamp(resolve_assumptions(exp.overrides, extra=exp.catalog_data), workload.source, clock)
    stamp["profiles"] = profile_stamp(exp)
    return stamp


def tracing_summary(settings: Optional[TraceSettings], counts: list[ExportCounts]) -> dict[str, Any]:
    """Spans ended/exported/dropped over every process of a run, and where they went."""
    t = total(counts)
    return {"endpoint": settings.traces_url if settings else None, "spans_ended": t.ended,
            "spans_exported": t.exported, "spans_dropped": t.dropped, "processes": len(counts)}
