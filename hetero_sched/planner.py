"""The placement planner: group counts and parallelism with the most goodput per dollar.

DistServe's search (enumerate prefill and decode parallelism and replica counts, simulate, keep
the best goodput per GPU), extended across device types — a prefill group of one kind, a decode
group of another, or colocated groups of one kind — with prices, and with the KV path between
them in the simulator and the bound. Candidates are ranked by their bound per dollar
(:mod:`hetero_sched.bound`, cheap: no simulation) and simulated in that order; once the next
candidate's bound per dollar is below the best goodput per dollar found, no later one can win
and the search stops (branch and bound). A plan file::

    name: llama70b-high-speed
    model: llama-3.1-70b
    workload: {kind: trace, path: ../../shared/traces/azure2023_conv.csv, num_requests: 1000}
    slo: high-speed
    devices:                       # what may be used, and for what
      trn2: {max_chips: 64, roles: [prefill]}
      cs3: {max_chips: 8, roles: [decode, both]}
      h100: {max_chips: 48, roles: [both]}
    budget_dollars_per_hour: 800   # optional
    overrides: {cost.cs3.dollars_per_hour: 100}   # prices are catalog numbers: override them here
    policies: {disaggregated: disagg, colocated: colocated}
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hetero_sched.bound import (Bound, BoundMaker, GroupCapacity, WorkloadWork, group_capacity, prefill_pair_s,
                                workload_work)
from hetero_sched.catalog import GroupSpec, resolve_catalog
from hetero_sched.configfile import apply_sets, expect_mapping, format_error, read_yaml, shipped_or_path
from hetero_sched.core.group import GroupState, Role
from hetero_sched.costmodel import build_group_cost
from hetero_sched.errors import UserError
from hetero_sched.experiment import (Experiment, GroupConfig, PredictorConfig, SLOConfig, WorkloadConfig,
                                     build_workload, parse_experiment)
from hetero_sched.goodput import GoodputResult, measure_goodput
from hetero_sched.metrics import SLO, SLO_TIERS, short_trace_warning


class DeviceOffer(BaseModel):
    """One device kind the planner may use."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    max_chips: int = Field(ge=1, description="chips (CS-3 systems) available")
    roles: tuple[Literal["prefill", "decode", "both"], ...] = ("prefill", "decode", "both")
    counts: Optional[tuple[int, ...]] = Field(None, description="chips per group to try (default: powers of two)")
    pp: Optional[tuple[int, ...]] = Field(None, description="pipeline depths to try (default: every valid one)")


class PlanPolicies(BaseModel):
    """Which registered policy simulates each kind of candidate."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    disaggregated: str = "disagg"
    colocated: str = "colocated"


class PlanFile(BaseModel):
    """The plan file's schema."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = "plan"
    seed: int = 0
    model: str = "llama-3.1-70b"
    workload: WorkloadConfig
    slo: Union[Literal["standard", "high-speed"], SLOConfig] = "standard"
    predictor: PredictorConfig = Field(default_factory=lambda: PredictorConfig())  # type: ignore[call-arg]
    devices: dict[str, DeviceOffer] = Field(min_length=1)
    budget_dollars_per_hour: Optional[float] = Field(None, gt=0)
    max_replicas: int = Field(8, ge=1)
    policies: "PlanPolicies" = Field(default_factory=lambda: PlanPolicies())
    group_limits: dict[str, Any] = Field(default_factory=dict)
    overrides: dict[str, Any] = Field(default_factory=dict)
    top: int = Field(5, ge=1)
    prune: bool = True
    max_evaluations: int = Field(40, ge=1)
    rel_tol: float = Field(0.03, gt=0, lt=1)


@dataclass(frozen=True)
class Shape:
    """One group shape: a device kind, chips and parallelism."""

    device: str
    count: int
    tp: int
    pp: int

    def label(self) -> str:
        return f"{self.device}[{self.count}" + (f",tp{self.tp}" if self.tp > 1 else "") + \
            (f",pp{self.pp}" if self.pp > 1 else "") + "]"


@dataclass(frozen=True)
class Candidate:
    """A cluster to try: (shape, replicas, role) per kind of group."""

    parts: tuple[tuple[Shape, int, str], ...]
    dollars_per_hour: float
    bound: Bound

    def label(self) -> str:
        return " + ".join((f"{n}×" if n > 1 else "") + f"{s.label()}:{role}" for s, n, role in self.parts)

    @property
    def bound_per_dollar(self) -> float:
        return self.bound.requests_per_dollar


@dataclass
class Evaluated:
    """A simulated candidate and why it scores what it does."""

    candidate: Candidate
    goodput: GoodputResult

    def why(self) -> str:
        """One sentence: the bound's limit, how close the simulation came, who was busiest."""
        g = self.goodput
        groups = g.at_goodput.get("groups", [])
        busiest = max(groups, key=lambda x: x["utilization"], default=None)
        util = ", ".join(f"{role} {sum(x['utilization'] for x in groups if x['role'] == role) / max(1, sum(1 for x in groups if x['role'] == role)):.0%}"
                         for role in dict.fromkeys(x["role"] for x in groups))
        pct = g.pct_of_bound
        text = (f"bound limited by {g.bound.bottleneck}; simulated goodput is {pct:.0f}% of it" if pct is not None
                else "no bound: the trace is short enough to serve in one burst within its SLOs")
        if busiest is not None:
            text += f"; at that rate mean utilization {util}, busiest {busiest['name']} {busiest['utilization']:.0%}"
        rejected = g.at_goodput.get("rejected", 0)
        if rejected:
            text += f"; {rejected} rejected"
        return text


@dataclass
class PlanResult:
    """The ranked plan, and what the search did."""

    ranked: list[Evaluated]
    candidates: int
    evaluated: int
    pruned: int
    stopped_early: bool
    """True if ``max_evaluations`` ended the search before the bound could."""
    best_unevaluated_bound_per_dollar: Optional[float] = None
    assumptions: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    """The best configuration's goodput rests on a trace too short for its rate (short_trace_warning)."""


def load_plan(path: Union[str, Path], sets: Sequence[tuple[str, Any]] = ()) -> tuple[PlanFile, Path]:
    """Read and validate a plan file (or a shipped example by name), ``sets`` (``--set``) applied first."""
    p = shipped_or_path(path)
    data = expect_mapping(read_yaml(p, "plan"), str(p), "plan")
    if sets:
        data = apply_sets(data, sets, tuple(PlanFile.model_fields), "plan")
    try:
        return PlanFile.model_validate(data), p.parent
    except ValidationError as exc:
        raise UserError(format_error(str(p), exc)) from None


def _powers_of_two(limit: int) -> list[int]:
    out, c = [], 1
    while c <= limit:
        out.append(c)
        c *= 2
    return out


def shapes(plan: PlanFile, device: str) -> list[Shape]:
    """Valid group shapes of a device for the plan's model (weights fit; tp*pp = ranks)."""
    offer = plan.devices[device]
    cat = resolve_catalog(plan.overrides)
    spec = cat.device(device)
    out = []
    for count in offer.counts or _powers_of_two(offer.max_chips):
        for pp in offer.pp or [p for p in range(1, count + 1) if count % p == 0]:
            tp = count * spec.units_per_chip // pp
            try:
                GroupSpec(device, count, tp, pp)
                build_group_cost(GroupSpec(device, count, tp, pp), plan.model, plan.overrides)
            except UserError:
                continue
            out.append(Shape(device, count, tp, pp))
    return out


def _group_config(name: str, shape: Shape, replicas: int, role: str, limits: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "device": shape.device, "count": shape.count, "tp": shape.tp, "pp": shape.pp,
            "replicas": replicas, "role": role, **limits}


def experiment_for(plan: PlanFile, cand: Candidate, base_dir: Path) -> Experiment:
    """The experiment that simulates a candidate."""
    from hetero_sched.sweep import absolute_paths

    colocated = all(role == "both" for _, _, role in cand.parts)
    groups = [_group_config(f"{role}-{s.device}", s, n, role, plan.group_limits) for s, n, role in cand.parts]
    exp = {"name": plan.name, "seed": plan.seed, "model": plan.model, "groups": groups,
           "policy": plan.policies.colocated if colocated else plan.policies.disaggregated,
           "workload": plan.workload.model_dump(mode="json", exclude_none=True),
           "slo": plan.slo if isinstance(plan.slo, str) else plan.slo.model_dump(),
           "predictor": plan.predictor.model_dump(), "overrides": dict(plan.overrides)}
    return parse_experiment(absolute_paths(exp, base_dir), "plan candidate")


def candidates(plan: PlanFile, makers: dict[Shape, BoundMaker], caps: dict[tuple[Shape, str], Optional[GroupCapacity]]) -> list[Candidate]:
    """Every cluster within the chips and budget: one prefill kind + one decode kind, or one
    colocated kind, each with 1..max_replicas groups."""
    def fits(parts: Sequence[tuple[Shape, int, str]]) -> Optional[float]:
        chips: dict[str, int] = {}
        for s, n, _ in parts:
            chips[s.device] = chips.get(s.device, 0) + s.count * n
        if any(used > plan.devices[d].max_chips for d, used in chips.items()):
            return None
        cost = 0.0
        for s, n, role in parts:
            cap = caps[(s, role)]
            assert cap is not None
            cost += cap.dollars_per_hour * n
        if plan.budget_dollars_per_hour is not None and cost > plan.budget_dollars_per_hour + 1e-9:
            return None
        return cost

    by_role: dict[str, list[Shape]] = {"prefill": [], "decode": [], "both": []}
    for (shape, role), cap in caps.items():
        if cap is not None:
            by_role[role].append(shape)
    reps = range(1, plan.max_replicas + 1)
    layouts = itertools.chain(   # generated, not listed: only the candidates that fit are kept
        (((sp, n_p, "prefill"), (sd, n_d, "decode"))
         for sp in by_role["prefill"] for sd in by_role["decode"] for n_p in reps for n_d in reps),
        (((sb, n, "both"),) for sb in by_role["both"] for n in reps))
    out = []
    for parts in layouts:
        cost = fits(parts)
        if cost is None:
            continue
        group_caps = [caps[(s, role)] for s, n, role in parts for _ in range(n)]
        maker = makers[parts[0][0]]   # the first group prefills (prefill or both)
        out.append(Candidate(parts, cost, maker.bound(group_caps)))  # type: ignore[arg-type]
    return out


def bounded_candidates(plan: PlanFile, work: WorkloadWork, slo: SLO) -> list[Candidate]:
    """Every candidate with its bound, the best bound per dollar first (ties: cheaper, then by label).

    Linear in the candidates: one bound each (a stage's bound is memoised per capacity, so only
    the stages a candidate changes are recomputed); no pairwise work (``bench/plan_scale.py``).
    """
    limits = GroupConfig(name="x", device="h100", role="both", **plan.group_limits).limits()
    caps: dict[tuple[Shape, str], Optional[GroupCapacity]] = {}
    makers: dict[Shape, BoundMaker] = {}
    for device, offer in plan.devices.items():
        for shape in shapes(plan, device):
            cost = build_group_cost(GroupSpec(shape.device, shape.count, shape.tp, shape.pp), plan.model, plan.overrides)
            for role in offer.roles:
                g = GroupState(0, shape.label(), Role(role), cost, limits, device=device)
                cap = group_capacity(g, work, slo.tpot_s, any_role=False)
                usable = (role != "decode" and not math.isinf(cap.prefill_s_per_request)) or role == "decode"
                caps[(shape, role)] = cap if usable else None
                if role != "decode" and shape not in makers:   # as upper_bound: prefill work weighted
                    makers[shape] = BoundMaker(work, slo, prefill_pair_s(cost, limits, work))  # by this shape
    return sorted(candidates(plan, makers, caps), key=lambda c: (-c.bound_per_dollar, c.dollars_per_hour, c.label()))


def plan_search(plan: PlanFile, base_dir: Path, progress: Optional[Any] = None) -> PlanResult:
    """Rank candidates by bound per dollar, simulate in that order, stop when none can win."""
    if not isinstance(plan.slo, str):
        raise UserError("plan: slo must be a tier name (standard or high-speed)")
    tier = plan.slo
    slo = SLO_TIERS[tier]
    workload = build_workload(plan.workload, plan.seed, base_dir)
    cands = bounded_candidates(plan, workload_work(workload), slo)
    if not cands:
        raise UserError("plan: no configuration fits the devices, chips and budget given "
                        "(does the model fit on any allowed group?)")
    evaluated: list[Evaluated] = []
    best = 0.0
    stopped = False
    next_bound: Optional[float] = None
    for i, cand in enumerate(cands):
        if plan.prune and cand.bound_per_dollar < best:
            next_bound = cand.bound_per_dollar
            break
        if len(evaluated) >= plan.max_evaluations:
            stopped, next_bound = True, cand.bound_per_dollar
            break
        exp = experiment_for(plan, cand, base_dir)
        found = measure_goodput(exp, workload, tier, bound=cand.bound, rel_tol=plan.rel_tol)
        evaluated.append(Evaluated(cand, found))
        best = max(best, found.requests_per_dollar)
        if progress is not None:
            progress(len(evaluated), cand.label())
    ranked = sorted(evaluated, key=lambda e: (-e.goodput.requests_per_dollar, e.candidate.dollars_per_hour,
                                              e.candidate.label()))
    top = ranked[0].goodput if ranked else None
    warning = (short_trace_warning(len(workload), top.rate_per_s, slo, top.mean_output_tokens)
               if top is not None and top.rate_per_s > 0 else None)
    return PlanResult(ranked, len(cands), len(evaluated), len(cands) - len(evaluated), stopped, next_bound,
                      {k: v for k, v in plan.overrides.items()}, [warning] if warning else [])
