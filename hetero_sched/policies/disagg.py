"""``disagg``: prefill pool → decode pool, least-loaded routing (the Trainium → CS-3 design).

Prefill goes to the prefill group with the fewest pending prefill tokens; the decode group is
chosen when prefill finishes, by fewest decoding-or-waiting sequences (ties: most free KV).

``choices: k`` is power-of-k-choices routing (Mitzenmacher; Ray Serve's default router, with
k = 2): each decision samples ``k`` distinct groups of the right role with a seeded RNG and
takes the less loaded of them (ties: the one sampled first), so the router never scans the
whole pool and herds less on stale loads. Without ``choices`` the least-loaded group comes from
the :class:`~hetero_sched.core.fleet.Fleet`'s indexes (no scan either). ``fallback: true`` lets a saturated pool borrow
the other role's groups (see :mod:`hetero_sched.policies.fallback`).
"""

from __future__ import annotations

import random
from typing import Optional, Sequence, Union

from hetero_sched.core.fleet import as_fleet
from hetero_sched.policies.fallback import fallback_decode, fallback_prefill
from hetero_sched.policies.registry import register
from hetero_sched.policies.base import (Decision, GroupView, Placement, Policy, Reject,
                                        RequestInfo, require_roles)


@register
class Disagg(Policy):
    """Least-loaded (or power-of-``choices``) prefill and decode routing over the groups' roles.

    ``fallback``: decode on the prefill group when no decode group has room, and prefill on a
    decode group when every prefill group has ``fallback_prefill_batches`` iterations queued.
    """

    name = "disagg"

    def __init__(self, choices: Optional[int] = None, seed: int = 0, fallback: bool = False,
                 fallback_prefill_batches: float = 4.0) -> None:
        if choices is not None and choices < 1:
            raise ValueError(f"choices must be at least 1 (got {choices})")
        if fallback_prefill_batches <= 0:
            raise ValueError(f"fallback_prefill_batches must be positive (got {fallback_prefill_batches})")
        self.choices = choices
        self.fallback = fallback
        self.serves_any_role = fallback
        self.fallback_prefill_batches = fallback_prefill_batches
        self._rng = random.Random(seed)

    def check(self, groups: Sequence[GroupView]) -> None:
        require_roles(self.name, groups, prefill=True, decode=True)

    def place(self, request: RequestInfo, groups: Sequence[GroupView], now_s: float) -> Decision:
        fleet = as_fleet(groups)
        if self.fallback:
            borrowed = self.borrowed_prefill(request, fleet)
            if borrowed is not None:
                return borrowed
        if self.choices is None:
            best = fleet.least_prefill_queued()
        else:
            best = None
            for g in fleet.sample(self._rng, True, self.choices):    # in order: ties go to the first
                if best is None or g.prefill_queued_tokens < best.prefill_queued_tokens:
                    best = g
        assert best is not None   # check() made sure a prefill group exists
        return Placement(best.group_id)

    def borrowed_prefill(self, request: RequestInfo, groups: Sequence[GroupView]) -> Optional[Placement]:
        """A decode group to prefill (and decode) ``request`` when the prefill pool is saturated."""
        return fallback_prefill(request, groups, self.fallback_prefill_batches) if self.fallback else None

    def place_decode(self, request: RequestInfo, groups: Sequence[GroupView], now_s: float) -> Union[int, Reject]:
        """The prefill group itself under fallback, else the least-loaded (sampled) decode group."""
        fleet = as_fleet(groups)
        if self.fallback:
            own = fallback_decode(request, fleet)
            if own is not None:
                return own
        if self.choices is None:
            best = fleet.least_decode_loaded()
        else:
            best = None
            for g in fleet.sample(self._rng, False, self.choices):
                if best is None or (g.decode_load, -g.kv_blocks_free) < (best.decode_load, -best.kv_blocks_free):
                    best = g
        if best is None:
            return Reject("no decode-capable group")
        return best.group_id
