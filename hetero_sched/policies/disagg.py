"""``disagg``: prefill pool → decode pool, least-loaded routing (the Trainium → CS-3 design).

Prefill goes to the prefill group with the fewest pending prefill tokens; the decode group is
chosen when prefill finishes, by fewest decoding-or-waiting sequences (ties: most free KV).
``choices: 2`` samples two candidates per decision instead of scanning all (power of two
choices, seeded, deterministic).
"""

from __future__ import annotations

import random
from typing import Optional, Sequence, Union

from hetero_sched.policies.registry import register
from hetero_sched.policies.base import (Decision, GroupView, Placement, Policy, Reject,
                                        RequestInfo, require_roles)


@register
class Disagg(Policy):
    """Least-loaded prefill and decode routing over the groups' roles."""

    name = "disagg"

    def __init__(self, choices: Optional[int] = None, seed: int = 0) -> None:
        self.choices = choices
        self._rng = random.Random(seed)

    def check(self, groups: Sequence[GroupView]) -> None:
        require_roles(self.name, groups, prefill=True, decode=True)

    def _candidates(self, groups: Sequence[GroupView], prefill: bool) -> Sequence[GroupView]:
        if self.choices is None:
            return groups
        pool = [g for g in groups if (g.can_prefill if prefill else g.can_decode)]
        return pool if len(pool) <= self.choices else self._rng.sample(pool, self.choices)

    def place(self, request: RequestInfo, groups: Sequence[GroupView], now_s: float) -> Decision:
        best: Optional[GroupView] = None
        for g in self._candidates(groups, prefill=True):     # in group order: ties go to the lowest id
            if g.can_prefill and (best is None or g.prefill_queued_tokens < best.prefill_queued_tokens):
                best = g
        assert best is not None   # check() made sure a prefill group exists
        return Placement(best.group_id)

    def place_decode(self, request: RequestInfo, groups: Sequence[GroupView], now_s: float) -> Union[int, Reject]:
        best: Optional[GroupView] = None
        for g in self._candidates(groups, prefill=False):
            if g.can_decode and (best is None or (g.decode_load, -g.kv_blocks_free)
                                 < (best.decode_load, -best.kv_blocks_free)):
                best = g
        assert best is not None
        return best.group_id
