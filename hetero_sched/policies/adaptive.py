"""``adaptive``: disaggregated routing whose mixed-pool groups switch roles (Splitwise's mixed pool).

Groups in the pool named ``mixed_pool`` (``pool:`` in the experiment; their ``role`` is where
they start) may serve either role. At every scheduling step the policy compares backlogs,
each as a fraction of its pool's capacity:

- prefill backlog ``P`` = queued prefill tokens / Σ ``max_batch_tokens`` of prefill groups
  (iterations waiting per group);
- decode backlog ``D`` = sequences decoding or waiting / Σ ``max_num_seqs`` of decode groups.

When ``P/D ≥ to_prefill_ratio`` the least-loaded mixed decode group switches to prefill; when
``P/D ≤ to_decode_ratio`` the least-loaded mixed prefill group switches to decode. Between the
two thresholds nothing switches (hysteresis), nor while ``max(P, D) < min_load`` (an idle
cluster), nor while a switch is under way (one at a time), nor if it would leave a role with
no group.

**A switch costs its drain time.** The switching group takes no new work of either role; it
finishes what it holds — queued and running prefills, prompt KV until transferred out, decode
requests already routed to it until they complete — and takes its new role once it holds no
request and no KV (logged as ``drain`` then ``role`` with the drain time). Nothing is evicted.
The group keeps the KV budget split of its starting role (a group that starts as decode has
no prefix cache after becoming a prefill group). Routing is ``disagg``'s.

Backlogs come from the Fleet's running per-role totals and the switching group from two
rankings of the mixed pool, so a scheduling step costs O(log G), not a pass over the groups.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

from hetero_sched.core.fleet import Fleet, as_fleet
from hetero_sched.policies.base import GroupView, RoleSwitch
from hetero_sched.policies.disagg import Disagg
from hetero_sched.policies.registry import register


def backlogs(groups: Sequence[GroupView]) -> tuple[float, float]:
    """``(P, D)``: prefill and decode backlog, each relative to its pool's capacity."""
    f = as_fleet(groups)
    return (f.prefill_tokens / f.prefill_batch_tokens if f.prefill_batch_tokens else 0.0,
            f.decode_load / f.decode_slots if f.decode_slots else 0.0)


@register
class Adaptive(Disagg):
    """Least-loaded disaggregated routing plus backlog-driven role switches with hysteresis."""

    name = "adaptive"
    rebalances = True

    def __init__(self, mixed_pool: str = "mixed", to_prefill_ratio: float = 4.0,
                 to_decode_ratio: float = 0.5, min_load: float = 0.25, choices: Optional[int] = None,
                 seed: int = 0, fallback: bool = False, fallback_prefill_batches: float = 4.0) -> None:
        if not 0 < to_decode_ratio < to_prefill_ratio:
            raise ValueError("need 0 < to_decode_ratio < to_prefill_ratio (the hysteresis band)")
        if min_load < 0:
            raise ValueError(f"min_load must be >= 0 (got {min_load})")
        super().__init__(choices, seed, fallback, fallback_prefill_batches)
        self.serves_any_role = True          # any group of the mixed pool may end up in either role
        self.mixed_pool = mixed_pool
        self.to_prefill_ratio = to_prefill_ratio
        self.to_decode_ratio = to_decode_ratio
        self.min_load = min_load

    def rebalance(self, groups: Sequence[GroupView], now_s: float) -> Sequence[RoleSwitch]:
        fleet = as_fleet(groups)
        if fleet.num_idle_roles:            # a group is switching (or failed): one at a time
            return ()
        p, d = backlogs(fleet)
        if max(p, d) < self.min_load:
            return ()
        ratio = p / d if d > 0 else math.inf
        if ratio >= self.to_prefill_ratio:
            pick = self._pick(fleet, decode=True)
            return (RoleSwitch(pick.group_id, "prefill"),) if pick is not None else ()
        if ratio <= self.to_decode_ratio:
            pick = self._pick(fleet, decode=False)
            return (RoleSwitch(pick.group_id, "decode"),) if pick is not None else ()
        return ()

    def _pick(self, fleet: Fleet, decode: bool) -> Optional[GroupView]:
        """The least-loaded mixed-pool group of a role, if another group keeps that role."""
        if (fleet.num_decode if decode else fleet.num_prefill) < 2:
            return None
        pool = self.mixed_pool
        if decode:
            ranking = fleet.ranking(("adaptive-mixed-decode", pool), lambda g: g.decode_load,
                                    lambda g: g.pool == pool and g.can_decode and not g.can_prefill)
        else:
            ranking = fleet.ranking(("adaptive-mixed-prefill", pool), lambda g: g.prefill_queued_tokens,
                                    lambda g: g.pool == pool and g.can_prefill and not g.can_decode)
        return fleet.best_of(ranking)
