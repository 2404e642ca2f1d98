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

Points run as Ray tasks (``num_cpus=1``) in batches, a bounded number in flight. A task writes
what it finishes itself: each point's run files to ``points/<id>/run/`` and its row, as one
line, to a shard of its own, ``shards/<pid>-<random>.jsonl`` (where the task cannot see the sweep
folder, it returns them and the driver writes them). A point's id is a hash of its experiment
and the goodput request, so a rerun reads the shards, finds the finished points and does not run
them again. At the end the driver reads the shards once and writes ``sweep.parquet``, one row
per point: the axes, summary metrics and goodput columns. The driver's work grows with the
number of tasks, not of points (``bench/sweep_scale.py`` measures its CPU share).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import math
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Literal, Mapping, Optional, Sequence, Union

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
SHARDS_DIR = "shards"
TABLE = "sweep.parquet"
TOKEN = ".sweep-token"
"""A random token the driver writes into the sweep folder: a task that reads it back writes there."""
TASKS_PER_CPU = 4
MAX_BATCH = 32
IN_FLIGHT_PER_CPU = 2


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
    run_s: float = 0.0
    """Wall time spent running points now (connecting to Ray included; expanding and the table not)."""

    @property
    def points_per_min(self) -> Optional[float]:
        """Points run now per minute of :attr:`run_s` (None when nothing ran)."""
        return self.computed * 60 / self.run_s if self.computed and self.run_s > 0 else None


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
    policies_checked: set[str] = set()   # a policy's params are checked once, not once per point
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
            policy_key = json.dumps([parsed.policy.name, parsed.policy.params], sort_keys=True, default=str)
            if policy_key not in policies_checked:
                make_policy(parsed.policy.name, parsed.policy.params)
                policies_checked.add(policy_key)
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


def _write_run_files(out: Path, result: PointResult) -> None:
    if result.files:
        folder = _point_dir(out, result.row["point_id"]) / "run"
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in result.files.items():
            (folder / name).write_bytes(data)


class ShardWriter:
    """Appends finished points to one new shard, ``shards/<pid>-<random>.jsonl`` (a context manager).

    A point's run files are written before its row, and each row is one flushed line, so a row
    present means its point finished; a line cut short by a crash is ignored on reading.
    Every writer (a task, or the driver) has its own shard: no two processes share a file.
    """

    def __init__(self, out: Path) -> None:
        self.out = out
        (out / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
        self.path = out / SHARDS_DIR / f"{os.getpid()}-{uuid.uuid4().hex[:12]}.jsonl"   # pid: who wrote it
        self._file: Optional[IO[str]] = None

    def save(self, result: PointResult) -> None:
        _write_run_files(self.out, result)
        if self._file is None:
            self._file = self.path.open("a", encoding="utf-8")
        self._file.write(json.dumps(result.row, default=str) + "\n")
        self._file.flush()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()


def load_rows(out: Path) -> dict[str, dict[str, Any]]:
    """Every finished point's row under ``out`` by id, read shard by shard (not point by point)."""
    rows: dict[str, dict[str, Any]] = {}
    shards = out / SHARDS_DIR
    for path in sorted(shards.glob("*.jsonl")) if shards.is_dir() else ():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:      # the last line of a task killed mid-write
                continue
            rows.setdefault(row["point_id"], row)
    return rows


@dataclass
class BatchResult:
    """What a batch task returns: how many points it ran, and their results only when the task
    could not write them itself (the sweep folder is not on its node's filesystem)."""

    count: int
    results: list[PointResult] = field(default_factory=list)


def _sees_folder(out: Path, token: str) -> bool:
    """Whether this process sees the driver's sweep folder (the token the driver wrote there)."""
    try:
        return (out / TOKEN).read_text() == token
    except OSError:
        return False


def run_batch(points: Sequence[Point], out: str, token: str, goodput: Optional[GoodputConfig],
              save_runs: bool) -> BatchResult:
    """Run a batch of points (one Ray task): written to a shard of its own where the task sees the
    sweep folder (one machine, or a shared filesystem), else returned for the driver to write."""
    folder = Path(out)
    if not _sees_folder(folder, token):
        return BatchResult(len(points), [run_point(p, goodput, save_runs) for p in points])
    with ShardWriter(folder) as shard:
        for p in points:
            shard.save(run_point(p, goodput, save_runs))
    return BatchResult(len(points))


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


def batch_size(points: int, cpus: int) -> int:
    """Points per task: about ``TASKS_PER_CPU`` tasks per CPU (so a slow batch does not leave
    CPUs idle at the end), at most ``MAX_BATCH`` (so progress moves and a lost task costs little)."""
    return max(1, min(MAX_BATCH, math.ceil(points / (TASKS_PER_CPU * max(1, cpus)))))


def _run_on_ray(todo: Sequence[Point], out: Path, token: str, goodput: Optional[GoodputConfig], save_runs: bool,
                points_per_task: Optional[int], advance: Callable[[int], None]) -> None:
    """Run ``todo`` in batches as Ray tasks, at most ``IN_FLIGHT_PER_CPU`` per CPU at a time.

    The driver's work per finished task is constant (a tiny result), so it grows with the number
    of tasks, not points, and never with the sweep's size per step.
    """
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    size = points_per_task or batch_size(len(todo), cpus)
    task = ray.remote(num_cpus=1)(run_batch)
    batches = iter([todo[i:i + size] for i in range(0, len(todo), size)])
    limit = max(2, IN_FLIGHT_PER_CPU * cpus)
    pending = [task.remote(b, str(out), token, goodput, save_runs) for b in itertools.islice(batches, limit)]
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        batch: BatchResult = ray.get(ready[0])
        if batch.results:                       # the task could not see the folder: write its shard here
            with ShardWriter(out) as shard:
                for result in batch.results:
                    shard.save(result)
        advance(batch.count)
        pending.extend(task.remote(b, str(out), token, goodput, save_runs) for b in itertools.islice(batches, 1))


def run_points(points: Sequence[Point], out: Path, goodput: Optional[GoodputConfig], save_runs: bool, *,
               address: Optional[str] = None, use_ray: bool = True, points_per_task: Optional[int] = None,
               progress: Optional[Callable[[int, int], None]] = None) -> tuple[dict[str, dict[str, Any]], int]:
    """Run every point not already finished under ``out`` (Ray tasks in batches, or in-process with
    ``use_ray`` false); returns every point's row by id (read once from the shards at the end) and
    how many were run now."""
    finished = load_rows(out)
    todo = [p for p in points if p.point_id not in finished]
    done = len(points) - len(todo)
    total = len(points)

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    advance(0)
    if todo and use_ray:
        import ray

        token = uuid.uuid4().hex
        (out / TOKEN).write_text(token)
        started = _connect_ray(address)
        try:
            _run_on_ray(todo, out, token, goodput, save_runs, points_per_task, advance)
        finally:
            if started:
                ray.shutdown()
    elif todo:
        with ShardWriter(out) as shard:
            for p in todo:
                shard.save(run_point(p, goodput, save_runs))
                advance(1)
    rows = load_rows(out) if todo else finished
    missing = [p.point_id for p in points if p.point_id not in rows]
    if missing:
        raise RuntimeError(f"sweep: {len(missing)} points finished without a row (first: {missing[0]}) under {out}")
    return rows, len(todo)


@dataclass
class PointsRate:
    """Points per minute since the first count it saw (points reused from an earlier run are in
    that first count, so they do not inflate the rate)."""

    start: Optional[tuple[int, float]] = None

    def per_min(self, done: int, now: Optional[float] = None) -> Optional[float]:
        now = time.monotonic() if now is None else now
        if self.start is None:
            self.start = (done, now)
        first, t0 = self.start
        return (done - first) * 60 / (now - t0) if done > first and now > t0 else None

    def text(self, done: int) -> str:
        rate = self.per_min(done)
        return "" if rate is None else f"{rate:,.0f} points/min"


def run_sweep(sweep: Sweep, out: Union[str, Path], *, address: Optional[str] = None, use_ray: bool = True,
              progress: Optional[Callable[[int, int], None]] = None,
              points: Optional[Sequence[Point]] = None, points_per_task: Optional[int] = None) -> SweepOutcome:
    """Run every point not already finished under ``out``; write ``sweep.parquet``.
    ``points``: the grid already expanded (:func:`expand`), else it is expanded here;
    ``points_per_task``: the batch size of a Ray task (default: :func:`batch_size`)."""
    out = ensure_folder(out, "sweep folder")
    points = list(points) if points is not None else expand(sweep)
    (out / "sweep.json").write_text(json.dumps({"name": sweep.name, "source": sweep.source,
                                                "axes": [a.name for a in sweep.axes],
                                                "goodput": sweep.goodput.model_dump(mode="json") if sweep.goodput else None,
                                                "points": [p.point_id for p in points]}, indent=2))
    t0 = time.monotonic()
    rows, computed = run_points(points, out, sweep.goodput, sweep.save_runs, address=address, use_ray=use_ray,
                                points_per_task=points_per_task, progress=progress)
    run_s = time.monotonic() - t0
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
    return SweepOutcome(path, ordered, computed, len(points) - computed, warnings, run_s)


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

