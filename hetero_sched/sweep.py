"""Sweeps: a grid of experiments over any config fields, run as Ray tasks, resumable, one Parquet.

A sweep file names a base experiment and its axes::

    name: policies-x-mixes
    experiment: experiment.yaml          # a path (relative to this file) or an inline mapping
    axes:
      policy.name: [disagg, colocated]   # a list: values of that field (a dotted path)
      workload.rate_per_s: [2, 4, 8]
      groups:                            # a mapping: named alternatives for that field
        trn2x4+cs3x4: [...]
        h100x48: [...]
      setup:                             # not a field: each named alternative sets several
        cs3-own-prefill: {groups: [...], policy.name: colocated}
    set: {workload.num_requests: 1000}   # optional: fields set on the base before the axes
    goodput: {tiers: [standard, high-speed]}   # optional: a goodput search per point and tier
    save_runs: true                      # keep each point's run folder (for `hetero-sched report`)

Paths index lists by position (``groups.0.count``); ``overrides.<key>`` sets one override
(its key is itself dotted: ``overrides.cost.cs3.dollars_per_hour``). Every point is validated
before anything runs: a bad axis is one line naming it (exit status 2).

Each point runs as one Ray task (``num_cpus=1``) and returns its row and run files; the driver
alone writes ``points/<id>/`` — the id is a hash of the point's experiment and the goodput
request, so a rerun finds finished points and does not run them again — and finally
``sweep.parquet``, one row per point: the axes, summary metrics and goodput columns.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Optional, Sequence, Union

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from hetero_sched.catalog import resolve_catalog
from hetero_sched.configfile import expect_mapping, read_yaml, set_path, shipped_or_path, validate
from hetero_sched.goodput import tier_slo
from hetero_sched.metrics import short_trace_warning
from hetero_sched.results import ensure_folder
from hetero_sched.errors import UserError
from hetero_sched.experiment import (EXPERIMENT_FIELDS, Experiment, build_groups, build_workload,
                                     load_experiment, parse_experiment)
from hetero_sched.policies import make_policy

POINTS_DIR = "points"
TABLE = "sweep.parquet"


class GoodputConfig(BaseModel):
    """Which goodput searches a sweep runs per point."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    tiers: tuple[Literal["standard", "high-speed"], ...] = ("standard", "high-speed")
    rel_tol: float = Field(0.02, gt=0, lt=1)
    roles: Optional[Literal["configured", "any"]] = None
    """Which roles the bound lets groups take (default: ``any`` for role-switching or fallback policies)."""


class RatioConfig(BaseModel):
    """A ratio the sweep defines: the best ``metric`` over the numerator's points divided by the
    best over the denominator's (each side selects points by axis labels)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    numerator: dict[str, list[str]] = Field(min_length=1)
    denominator: dict[str, list[str]] = Field(min_length=1)
    metric: str = Field(min_length=1, description="a sweep.parquet column, e.g. goodput_tokens_per_s_high_speed")


class SweepFile(BaseModel):
    """The sweep file's schema (validated; one-line errors)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = "sweep"
    experiment: Union[str, dict[str, Any], None] = None
    axes: dict[str, Union[list[Any], dict[str, Any]]] = Field(default_factory=dict)
    set: dict[str, Any] = Field(default_factory=dict)
    goodput: Optional[GoodputConfig] = None
    save_runs: bool = True
    ratios: dict[str, RatioConfig] = Field(default_factory=dict)


@dataclass(frozen=True)
class Axis:
    """One axis: labelled alternatives, each a set of ``dotted path → value`` assignments."""

    name: str
    labels: tuple[str, ...]
    values: tuple[Any, ...]
    """What the axis column holds per alternative (the value itself, or its label)."""
    settings: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class Point:
    """One experiment of the grid."""

    point_id: str
    axes: dict[str, Any]
    experiment: dict[str, Any]


@dataclass(frozen=True)
class Sweep:
    """A parsed sweep: the base experiment (paths made absolute), its axes and what to measure."""

    name: str
    base: dict[str, Any]
    axes: tuple[Axis, ...]
    goodput: Optional[GoodputConfig]
    save_runs: bool = True
    source: str = "sweep"
    ratios: tuple[tuple[str, RatioConfig], ...] = ()


@dataclass
class PointResult:
    """What a point's task returns: its row and the files of its run folder."""

    row: dict[str, Any]
    files: dict[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class SweepOutcome:
    """A finished sweep: where its table is, and how many points were run now vs reused."""

    table_path: Path
    rows: list[dict[str, Any]]
    computed: int
    reused: int
    warnings: list[str] = field(default_factory=list)
    """Points whose goodput rests on a trace too short for its rate (:func:`short_trace_warning`)."""


# --- parsing ------------------------------------------------------------------------------
def _label(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def absolute_paths(exp: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """A copy of an experiment mapping whose trace and profile paths no longer depend on the cwd."""
    out = copy.deepcopy(exp)
    wl = out.get("workload")
    if isinstance(wl, dict) and isinstance(wl.get("path"), str) and not Path(wl["path"]).is_absolute():
        wl["path"] = str((base_dir / wl["path"]).resolve())
    for g in out.get("groups") or []:
        if isinstance(g, dict) and isinstance(g.get("cost_profile"), str) and not Path(g["cost_profile"]).is_absolute():
            g["cost_profile"] = str((base_dir / g["cost_profile"]).resolve())
    return out


def _field_path(source: str, axis: str, path: str) -> None:
    if path.split(".")[0] not in EXPERIMENT_FIELDS:
        raise UserError(f"{source}: axis {axis!r}: {path.split('.')[0]!r} is not an experiment field "
                        f"(fields: {', '.join(EXPERIMENT_FIELDS)})")


def parse_axis(source: str, name: str, spec: Union[list[Any], dict[str, Any]]) -> Axis:
    """One axis from its file form (see the module docstring)."""
    if not spec:
        raise UserError(f"{source}: axis {name!r} has no values")
    is_field = name.split(".")[0] in EXPERIMENT_FIELDS
    if isinstance(spec, list):
        _field_path(source, name, name)
        labels = tuple(_label(v) for v in spec)
        if len(set(labels)) != len(labels):
            raise UserError(f"{source}: axis {name!r} repeats a value")
        return Axis(name, labels, tuple(v if isinstance(v, (int, float, str, bool)) else _label(v) for v in spec),
                    tuple({name: v} for v in spec))
    labels = tuple(str(k) for k in spec)
    if is_field:
        return Axis(name, labels, labels, tuple({name: v} for v in spec.values()))
    settings = []
    for label, value in spec.items():
        if not isinstance(value, dict) or not value:
            raise UserError(f"{source}: axis {name!r}: {name.split('.')[0]!r} is not an experiment field, so "
                            f"each alternative must map fields to values (alternative {label!r} does not); "
                            f"fields: {', '.join(EXPERIMENT_FIELDS)}")
        for path in value:
            _field_path(source, f"{name}.{label}", str(path))
        settings.append({str(k): v for k, v in value.items()})
    return Axis(name, labels, labels, tuple(settings))


def parse_sweep(data: Any, base_dir: Path, source: str = "sweep",
                sets: Sequence[tuple[str, Any]] = ()) -> Sweep:
    """Validate a sweep mapping (relative paths resolve against ``base_dir``); ``sets`` (from
    ``--set``) change the base experiment after the file's own ``set:``."""
    spec = validate(SweepFile, expect_mapping(data, source, "sweep"), source)
    if spec.experiment is None or isinstance(spec.experiment, str):
        exp_path = None if spec.experiment is None else (base_dir / spec.experiment)
        exp, exp_dir = load_experiment(exp_path)
        base = absolute_paths(exp.model_dump(mode="json"), exp_dir)
    else:
        base = absolute_paths(parse_experiment(spec.experiment, f"{source}: experiment", base_dir)
                              .model_dump(mode="json"), base_dir)
    for label, (path, value) in [*((f"set.{p}", (p, v)) for p, v in spec.set.items()),
                                 *((f"--set {p}", (p, v)) for p, v in sets)]:
        _field_path(source, label, path)
        try:
            set_path(base, path, value)
        except UserError as exc:
            raise UserError(f"{source}: {label}: {exc}") from None
    axes = tuple(parse_axis(source, name, values) for name, values in spec.axes.items())
    for rname, ratio in spec.ratios.items():
        for side in (ratio.numerator, ratio.denominator):
            for axis_name, labels in side.items():
                axis = next((a for a in axes if a.name == axis_name), None)
                if axis is None:
                    raise UserError(f"{source}: ratios.{rname}: no axis {axis_name!r} (axes: {', '.join(a.name for a in axes)})")
                unknown = [lab for lab in labels if lab not in axis.labels]
                if unknown:
                    raise UserError(f"{source}: ratios.{rname}: axis {axis_name!r} has no value {unknown[0]!r}")
    return Sweep(spec.name, base, axes, spec.goodput, spec.save_runs, source, tuple(spec.ratios.items()))


def ratio_value(ratio: RatioConfig, rows: Sequence[Mapping[str, Any]]) -> Optional[float]:
    """The ratio over a sweep's rows (None when a side has no finished point or a zero denominator)."""
    def best(side: dict[str, list[str]]) -> Optional[float]:
        values = [r.get(ratio.metric) for r in rows if r.get("status") == "ok"
                  and all(str(r.get(axis)) in labels for axis, labels in side.items())]
        numbers = [float(v) for v in values if isinstance(v, (int, float))]
        return max(numbers) if numbers else None

    num, den = best(ratio.numerator), best(ratio.denominator)
    if num is None or den is None or den <= 0:
        return None
    return num / den


def load_sweep(path: Union[str, Path], sets: Sequence[tuple[str, Any]] = ()) -> Sweep:
    """Read and validate a sweep file (or a shipped example by name)."""
    p = shipped_or_path(path)
    return parse_sweep(read_yaml(p, "sweep"), p.parent, str(p), sets)


def load_sweep_or_experiment(path: Union[str, Path]) -> Sweep:
    """A sweep file, or an experiment file as a one-point sweep measuring goodput at its SLO tier
    (``standard`` when the experiment's SLO is custom)."""
    p = shipped_or_path(path)
    data = read_yaml(p, "sweep or experiment")
    if isinstance(data, dict) and "groups" in data and "axes" not in data:
        tier = data.get("slo") if data.get("slo") in ("standard", "high-speed") else "standard"
        return parse_sweep({"name": data.get("name", "experiment"), "experiment": data, "goodput": {"tiers": [tier]}},
                           p.parent, str(p))
    return parse_sweep(data, p.parent, str(p))


# --- expanding ----------------------------------------------------------------------------
def point_id(experiment: dict[str, Any], goodput: Optional[GoodputConfig], save_runs: bool) -> str:
    """A point's identity: what it runs and measures (so a rerun can recognise it)."""
    doc = {"experiment": experiment, "goodput": goodput.model_dump(mode="json") if goodput else None,
           "save_runs": save_runs}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def expand(sweep: Sweep) -> list[Point]:
    """Every point of the grid, each validated (policy, groups, workload fields): a bad one is a
    UserError naming the axis values that made it."""
    points = []
    for combo in itertools.product(*[range(len(a.labels)) for a in sweep.axes]):
        exp = copy.deepcopy(sweep.base)
        labels = {}
        where = ", ".join(f"{a.name}={a.labels[i]}" for a, i in zip(sweep.axes, combo)) or "base"
        try:
            for axis, i in zip(sweep.axes, combo):
                for path, value in axis.settings[i].items():
                    set_path(exp, path, value)
                labels[axis.name] = axis.values[i]
            parsed = parse_experiment(exp, "experiment")
            make_policy(parsed.policy.name, parsed.policy.params)
            build_groups(parsed, Path.cwd())
        except UserError as exc:
            raise UserError(f"{sweep.source}: point {where}: {exc}") from None
        exp = parsed.model_dump(mode="json")
        points.append(Point(point_id(exp, sweep.goodput, sweep.save_runs), labels, exp))
    return points


# --- running one point ----------------------------------------------------------------------
def describe_groups(exp: Experiment) -> str:
    """A cluster in one line: ``4×trn2[16,tp64]:prefill + cs3[4,pp4]:decode``."""
    parts = []
    for g in exp.groups:
        shape = f"{g.device}[{g.count}" + (f",tp{g.tp}" if g.tp > 1 else "") + (f",pp{g.pp}" if g.pp > 1 else "") + "]"
        parts.append(f"{g.replicas}×{shape}:{g.role}" if g.replicas > 1 else f"{shape}:{g.role}")
    return " + ".join(parts)


def summary_columns(summary: dict[str, Any]) -> dict[str, Any]:
    """The flat summary metrics a sweep row keeps."""
    row = {k: summary[k] for k in ("requests", "completed", "rejected", "slo_attainment", "throughput_rps",
                                   "output_tokens_per_s", "preemptions", "makespan_s",
                                   "cluster_dollars_per_hour", "dollars_per_million_output_tokens")}
    for metric in ("ttft_s", "tpot_s"):
        for p in ("p50", "p90", "p99"):
            row[f"{metric.removesuffix('_s')}_{p}_s"] = summary[metric][p]
    return row


def run_point(point: Point, goodput: Optional[GoodputConfig], save_runs: bool) -> PointResult:
    """Simulate one point (and its goodput searches): its row and run files. Never raises for a
    bad combination of axes (a policy that cannot run on a cluster): the row says why."""
    from hetero_sched.goodput import bound_roles, cs3_share, measure_goodput
    from hetero_sched.bound import upper_bound
    from hetero_sched.sim import simulate

    exp = parse_experiment(point.experiment, "experiment")
    row: dict[str, Any] = {"point_id": point.point_id, **point.axes, "experiment": exp.name,
                           "policy": exp.policy.name, "cluster": describe_groups(exp),
                           "slo": exp.slo_target.name, "status": "ok", "error": None}
    files: dict[str, bytes] = {}
    try:
        workload = build_workload(exp.workload, exp.seed, Path.cwd())
        result = simulate(exp, workload=workload)
        row.update(summary_columns(result.summary))
        bound = upper_bound(exp, workload, exp.slo_target, roles=(goodput.roles if goodput else None) or bound_roles(exp))
        row.update({"bound_rps": bound.rate_per_s, "bound_bottleneck": bound.bottleneck})
        systems, other = cs3_share(exp)
        catalog = resolve_catalog(exp.overrides, exp.catalog_data)
        row.update({"cs3_systems": systems, "non_cs3_dollars_per_hour": other,
                    "all_gpu": all(catalog.device(g.device).ray_resource == "GPU" for g in exp.groups),
                    "mean_output_tokens": bound.mean_output_tokens})
        if save_runs:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                result.write(tmp)
                files = {p.name: p.read_bytes() for p in Path(tmp).iterdir()}
        for tier in goodput.tiers if goodput is not None else ():
            assert goodput is not None
            g = measure_goodput(exp, workload, tier, roles=goodput.roles, rel_tol=goodput.rel_tol)
            suffix = tier.replace("-", "_")
            row.update({f"{k}_{suffix}": v for k, v in g.row().items()})
            row[f"goodput_points_{suffix}"] = json.dumps(g.points)
    except UserError as exc:
        row.update(status="error", error=str(exc))
    except AssertionError as exc:
        # A core invariant failed at this point: record it (the row says so) rather than lose every
        # other point of a long sweep; it is a bug to report, not a result.
        row.update(status="error", error=f"internal error: a core invariant failed ({exc})")
    return PointResult(row, files)


# --- running the grid -----------------------------------------------------------------------
def _point_dir(out: Path, pid: str) -> Path:
    return out / POINTS_DIR / pid


def load_row(out: Path, pid: str) -> Optional[dict[str, Any]]:
    """A finished point's row, or None if it has not run (``row.json`` is written last)."""
    path = _point_dir(out, pid) / "row.json"
    return json.loads(path.read_text()) if path.is_file() else None


def save_point(out: Path, result: PointResult) -> None:
    """Write a point's run files, then its row (atomically: its presence means finished)."""
    folder = _point_dir(out, result.row["point_id"])
    (folder / "run").mkdir(parents=True, exist_ok=True)
    for name, data in result.files.items():
        (folder / "run" / name).write_bytes(data)
    tmp = folder / "row.json.tmp"
    tmp.write_text(json.dumps(result.row, default=str))
    os.replace(tmp, folder / "row.json")


def _connect_ray(address: Optional[str]) -> bool:
    """Use the Ray cluster this process is on, else ``address``/``RAY_ADDRESS``, else start a
    local one (``RAY_AUTH_MODE`` respected; ``disabled`` if unset). True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    if address or os.environ.get("RAY_ADDRESS"):
        from hetero_sched.runtime.cluster import connect

        connect(address)
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    return True


def run_points(points: Sequence[Point], out: Path, goodput: Optional[GoodputConfig], save_runs: bool, *,
               address: Optional[str] = None, use_ray: bool = True,
               progress: Optional[Callable[[int, int], None]] = None) -> tuple[dict[str, dict[str, Any]], int]:
    """Run every point not already finished under ``out`` (Ray tasks, or in-process with ``use_ray``
    false); returns every point's row by id and how many were run now."""
    rows: dict[str, dict[str, Any]] = {}
    todo = []
    for p in points:
        row = load_row(out, p.point_id)
        if row is None:
            todo.append(p)
        else:
            rows[p.point_id] = row
    done = len(rows)
    if progress:
        progress(done, len(points))
    if todo and use_ray:
        import ray

        started = _connect_ray(address)
        try:
            task = ray.remote(num_cpus=1)(run_point)
            pending = {task.remote(p, goodput, save_runs): p for p in todo}
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    pending.pop(ref)
                    result = ray.get(ref)
                    save_point(out, result)
                    rows[result.row["point_id"]] = result.row
                    done += 1
                    if progress:
                        progress(done, len(points))
        finally:
            if started:
                ray.shutdown()
    else:
        for p in todo:
            result = run_point(p, goodput, save_runs)
            save_point(out, result)
            rows[p.point_id] = result.row
            done += 1
            if progress:
                progress(done, len(points))
    return rows, len(todo)


def run_sweep(sweep: Sweep, out: Union[str, Path], *, address: Optional[str] = None, use_ray: bool = True,
              progress: Optional[Callable[[int, int], None]] = None,
              points: Optional[Sequence[Point]] = None) -> SweepOutcome:
    """Run every point not already finished under ``out``; write ``sweep.parquet``.
    ``points``: the grid already expanded (:func:`expand`), else it is expanded here."""
    out = ensure_folder(out, "sweep folder")
    points = list(points) if points is not None else expand(sweep)
    (out / "sweep.json").write_text(json.dumps({"name": sweep.name, "source": sweep.source,
                                                "axes": [a.name for a in sweep.axes],
                                                "goodput": sweep.goodput.model_dump(mode="json") if sweep.goodput else None,
                                                "points": [p.point_id for p in points]}, indent=2))
    rows, computed = run_points(points, out, sweep.goodput, sweep.save_runs, address=address, use_ray=use_ray,
                                progress=progress)
    ordered = [rows[p.point_id] for p in points]
    add_breakeven(ordered, sweep.goodput.tiers if sweep.goodput else ())
    for name, ratio in sweep.ratios:
        value = ratio_value(ratio, ordered)
        for r in ordered:
            r[f"ratio_{name}"] = value
    path = out / TABLE
    pq.write_table(rows_table(ordered), path)
    warnings = [f"point {', '.join(f'{k}={r.get(k)}' for k in (a.name for a in sweep.axes)) or r['point_id']}: {w}"
                for r in ordered if r.get("status") == "ok" for w in _row_warnings(r, sweep)]
    return SweepOutcome(path, ordered, computed, len(points) - computed, warnings)


def _row_warnings(row: dict[str, Any], sweep: Sweep) -> list[str]:
    """A point's short-trace warnings, one per goodput tier whose figure rests on a short trace."""
    out = []
    for tier in sweep.goodput.tiers if sweep.goodput is not None else ():
        key = tier.replace("-", "_")
        rate = row.get(f"goodput_rps_{key}")
        if rate:
            warning = short_trace_warning(int(row["requests"]), float(rate), tier_slo(tier), row.get("mean_output_tokens"))
            if warning is not None:
                out.append(f"{tier}: {warning}")
    return out


def add_breakeven(rows: Sequence[dict[str, Any]], tiers: Sequence[str]) -> None:
    """Per tier: the CS-3 $/h at which each CS-3 point matches the best all-GPU point's goodput per dollar."""
    from hetero_sched.goodput import breakeven_cs3_dollars_per_hour

    for tier in tiers:
        suffix = tier.replace("-", "_")
        gpu = [r.get(f"goodput_requests_per_dollar_{suffix}") or 0.0 for r in rows
               if r.get("status") == "ok" and r.get("all_gpu")]
        best = max(gpu, default=0.0)
        for r in rows:
            value = None
            if r.get("status") == "ok" and best > 0:
                value = breakeven_cs3_dollars_per_hour(r.get(f"goodput_rps_{suffix}") or 0.0, r["cs3_systems"],
                                                       r["non_cs3_dollars_per_hour"], best)
            r[f"breakeven_cs3_dollars_per_hour_{suffix}"] = value


def rows_table(rows: Sequence[dict[str, Any]]) -> pa.Table:
    """Rows → an Arrow table; a column mixing kinds of values becomes text."""
    names: list[str] = []
    for r in rows:
        names.extend(k for k in r if k not in names)
    columns = {}
    for name in names:
        values = [r.get(name) for r in rows]
        present = [v for v in values if v is not None]
        if all(isinstance(v, bool) for v in present):
            columns[name] = pa.array(values, pa.bool_())
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
            kind = pa.int64() if all(isinstance(v, int) for v in present) else pa.float64()
            columns[name] = pa.array([None if v is None else (float(v) if kind == pa.float64() else v)
                                      for v in values], kind)
        else:
            columns[name] = pa.array([None if v is None else (v if isinstance(v, str) else json.dumps(v))
                                      for v in values], pa.string())
    return pa.table(columns) if columns else pa.table({"point_id": pa.array([], pa.string())})

