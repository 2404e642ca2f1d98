"""Uncertainty: every assumed or fitted parameter varied over its range, one at a time and jointly.

A conclusion is only as firm as the numbers under it. Every catalog number with a stated range
(``range`` in the catalog data: a cross-validation spread, or a plausible range with its reason)
that the experiment's devices use is a parameter, and so is the speculative acceptance rate of a
group that speculates. ``hetero-sched sensitivity`` runs, for a sweep (or one experiment):

* the **baseline** (every parameter at its catalog value),
* **one at a time**: each parameter at the low and at the high end of its range, the rest at
  baseline — what a tornado plot shows,
* **jointly**: a Latin hypercube of ``samples`` designs over all parameters at once (log-uniform
  where a range spans more than 10x) — the interval reported is its 5th–95th percentile,

each design being every point of the sweep with the design's values applied (catalog overrides,
or the groups' speculative setting). Points are run by the sweep machinery — Ray tasks, one CPU
each, or in-process — and saved as they finish, so a rerun resumes. A price parameter changes no
simulated time: its one-at-a-time designs are derived from the baseline rows by repricing.
Outputs: each point's goodput and goodput per dollar per SLO tier, and every ratio the sweep defines.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import pyarrow.parquet as pq

from hetero_sched.catalog import resolve_assumptions, resolve_catalog
from hetero_sched.errors import UserError
from hetero_sched.experiment import parse_experiment
from hetero_sched.sweep import (Point, Sweep, expand, point_id, ratio_value, rows_table, run_points)

SPECULATIVE_KEY = "speculative.acceptance_rate"
SPECULATIVE_RANGE = (0.6, 0.9)
SPECULATIVE_REASON = ("acceptance of draft/EAGLE speculation reported 0.6-0.9 (AWS's vLLM Neuron EAGLE3 figures: "
                      "69% and 74%); Cerebras publishes none")
PRICE_SUFFIX = "dollars_per_hour"
TABLE = "sensitivity.parquet"
SUMMARY = "sensitivity.json"


@dataclass(frozen=True)
class Parameter:
    """One uncertain number and its range."""

    key: str
    nominal: float
    low: float
    high: float
    status: str
    reason: str

    @property
    def log(self) -> bool:
        """Sample log-uniformly when the range spans more than 10x."""
        return self.low > 0 and self.high / self.low > 10

    @property
    def is_price(self) -> bool:
        return self.key.endswith(PRICE_SUFFIX)


@dataclass(frozen=True)
class Design:
    """One set of parameter values: the baseline, one parameter at an end, or a joint sample."""

    label: str
    kind: str
    """``baseline`` | ``low`` | ``high`` | ``joint``."""
    param: Optional[str]
    values: Mapping[str, float]


def parameters(points: Sequence[Point], include: Sequence[str] = ()) -> list[Parameter]:
    """Every ranged number the points' devices and models use (``include``: only keys starting with
    one of these), plus the speculative acceptance when a group speculates with a fixed rate."""
    out: dict[str, Parameter] = {}
    speculating = False
    for point in points:
        exp = parse_experiment(point.experiment, "experiment")
        stamp = resolve_assumptions(exp.overrides, devices_used={g.device for g in exp.groups},
                                    models_used=[exp.model], extra=exp.catalog_data)
        for key, entry in stamp.items():
            if "range" in entry and entry["status"] != "override" and key not in out:
                low, high = entry["range"]
                if high > low:
                    out[key] = Parameter(key, float(entry["value"]), float(low), float(high), entry["status"],
                                         entry.get("range_reason", ""))
        speculating |= any(g.speculative is not None and g.speculative.acceptance_rate is not None for g in exp.groups)
    if speculating:
        nominal = _speculative_nominal(points)
        low, high = min(SPECULATIVE_RANGE[0], nominal), max(SPECULATIVE_RANGE[1], nominal)
        out[SPECULATIVE_KEY] = Parameter(SPECULATIVE_KEY, nominal, low, high, "assumed", SPECULATIVE_REASON)
    chosen = [p for k, p in sorted(out.items()) if not include or any(k.startswith(i) for i in include)]
    if include and not chosen:
        raise UserError(f"--params {','.join(include)}: no ranged parameter matches; ranged: {', '.join(sorted(out))}")
    return chosen


def _speculative_nominal(points: Sequence[Point]) -> float:
    for point in points:
        for g in point.experiment.get("groups", []):
            spec = g.get("speculative") or {}
            if spec.get("acceptance_rate") is not None:
                return float(spec["acceptance_rate"])
    return SPECULATIVE_RANGE[0]


def designs(params: Sequence[Parameter], samples: int, seed: int) -> list[Design]:
    """Baseline, each parameter at its low and high end, and a Latin hypercube of ``samples``."""
    base = {p.key: p.nominal for p in params}
    out = [Design("baseline", "baseline", None, base)]
    for p in params:
        out.append(Design(f"{p.key}=low", "low", p.key, {**base, p.key: p.low}))
        out.append(Design(f"{p.key}=high", "high", p.key, {**base, p.key: p.high}))
    rng = np.random.default_rng(seed)
    if samples > 0 and params:
        strata = np.array([rng.permutation(samples) for _ in params])          # one stratum per sample per parameter
        u = (strata + rng.random(strata.shape)) / samples
        for j in range(samples):
            values = {}
            for i, p in enumerate(params):
                if p.log:
                    values[p.key] = float(math.exp(math.log(p.low) + u[i, j] * (math.log(p.high) - math.log(p.low))))
                else:
                    values[p.key] = float(p.low + u[i, j] * (p.high - p.low))
            out.append(Design(f"joint-{j:03d}", "joint", None, values))
    return out


def apply_design(experiment: Mapping[str, Any], design: Design) -> dict[str, Any]:
    """An experiment mapping with the design's values: catalog overrides, and the speculative
    acceptance of every group that speculates with a fixed rate."""
    exp = copy.deepcopy(dict(experiment))
    overrides = dict(exp.get("overrides") or {})
    for key, value in design.values.items():
        if key == SPECULATIVE_KEY:
            for g in exp.get("groups", []):
                spec = g.get("speculative")
                if spec and spec.get("acceptance_rate") is not None:
                    spec["acceptance_rate"] = value
        elif key not in overrides:          # an experiment's explicit override stays what it says
            overrides[key] = value
    exp["overrides"] = overrides
    return exp


def _cluster_dollars_per_hour(experiment: Mapping[str, Any]) -> float:
    exp = parse_experiment(dict(experiment), "experiment")
    cat = resolve_catalog(exp.overrides, exp.catalog_data)
    return sum(cat.cost(g.device).dollars_per_hour * g.count * g.replicas for g in exp.groups)


def _repriced(row: Mapping[str, Any], experiment: Mapping[str, Any], tiers: Sequence[str]) -> dict[str, Any]:
    """A baseline row at other prices: goodput is unchanged, per-dollar figures are not."""
    out = dict(row)
    dollars = _cluster_dollars_per_hour(experiment)
    out["cluster_dollars_per_hour"] = dollars
    for tier in tiers:
        sfx = tier.replace("-", "_")
        rps = row.get(f"goodput_rps_{sfx}") or 0.0
        toks = row.get(f"goodput_tokens_per_s_{sfx}") or 0.0
        out[f"goodput_requests_per_dollar_{sfx}"] = rps * 3600.0 / dollars if dollars > 0 else 0.0
        out[f"goodput_tokens_per_dollar_{sfx}"] = toks * 3600.0 / dollars if dollars > 0 else 0.0
    return out


@dataclass(frozen=True)
class SensitivityOutcome:
    """Every design's rows, the outputs' intervals and the files written."""

    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    table_path: Path
    computed: int
    reused: int


def _outputs(sweep: Sweep, rows: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> dict[str, Optional[float]]:
    """Per design: each ratio, and each point's goodput and goodput per dollar per tier."""
    out: dict[str, Optional[float]] = {}
    for name, ratio in sweep.ratios:
        out[f"ratio {name}"] = ratio_value(ratio, rows)
    tiers = sweep.goodput.tiers if sweep.goodput else ()
    for row, label in zip(rows, labels):
        for tier in tiers:
            sfx = tier.replace("-", "_")
            for metric, unit in (("goodput_tokens_per_s", "tok/s"), ("goodput_tokens_per_dollar", "tok/$")):
                value = row.get(f"{metric}_{sfx}") if row.get("status") == "ok" else None
                out[f"{label} {tier} {metric.removeprefix('goodput_').replace('_', ' ')}"] = (
                    float(value) if isinstance(value, (int, float)) else None)
    return out


def _interval(values: Sequence[float]) -> dict[str, float]:
    arr = np.array(values, dtype=float)
    return {"p5": float(np.percentile(arr, 5)), "p50": float(np.percentile(arr, 50)),
            "p95": float(np.percentile(arr, 95)), "min": float(arr.min()), "max": float(arr.max())}


def run_sensitivity(sweep: Sweep, out: Union[str, Path], *, samples: int = 16, seed: int = 0,
                    include: Sequence[str] = (), address: Optional[str] = None, use_ray: bool = True,
                    progress: Optional[Callable[[int, int], None]] = None) -> SensitivityOutcome:
    """Run the baseline, one-at-a-time and joint designs of ``sweep``; write the table and summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if sweep.goodput is None:
        raise UserError(f"{sweep.source}: sensitivity needs goodput (a `goodput:` section) to have something to vary")
    base_points = expand(sweep)
    params = parameters(base_points, include)
    if not params:
        raise UserError(f"{sweep.source}: no parameter with a stated range is used by these experiments")
    all_designs = designs(params, samples, seed)
    labels = [", ".join(f"{k}={v}" for k, v in p.axes.items()) or "experiment" for p in base_points]
    runs: dict[str, list[Point]] = {}
    for d in all_designs:
        if d.kind in ("low", "high") and d.param is not None and next(p for p in params if p.key == d.param).is_price:
            continue                                    # repriced from the baseline below
        pts = []
        for bp in base_points:
            exp = apply_design(bp.experiment, d)
            pts.append(Point(point_id(exp, sweep.goodput, False), {**bp.axes, "design": d.label}, exp))
        runs[d.label] = pts
    flat = [p for pts in runs.values() for p in pts]
    rows_by_id, computed = run_points(flat, out, sweep.goodput, False, address=address, use_ray=use_ray,
                                      progress=progress)
    tiers = sweep.goodput.tiers
    table: list[dict[str, Any]] = []
    outputs: dict[str, dict[str, Optional[float]]] = {}
    for d in all_designs:
        if d.label in runs:
            drows = [rows_by_id[p.point_id] for p in runs[d.label]]
        else:
            drows = [_repriced(rows_by_id[bp.point_id], apply_design(b.experiment, d), tiers)
                     for bp, b in zip(runs["baseline"], base_points)]
        outputs[d.label] = _outputs(sweep, drows, labels)
        for r, bp in zip(drows, base_points):
            table.append({**{k: v for k, v in r.items() if not k.startswith("goodput_points")}, **bp.axes,
                          "design": d.label, "design_kind": d.kind, "design_param": d.param,
                          **{f"param {k}": v for k, v in d.values.items()}})
    summary = summarize(sweep, params, all_designs, outputs)
    summary["failed_points"] = [{"design": r["design"], "point": {k: r[k] for k in base_points[0].axes}, "error": r["error"]}
                                for r in table if r.get("status") != "ok"]
    path = out / TABLE
    pq.write_table(rows_table(table), path)
    (out / SUMMARY).write_text(json.dumps(summary, indent=2, default=float))
    return SensitivityOutcome(table, summary, path, computed, len(flat) - computed)


def summarize(sweep: Sweep, params: Sequence[Parameter], all_designs: Sequence[Design],
              outputs: Mapping[str, Mapping[str, Optional[float]]]) -> dict[str, Any]:
    """Per output: baseline, each parameter's low/high effect, and the joint interval."""
    names = list(outputs["baseline"])
    result: dict[str, Any] = {
        "sweep": sweep.name, "source": sweep.source,
        "parameters": [{"key": p.key, "nominal": p.nominal, "low": p.low, "high": p.high, "status": p.status,
                        "reason": p.reason, "log_uniform": p.log} for p in params],
        "designs": len(all_designs), "outputs": {},
    }
    joint = [d.label for d in all_designs if d.kind == "joint"]
    for name in names:
        base = outputs["baseline"][name]
        oat: list[dict[str, Any]] = []
        for p in params:
            lo = outputs[f"{p.key}=low"][name]
            hi = outputs[f"{p.key}=high"][name]
            oat.append({"param": p.key, "at_low": lo, "at_high": hi,
                        "swing": abs((hi or 0.0) - (lo or 0.0)) if lo is not None and hi is not None else None})
        oat.sort(key=lambda e: -(e["swing"] or 0.0))
        samples = [v for v in (outputs[j][name] for j in joint) if v is not None]
        result["outputs"][name] = {"baseline": base, "one_at_a_time": oat,
                                   "joint": _interval(samples) if samples else None, "joint_samples": len(samples)}
    return result


def tornado_png(summary: Mapping[str, Any], output: str, path: Union[str, Path], top: int = 12) -> Path:
    """A tornado plot of one output: each parameter's low and high end against the baseline."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("the tornado plot needs matplotlib (pip install 'hetero-sched[plot]')") from None
    entry = summary["outputs"][output]
    base = entry["baseline"] or 0.0
    bars = [e for e in entry["one_at_a_time"] if e["at_low"] is not None and e["at_high"] is not None][:top]
    bars.reverse()
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(bars) + 1.8))
    for i, e in enumerate(bars):
        lo, hi = e["at_low"], e["at_high"]
        ax.barh(i, lo - base, left=base, color="#4477aa", height=0.6)
        ax.barh(i, hi - base, left=base, color="#ee6677", height=0.6)
    ax.axvline(base, color="black", linewidth=1)
    joint = entry.get("joint")
    if joint:
        ax.axvspan(joint["p5"], joint["p95"], color="#bbbbbb", alpha=0.3, label="joint 5-95% (Latin hypercube)")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_yticks(range(len(bars)))
    ax.set_yticklabels([e["param"] for e in bars], fontsize=8)
    ax.set_xlabel(f"{output}  (blue: parameter at its low end, red: high end; line: baseline {base:.3g})")
    ax.set_title(f"What moves {output} most", fontsize=10)
    fig.tight_layout()
    p = Path(path)
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return p
