"""Goodput of an experiment, per dollar and against its bound; the CS-3 break-even price.

Goodput (DESIGN contract §5) is the highest arrival rate — the workload replayed faster or
slower with its burst pattern kept (:func:`hetero_sched.workload.scale_to_rate`) — at which
>= 90% of *all* requests meet both SLOs. Here it is also stated as

- output tokens/s: goodput × the workload's mean output length (the token rate served at the
  goodput load; what "high-speed token capacity" means);
- per dollar: requests (or output tokens) per dollar of cluster time, using the catalog's
  prices, which an experiment may override (``cost.cs3.dollars_per_hour`` — CS-3 has no public
  price, so it is always a stated assumption);
- % of the bound (:mod:`hetero_sched.bound`).

The rate grid is scaled to the bound (fractions of it, past it to 1.25×), so the search costs
the same number of simulations whatever the cluster, and a goodput above the bound would be
seen rather than cut off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from hetero_sched.bound import Bound, RateCost, Roles, upper_bound
from hetero_sched.catalog import resolve_catalog
from hetero_sched.experiment import Experiment
from hetero_sched.metrics import SLO, SLO_TIERS, goodput_search
from hetero_sched.workload import Workload, scale_to_rate

GRID_FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.65, 0.8, 1.0, 1.25)
"""Rates tried before bisection, as fractions of the bound."""


def tier_slo(tier: str) -> SLO:
    """An SLO tier by name (standard | high-speed)."""
    from hetero_sched.errors import UserError

    if tier not in SLO_TIERS:
        raise UserError(f"unknown SLO tier {tier!r}; known: {', '.join(SLO_TIERS)}")
    return SLO_TIERS[tier]


@dataclass(frozen=True)
class GoodputResult(RateCost):
    """Goodput of one experiment at one SLO tier, with its bound and the search's points.

    ``tokens_per_s`` / ``requests_per_dollar`` / ``tokens_per_dollar`` count only requests
    served within the SLO (the rate is the goodput)."""

    tier: str
    rate_per_s: float
    mean_output_tokens: float
    dollars_per_hour: float
    bound: Bound
    capped: bool
    """True if even the highest grid rate (1.25× the bound) met the target."""
    points: tuple[tuple[float, float], ...] = ()
    """(rate, attainment) of every simulation of the search, in the order run."""
    at_goodput: dict[str, Any] = field(default_factory=dict)
    """The summary of the simulation at the goodput rate (utilization, bottleneck)."""

    @property
    def pct_of_bound(self) -> Optional[float]:
        """Goodput as a percentage of the bound (None if the trace is short enough for its
        bound to be unlimited: every request could be served in one burst within its SLO)."""
        if math.isinf(self.bound.rate_per_s):
            return None
        return 100.0 * self.rate_per_s / self.bound.rate_per_s if self.bound.rate_per_s > 0 else 0.0

    def row(self, prefix: str = "") -> dict[str, Any]:
        """Flat values for a table row, keys optionally prefixed."""
        values = {
            "goodput_rps": self.rate_per_s, "goodput_tokens_per_s": self.tokens_per_s,
            "goodput_requests_per_dollar": self.requests_per_dollar,
            "goodput_tokens_per_dollar": self.tokens_per_dollar, "pct_of_bound": self.pct_of_bound,
            "bound_rps": self.bound.rate_per_s, "bound_tokens_per_s": self.bound.tokens_per_s,
            "bound_bottleneck": self.bound.bottleneck, "goodput_capped": self.capped,
        }
        return {f"{prefix}{k}": v for k, v in values.items()}


def simulate_at(exp: Experiment, workload: Workload, rate_per_s: float) -> dict[str, Any]:
    """The summary of ``exp`` with ``workload`` replayed at ``rate_per_s``."""
    from hetero_sched.sim import simulate

    return simulate(exp, workload=scale_to_rate(workload, rate_per_s)).summary


ROLE_SWITCHING_POLICIES = ("adaptive",)
"""Policies whose groups may change role: their bound lets every group take either role."""


def bound_roles(exp: Experiment) -> Roles:
    """``any`` when the experiment's policy may move a group to the other role (role switching,
    or heterogeneous fallback), else ``configured``: the bound must cover what the policy can do."""
    if exp.policy.name in ROLE_SWITCHING_POLICIES or exp.policy.params.get("fallback"):
        return "any"
    return "configured"


def measure_goodput(exp: Experiment, workload: Workload, tier: str, *, base_dir: Optional[Path] = None,
                    roles: Optional[Roles] = None, fractions: Sequence[float] = GRID_FRACTIONS,
                    rel_tol: float = 0.02, bound: Optional[Bound] = None) -> GoodputResult:
    """Goodput of ``exp`` on ``workload`` at an SLO tier (the experiment's ``slo`` is replaced)."""
    slo = tier_slo(tier)
    exp = exp.model_copy(update={"slo": tier})
    if bound is None:
        bound = upper_bound(exp, workload, slo, base_dir, roles or bound_roles(exp))
    summaries: dict[float, dict[str, Any]] = {}

    def attainment_at(rate: float) -> float:
        summaries[rate] = simulate_at(exp, workload, rate)
        return float(summaries[rate]["slo_attainment"])

    mean_out = bound.mean_output_tokens
    if not bound.rate_per_s > 0:
        return GoodputResult(tier, 0.0, mean_out, bound.dollars_per_hour, bound, False)
    scale = bound.rate_per_s if math.isfinite(bound.rate_per_s) else bound.steady_rate_per_s
    grid = [f * scale for f in fractions]
    found = goodput_search(attainment_at, grid, target=bound.attainment_target, rel_tol=rel_tol)
    while found.capped and math.isinf(bound.rate_per_s) and grid[-1] < 64 * scale:
        grid = [grid[-1] * 2]   # an unlimited bound: keep doubling until the SLO fails
        more = goodput_search(attainment_at, [found.rate_per_s, *grid], target=bound.attainment_target,
                              rel_tol=rel_tol)
        found = type(found)(more.rate_per_s, found.points + more.points, more.capped)
    at = summaries.get(found.rate_per_s, {})
    return GoodputResult(tier, found.rate_per_s, mean_out, bound.dollars_per_hour, bound, found.capped,
                         found.points, at)


def cs3_share(exp: Experiment) -> tuple[int, float]:
    """CS-3 systems in the cluster and the $/h of everything else (for the break-even price)."""
    cat = resolve_catalog(exp.overrides, exp.catalog_data)
    systems = 0
    other = 0.0
    for g in exp.groups:
        if g.device == "cs3":
            systems += g.count * g.replicas
        else:
            other += cat.cost(g.device).dollars_per_hour * g.count * g.replicas
    return systems, other


def breakeven_cs3_dollars_per_hour(goodput_rps: float, cs3_systems: int, other_dollars_per_hour: float,
                                   best_gpu_requests_per_dollar: float) -> Optional[float]:
    """The CS-3 $/h (per system) at which a mix serves as many SLO-meeting requests per dollar
    as the best GPU mix; None without CS-3s; <= 0 means it cannot break even at any price."""
    if cs3_systems == 0 or not best_gpu_requests_per_dollar > 0:
        return None
    affordable = goodput_rps * 3600.0 / best_gpu_requests_per_dollar   # $/h at the GPU mix's efficiency
    return (affordable - other_dollars_per_hour) / cs3_systems
