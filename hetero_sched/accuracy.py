"""How well the cost model predicts public figures: model form by k-fold cross-validation.

Per device family (trn2, cs3, h100, mi300x …) several *forms* compete — which cost parameters
are free (per-layer latency, per-step overhead, memory efficiency, a fitted speculative acceptance
…) — and each is scored by k-fold cross-validation over that family's figures
(:mod:`hetero_sched.catalog.figures`): every figure is predicted by a fit that did not see it.
The form closest to the goal wins — median |held-out error| / 10% plus worst / 25% (ties: fewer
parameters); its fit on all figures gives the catalog's calibrated values, and the spread of the
per-fold fits gives each parameter's range. Nothing is chosen by looking at one hold-out.

Starting points are neutral (:data:`NEUTRAL`), not the catalog's calibrated values, so a fold
never borrows from a fit that saw its held-out figures.
"""

from __future__ import annotations

import functools
import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from hetero_sched.calibrate import Measurement, gauss_newton, predict_s
from hetero_sched.catalog.figures import Figure, published_figures
from hetero_sched.costmodel import build_group_cost

NEUTRAL = {"compute_efficiency": 0.4, "memory_efficiency": 0.5, "layer_latency_s": 5e-5, "step_overhead_s": 1e-3,
           "prefill_overhead_s": 1e-2, "kv_read_efficiency": 0.5, "pp_hop_s": 2e-5, "acceptance": 0.6}
"""Where every fit starts (and what a parameter no training figure pins stays at)."""

PRIOR = {"memory_efficiency": 0.8, "kv_read_efficiency": 0.8, "layer_latency_s": 0.0, "step_overhead_s": 0.0,
         "prefill_overhead_s": 0.0}
"""(pp_hop_s is not pinned: a form that does not free it keeps the catalog's assumed hop.)"""
"""What a form that does not free a parameter holds it at (the assumed value, never a calibrated one)."""

Vector = Union[Sequence[float], np.ndarray]
"""A form's parameter coordinates."""

MAX_FOLDS = 5
GOAL_MEDIAN = 0.10
GOAL_WORST = 0.25
"""The accuracy goal a form is chosen against: median |held-out error| and the worst figure."""


@dataclass(frozen=True)
class FitParam:
    """A free parameter: the override keys it sets (tied across devices) or a fitted acceptance."""

    name: str
    keys: tuple[str, ...] = ()
    acceptance_group: Optional[str] = None

    @property
    def field(self) -> str:
        return "acceptance" if self.acceptance_group else self.name.rsplit(".", 1)[-1]

    def to_x(self, value: float) -> float:
        return 1.0 / value if self.field.endswith("_efficiency") else value

    def from_x(self, x: float) -> float:
        return 1.0 / x if self.field.endswith("_efficiency") else x

    @property
    def lower_x(self) -> float:
        """Efficiencies stay <= 1 (their coordinate 1/eff >= 1)."""
        return 1.0 if self.field.endswith("_efficiency") else 0.0

    @property
    def upper_x(self) -> float:
        return 0.995 if self.acceptance_group else math.inf


@dataclass(frozen=True)
class FitForm:
    """Which parameters are free; the others of its devices are pinned to :data:`PRIOR`."""

    name: str
    params: tuple[FitParam, ...]
    pinned: Mapping[str, float] = field(default_factory=dict)

    def overrides(self, x: Vector) -> dict[str, float]:
        return {**self.pinned, **{k: p.from_x(float(v)) for p, v in zip(self.params, x) for k in p.keys}}

    def acceptances(self, x: Vector) -> dict[str, float]:
        return {p.acceptance_group: p.from_x(float(v)) for p, v in zip(self.params, x) if p.acceptance_group}

    def values(self, x: Vector) -> dict[str, float]:
        return {p.name: p.from_x(float(v)) for p, v in zip(self.params, x)}


def figure_measurement(fig: Figure) -> Measurement:
    """A figure as a measurement: TTFT = one prefill; TPOT = the mean step over the output."""
    if fig.metric == "ttft_s":
        return Measurement("prefill", 1, fig.prompt_tokens, 0, fig.value_s, fig.name)
    steps = fig.output_tokens - 1
    return Measurement("decode", fig.batch, steps, fig.batch * (fig.prompt_tokens + 1), fig.value_s, fig.name)


def predict_figure(fig: Figure, overrides: Optional[Mapping[str, Any]] = None,
                   acceptance: Optional[float] = None) -> float:
    """The cost model's prediction of a figure (catalog values unless ``overrides`` say otherwise;
    a figure whose acceptance is fitted needs ``acceptance``)."""
    if acceptance is None and fig.fit_group is not None:
        acceptance = catalog_acceptance(fig.fit_group)
    cost = build_group_cost(fig.group, fig.model, {**fig.overrides, **(overrides or {})},
                            speculation=fig.speculation(acceptance))
    predicted = predict_s(cost, figure_measurement(fig))
    if fig.closed_loop and fig.metric == "tpot_s" and fig.batch > 1:
        # While a request lives, each of the other c - 1 slots turns over once: their prefills stall it.
        stall = cost.prefill_time_s([fig.prompt_tokens], [0]) * (fig.batch - 1)
        predicted += stall / (fig.output_tokens - 1)
    return predicted


def _predict(form: FitForm, x: Vector, figs: Sequence[Figure]) -> np.ndarray:
    """The form's predictions of ``figs`` at ``x`` (its overrides made once for all of them)."""
    overrides, accepted, neutral = form.overrides(x), form.acceptances(x), NEUTRAL["acceptance"]
    return np.array([predict_figure(f, overrides, accepted.get(f.fit_group, neutral) if f.fit_group else neutral)
                     for f in figs])


def forms_for(figs: Sequence[Figure]) -> tuple[FitForm, ...]:
    """The candidate forms of one family: per-device latency terms, shared efficiencies, and one
    acceptance per fitted speculative group. ``compute_efficiency`` only when a TTFT pins it."""
    devices = sorted({f.device for f in figs})
    groups = sorted({f.fit_group for f in figs if f.fit_group})

    def keys(name: str) -> tuple[str, ...]:
        return tuple(f"cost.{d}.{name}" for d in devices)

    def shared(name: str) -> FitParam:
        return FitParam(f"cost.{'+'.join(devices)}.{name}", keys(name))

    per_device = {d: sum(1 for f in figs if f.device == d) for d in devices}

    def each(name: str, *also: str) -> tuple[FitParam, ...]:
        return tuple(FitParam(f"cost.{d}.{name}", (f"cost.{d}.{name}",) + tuple(f"cost.{d}.{a}" for a in also))
                     for d in devices)

    def form(name: str, *terms: tuple[FitParam, ...]) -> FitForm:
        # A device with n figures gets at most n - 1 free terms (in the order given): the 2024 CS-3
        # software, with two figures, keeps only its per-layer latency.
        free: list[FitParam] = []
        for d in devices:
            mine = [p for term in terms for p in term if p.name.startswith(f"cost.{d}.")]
            free += mine[:max(1, per_device[d] - 1)]
        bound = {k for p in free for k in p.keys}
        pinned = {k: v for n, v in PRIOR.items() for k in keys(n) if k not in bound}
        return FitForm(name, base + tuple(free) + acc, pinned)

    base: tuple[FitParam, ...] = (shared("compute_efficiency"),) if any(f.metric == "ttft_s" for f in figs) else ()
    acc = tuple(FitParam(f"acceptance.{g}", acceptance_group=g) for g in groups)
    # Devices of one family (cs3 and its 2024 software) share only the compute efficiency: each
    # software stack has its own latencies. memory_efficiency also sets the KV-read efficiency.
    layer, step, hop = each("layer_latency_s"), each("step_overhead_s"), each("pp_hop_s")
    memory, prefill, kv = each("memory_efficiency", "kv_read_efficiency"), each("prefill_overhead_s"), each("kv_read_efficiency")
    forms: tuple[FitForm, ...] = (
        form("per-layer latency", layer),
        form("per-layer latency + memory efficiency", layer, memory),
        form("per-step overhead + memory efficiency", step, memory),
        form("per-layer latency + per-step overhead", layer, step),
        form("per-layer latency + per-step overhead + memory efficiency", layer, step, memory),
        form("per-layer latency + prefill overhead", layer, prefill),
        form("per-layer latency + prefill overhead + KV-read efficiency", layer, prefill, kv),
    )
    if any(f.group.pp > 1 for f in figs):
        forms += (
            form("per-layer latency + pipeline hop", layer, hop),
            form("per-step overhead + pipeline hop", step, hop),
            form("per-layer latency + per-step overhead + pipeline hop", layer, step, hop),
        )
    unique: dict[tuple[str, ...], FitForm] = {}
    for f in forms:         # truncated forms of a device with few figures coincide: keep the first
        if len(f.params) < len(figs):
            unique.setdefault(tuple(p.name for p in f.params), f)
    return tuple(unique.values())


def _neutral_x(form: FitForm) -> np.ndarray:
    return np.array([p.to_x(NEUTRAL[p.field]) for p in form.params])


def fit_form(form: FitForm, figs: Sequence[Figure]) -> np.ndarray:
    """The form's parameters fitted on ``figs`` (relative least squares from the neutral start)."""
    y = np.array([f.value_s for f in figs])
    lower = np.array([p.lower_x for p in form.params])
    upper = np.array([p.upper_x for p in form.params])
    return gauss_newton(lambda x: _predict(form, x, figs), y, _neutral_x(form), lower, upper)


def folds(figs: Sequence[Figure]) -> list[int]:
    """Each figure's fold: round-robin over the figures sorted by name (deterministic)."""
    k = min(MAX_FOLDS, len(figs))
    order = sorted(range(len(figs)), key=lambda i: figs[i].name)
    out = [0] * len(figs)
    for rank, i in enumerate(order):
        out[i] = rank % k
    return out


@dataclass(frozen=True)
class FormScore:
    """One form's cross-validation: held-out predictions and the per-fold parameter fits."""

    form: FitForm
    predicted_s: tuple[float, ...]
    fold_values: tuple[dict[str, float], ...]
    errors: tuple[float, ...] = field(default=())

    @property
    def median_abs_error(self) -> float:
        return statistics.median(abs(e) for e in self.errors)

    @property
    def worst_abs_error(self) -> float:
        return max(abs(e) for e in self.errors)

    @property
    def score(self) -> float:
        """How far from the goal (median |error| <= 10%, worst <= 25%): the sum of both ratios; lower wins."""
        return self.median_abs_error / GOAL_MEDIAN + self.worst_abs_error / GOAL_WORST


def cross_validate(form: FitForm, figs: Sequence[Figure]) -> FormScore:
    """k-fold: each fold's figures predicted by a fit on the others."""
    fold_of = folds(figs)
    predicted = [0.0] * len(figs)
    values = []
    for k in sorted(set(fold_of)):
        train = [f for f, fo in zip(figs, fold_of) if fo != k]
        x = fit_form(form, train)
        values.append(form.values(x))
        held = [i for i, fo in enumerate(fold_of) if fo == k]
        for i, p in zip(held, _predict(form, x, [figs[i] for i in held])):
            predicted[i] = float(p)
    errors = tuple(p / f.value_s - 1.0 for p, f in zip(predicted, figs))
    return FormScore(form, tuple(predicted), tuple(values), errors)


@dataclass(frozen=True)
class FamilyResult:
    """A device family's chosen form, its fit on every figure, and the cross-validation behind it."""

    family: str
    figures: tuple[Figure, ...]
    scores: tuple[FormScore, ...]
    chosen: FormScore
    values: dict[str, float]
    """The chosen form fitted on all of the family's figures (what the catalog stores)."""

    def ranges(self) -> dict[str, tuple[float, float]]:
        """Each fitted parameter's spread over the folds (with the all-figure value)."""
        out = {}
        for name, value in self.values.items():
            per_fold = [v[name] for v in self.chosen.fold_values] + [value]
            out[name] = (min(per_fold), max(per_fold))
        return out


def calibrate_family(family: str, figs: Sequence[Figure]) -> FamilyResult:
    """Choose the family's form by k-fold cross-validation and fit it on every figure."""
    scores = tuple(cross_validate(form, figs) for form in forms_for(figs))
    chosen = min(scores, key=lambda s: (round(s.score, 4), len(s.form.params)))
    x = fit_form(chosen.form, figs)
    return FamilyResult(family, tuple(figs), scores, chosen, chosen.form.values(x))


@functools.cache
def calibrate_published() -> dict[str, FamilyResult]:
    """Every catalog device with published figures, calibrated on its own figures (each software
    stack chooses its own form: ``cs3`` and ``cs3-2024`` separately); the accuracy table groups
    them by hardware family."""
    by_device: dict[str, list[Figure]] = {}
    for fig in published_figures():
        by_device.setdefault(fig.device, []).append(fig)
    return {dev: calibrate_family(dev, figs) for dev, figs in sorted(by_device.items()) if len(figs) >= 2}


def catalog_acceptance(group: str) -> float:
    """A fitted speculative acceptance (the catalog's value: the all-figure fit of its family)."""
    for result in calibrate_published().values():
        value = result.values.get(f"acceptance.{group}")
        if value is not None:
            return value
    raise KeyError(f"no fitted acceptance for speculative group {group!r}")


def accuracy_rows() -> list[dict[str, Any]]:
    """The accuracy table: every figure, its fold, held-out prediction, published value, error."""
    rows = []
    for result in calibrate_published().values():
        fold_of = folds(result.figures)
        for fig, pred, fold in zip(result.figures, result.chosen.predicted_s, fold_of):
            rows.append({"device": fig.device, "family": fig.kind, "model": fig.model, "figure": fig.name, "metric": fig.metric,
                         "source": fig.source, "date": fig.date, "published": fig.value_s, "predicted": pred,
                         "rel_err": pred / fig.value_s - 1.0, "held_out": True, "fold": fold,
                         "form": result.chosen.form.name})
    return rows


def summary_by_device(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Per catalog device (``cs3`` and ``cs3-2024`` apart: different software, separately fitted):
    figures, median and worst |held-out error|."""
    out: dict[str, dict[str, float]] = {}
    for dev in sorted({r["device"] for r in rows}):
        errs = [abs(r["rel_err"]) for r in rows if r["device"] == dev and r["held_out"]]
        out[dev] = {"figures": len(errs), "median_abs_err": statistics.median(errs), "worst_abs_err": max(errs)}
    return out
