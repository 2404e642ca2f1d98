"""Fit cost-model parameters to measured (or published) step times; report fit and leave-one-out error.

Two kinds of fit, one engine:

* ``roofline`` — the free parameters of :class:`~hetero_sched.costmodel.RooflineCost` for a
  device (by default ``compute_efficiency``, ``memory_efficiency``, ``layer_latency_s``). The
  model is piecewise *affine* in ``1/efficiency`` and the latencies, so a Gauss-Newton step on
  those coordinates is an exact linear least-squares solve within the current roofline regime;
  a few iterations settle the regime. Errors are relative (a 10 ms and a 1 s point weigh alike).
* ``fitted`` — :class:`~hetero_sched.costmodel.FittedCost` coefficients by plain least squares:
  prefill ``a + b·Σn + c·Σn(n+2h)``, decode ``a + b·C + c·batch`` (optionally piecewise by batch).

Measurements CSV (header required; ``label`` optional)::

    kind,batch,tokens,context,ms
    prefill,1,2048,0,41.2        # batch prompts of `tokens` new tokens, `context` cached each
    decode,8,1,16384,12.9        # mean step of `tokens` steps; `context` = total context at step 1

The published figures (:mod:`hetero_sched.catalog.figures`) are fitted and cross-validated by
:mod:`hetero_sched.accuracy` with the same least-squares engine (:func:`gauss_newton`).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from hetero_sched.catalog import resolve_catalog
from hetero_sched.catalog.groups import GroupSpec
from hetero_sched.catalog.profiles import Profile
from hetero_sched.costmodel import GroupCost, build_group_cost, decode_time_s
from hetero_sched.errors import UserError

DEFAULT_FIT = ("compute_efficiency", "memory_efficiency", "layer_latency_s")
FITTABLE = ("compute_efficiency", "memory_efficiency", "link_efficiency", "layer_latency_s",
            "step_overhead_s", "pp_hop_s")
COLUMNS = ("kind", "batch", "tokens", "context", "ms")
MIN_STEP_MS = 1e-3
"""A measured step below a microsecond is a unit mistake (seconds or ns for ms), not a measurement."""
MAX_FIT_ERROR = 0.25
"""A point the fitted model still misses by more than this (relative) means the model cannot
describe the measurements: a profile from them would mislead."""
MIN_LATENCY_S = 1e-12
"""A fitted latency at or below this sits on the solver's floor: the points asked for a negative time."""


@dataclass(frozen=True)
class Measurement:
    """One measured prefill iteration or decode step (mean over ``tokens`` steps)."""

    kind: str
    batch: int
    tokens: int
    context: int
    seconds: float
    label: str = ""


@dataclass(frozen=True)
class PointError:
    """How well the fit reproduces one point, in-sample and left out."""

    label: str
    measured_s: float
    fitted_s: float
    loo_s: Optional[float]

    @property
    def fit_error(self) -> float:
        """Signed relative error of the in-sample fit."""
        return self.fitted_s / self.measured_s - 1.0

    @property
    def loo_error(self) -> Optional[float]:
        """Signed relative error when this point was left out of the fit (None: too few points)."""
        return None if self.loo_s is None else self.loo_s / self.measured_s - 1.0


@dataclass(frozen=True)
class FitResult:
    """Fitted parameters and the per-point report."""

    kind: str
    params: Mapping[str, Any]
    points: tuple[PointError, ...]

    def rms(self, loo: bool = False) -> Optional[float]:
        """Root-mean-square relative error (in-sample, or leave-one-out)."""
        errs = [p.loo_error if loo else p.fit_error for p in self.points]
        if any(e is None for e in errs) or not errs:
            return None
        return math.sqrt(sum(e * e for e in errs if e is not None) / len(errs))


def read_measurements(path: str | Path) -> tuple[Measurement, ...]:
    """Parse a measurements CSV; any problem is a UserError naming file, line and column."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise UserError(f"{p}: cannot read ({exc.strerror or exc})") from None
    rows = list(csv.reader(text.splitlines()))
    if not rows:
        raise UserError(f"{p}, line 1: empty file; expected header {','.join(COLUMNS)}")
    header = [h.strip() for h in rows[0]]
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise UserError(f"{p}, line 1: missing column {missing[0]!r}; expected header {','.join(COLUMNS)}[,label]")
    out = []
    for lineno, row in enumerate(rows[1:], start=2):
        if not row or all(not cell.strip() for cell in row) or row[0].lstrip().startswith("#"):
            continue
        if len(row) != len(header):
            raise UserError(f"{p}, line {lineno}: {len(row)} fields, header has {len(header)}")
        cells = {h: c.strip() for h, c in zip(header, row)}
        kind = cells["kind"]
        if kind not in ("prefill", "decode"):
            raise UserError(f"{p}, line {lineno}, column 'kind': expected prefill or decode, got {kind!r}")
        nums: dict[str, float] = {}
        for col in ("batch", "tokens", "context", "ms"):
            try:
                nums[col] = float(cells[col])
            except ValueError:
                raise UserError(f"{p}, line {lineno}, column {col!r}: not a number: {cells[col]!r}") from None
            minimum = 0 if col == "context" else MIN_STEP_MS if col == "ms" else 1
            if not math.isfinite(nums[col]) or nums[col] < minimum or (col != "ms" and nums[col] != int(nums[col])):
                what = (f"milliseconds of at least {MIN_STEP_MS:g} (1 µs: no step is faster)" if col == "ms"
                        else "a non-negative integer" if col == "context" else "a positive integer")
                raise UserError(f"{p}, line {lineno}, column {col!r}: expected {what}, got {cells[col]!r}")
        out.append(Measurement(kind, int(nums["batch"]), int(nums["tokens"]), int(nums["context"]),
                               nums["ms"] / 1e3, cells.get("label", "") or f"line {lineno}"))
    if not out:
        raise UserError(f"{p}: no measurements after the header")
    return tuple(out)


def predict_s(cost: GroupCost, m: Measurement) -> float:
    """What ``cost`` predicts for measurement ``m``."""
    if m.kind == "prefill":
        return cost.prefill_time_s([m.tokens] * m.batch, [m.context] * m.batch)
    steps = max(m.tokens, 1)
    return decode_time_s(cost, m.batch, m.context, steps) / steps


# --- roofline fit ---------------------------------------------------------------------------

def _to_x(name: str, value: float) -> float:
    return 1.0 / value if name.endswith("_efficiency") else value


def _from_x(name: str, x: float) -> float:
    return 1.0 / x if name.endswith("_efficiency") else x


@dataclass(frozen=True)
class _Problem:
    group: GroupSpec
    model: str
    overrides: Mapping[str, Any]
    names: tuple[str, ...]
    points: tuple[tuple[Measurement, Mapping[str, Any], GroupSpec, str], ...]

    def predict(self, x: np.ndarray, idx: Sequence[int]) -> np.ndarray:
        out = []
        for i in idx:
            m, extra, group, model = self.points[i]
            ov = {**self.overrides, **extra}
            ov.update({f"cost.{group.device}.{n}": _from_x(n, float(v)) for n, v in zip(self.names, x)})
            out.append(predict_s(build_group_cost(group, model, ov), m))
        return np.array(out)


def gauss_newton(predict: Callable[[np.ndarray], np.ndarray], y: np.ndarray, x0: np.ndarray,
                 lower: Optional[np.ndarray] = None, upper: Optional[np.ndarray] = None) -> np.ndarray:
    """Least squares on *relative* error by Gauss-Newton with a forward-difference Jacobian.

    The roofline is piecewise affine in its coordinates (``1/efficiency``, latencies), so each step
    is an exact linear solve within the current regime; iteration settles the regime. Coordinates
    stay positive (and within ``lower``..``upper`` where given), and a step moves each by at most a
    factor of 4 (a trust region: far from the data a roofline is flat in some coordinates).
    """
    x = x0.copy()
    for _ in range(60):
        f = predict(x)
        jac = np.empty((len(y), len(x)))
        for j in range(len(x)):
            step = 1e-6 * max(abs(x[j]), 1e-9)
            xj = x.copy()
            xj[j] += step
            jac[:, j] = (predict(xj) - f) / step
        delta = np.linalg.lstsq(jac / y[:, None], (y - f) / y, rcond=None)[0]
        new = np.clip(x + delta, np.abs(x) / 4 + 1e-15, np.abs(x) * 4 + 1e-12)
        if lower is not None:
            new = np.maximum(new, lower)
        if upper is not None:
            new = np.minimum(new, upper)
        if np.allclose(new, x, rtol=1e-10, atol=1e-15):
            return new
        x = new
    return x


def _solve(prob: _Problem, x0: np.ndarray, idx: Sequence[int]) -> np.ndarray:
    y = np.array([prob.points[i][0].seconds for i in idx])
    return gauss_newton(lambda x: prob.predict(x, idx), y, x0)


def fit_roofline(measurements: Sequence[Measurement], group: GroupSpec, model: str,
                 names: Sequence[str] = DEFAULT_FIT, overrides: Optional[Mapping[str, Any]] = None,
                 per_point: Optional[Sequence[tuple[Mapping[str, Any], GroupSpec, str]]] = None) -> FitResult:
    """Fit cost parameters ``names`` of ``group.device`` to ``measurements``.

    ``per_point`` optionally gives each measurement its own (overrides, group, model), so one
    device can be fitted on figures of several models or shapes.
    """
    bad = [n for n in names if n not in FITTABLE]
    if bad:
        raise UserError(f"cannot fit {bad[0]!r}; fittable parameters: {', '.join(FITTABLE)}")
    ctx = per_point or [({}, group, model)] * len(measurements)
    prob = _Problem(group, model, dict(overrides or {}), tuple(names),
                    tuple((m, o, g, mo) for m, (o, g, mo) in zip(measurements, ctx)))
    base = resolve_catalog(overrides).cost(group.device)
    x0 = np.array([_to_x(n, getattr(base, n)) for n in names])
    everything = list(range(len(measurements)))
    x = _solve(prob, x0, everything)
    fitted = prob.predict(x, everything)
    loo: list[Optional[float]] = [None] * len(measurements)
    if len(measurements) > len(names):
        for i in everything:
            rest = [j for j in everything if j != i]
            loo[i] = float(prob.predict(_solve(prob, x, rest), [i])[0])
    points = tuple(PointError(m.label, m.seconds, float(f), l) for m, f, l in zip(measurements, fitted, loo))
    return FitResult("roofline", {n: _from_x(n, float(v)) for n, v in zip(names, x)}, points)


def fit_problems(result: FitResult) -> list[str]:
    """Why a fit should not become a profile (empty: it may): too few points to check it, a
    point it still cannot reproduce, or a parameter outside its physical range."""
    problems = []
    unchecked = [p.label for p in result.points if p.loo_s is None]
    if unchecked:
        count = len(result.params) if result.kind == "roofline" else "its"
        problems.append(f"under-determined: {count} parameters from {len(result.points)} point(s) "
                        f"({unchecked[0]} cannot be checked by leaving it out; give more points than parameters"
                        + (", per prefill and per decode piece" if result.kind == "fitted" else "") + ")")
    worst = max(result.points, key=lambda p: abs(p.fit_error))
    if abs(worst.fit_error) > MAX_FIT_ERROR:
        problems.append(f"point {worst.label} is still {worst.fit_error:+.0%} off after fitting (limit "
                        f"±{MAX_FIT_ERROR:.0%}): the cost model cannot reproduce these measurements")
    if result.kind == "roofline":
        for name, value in result.params.items():
            if name.endswith("_efficiency") and not 0.0 < value <= 1.0:
                problems.append(f"{name} = {value:.3g} is outside (0, 1]: faster than the device's peak")
            elif name.endswith("_s") and value <= MIN_LATENCY_S:
                problems.append(f"{name} = {value:.3g} s is pinned at its floor: the points ask for a negative time")
            elif name.endswith("_s") and value > 1.0:
                problems.append(f"{name} = {value:.3g} s is more than a second per step")
    else:
        coefficients = [*result.params["prefill"], *(v for piece in result.params["decode_pieces"] for v in piece[1:])]
        if any(c < 0 for c in coefficients):
            problems.append("a fitted coefficient is negative: the profile would predict negative times for some batches")
    return problems


# --- fitted-coefficient fit -------------------------------------------------------------------

def _features(m: Measurement) -> np.ndarray:
    if m.kind == "prefill":
        n, h = m.tokens, m.context
        return np.array([1.0, m.batch * n, m.batch * n * (n + 2 * h)])
    mean_context = m.context + m.batch * (max(m.tokens, 1) - 1) / 2.0
    return np.array([1.0, mean_context, m.batch])


def _lsq(rows: Sequence[Measurement]) -> np.ndarray:
    a = np.array([_features(m) for m in rows])
    y = np.array([m.seconds for m in rows])
    return np.linalg.lstsq(a / y[:, None], np.ones(len(rows)), rcond=None)[0]


def fit_coefficients(measurements: Sequence[Measurement], decode_pieces: Sequence[int] = ()) -> FitResult:
    """Fit ``FittedCost`` coefficients; ``decode_pieces`` are max-batch boundaries of the pieces."""
    pre = [m for m in measurements if m.kind == "prefill"]
    dec = [m for m in measurements if m.kind == "decode"]
    if len(pre) < 3 or len(dec) < 3:
        raise UserError(f"a fitted-coefficient profile needs >= 3 prefill and >= 3 decode points "
                        f"(got {len(pre)} and {len(dec)})")
    bounds = sorted(set(decode_pieces)) + [max(m.batch for m in dec)]
    groups: list[tuple[int, list[Measurement]]] = []
    lo = 0
    for hi in bounds:
        rows = [m for m in dec if lo < m.batch <= hi]
        if rows:
            if len(rows) < 3:
                raise UserError(f"decode piece batch {lo + 1}..{hi} has {len(rows)} points; needs >= 3")
            groups.append((hi, rows))
        lo = hi

    def solve(rows: Sequence[Measurement]) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
        p = _lsq([m for m in rows if m.kind == "prefill"])
        pieces = [(hi, _lsq([m for m in rows if m.kind == "decode" and m in g])) for hi, g in groups]
        return p, pieces

    def predict(p: np.ndarray, pieces: list[tuple[int, np.ndarray]], m: Measurement) -> float:
        if m.kind == "prefill":
            return float(_features(m) @ p)
        coef = next((c for hi, c in pieces if m.batch <= hi), pieces[-1][1])
        return float(_features(m) @ coef)

    p, pieces = solve(measurements)
    points = []
    for i, m in enumerate(measurements):
        rest = [r for j, r in enumerate(measurements) if j != i]
        same = [r for r in rest if r.kind == m.kind and (m.kind == "prefill" or any(r in g and m in g for _, g in groups))]
        loo = None
        if len(same) >= 3:
            lp, lpieces = solve(rest)
            loo = predict(lp, lpieces, m)
        points.append(PointError(m.label, m.seconds, predict(p, pieces, m), loo))
    params = {"prefill": [float(v) for v in p],
              "decode_pieces": [[hi, *(float(v) for v in c)] for hi, c in pieces]}
    return FitResult("fitted", params, tuple(points))


def make_profile(result: FitResult, device: str, group: GroupSpec, model: str, source: str,
                 forced: Sequence[str] = ()) -> Profile:
    """A profile file's content from a fit (``forced``: the problems ``--force`` wrote it past)."""
    fit = {"rms_fit_error": result.rms(), "rms_loo_error": result.rms(loo=True),
           "points": [{"label": p.label, "measured_s": p.measured_s, "fitted_s": p.fitted_s,
                       "loo_s": p.loo_s} for p in result.points]}
    return Profile(kind=result.kind, device=device, base_device=group.device, model=model, tp=group.tp,
                   pp=group.pp, count=group.count, params=dict(result.params), fit=fit, source=source,
                   forced=tuple(forced))
