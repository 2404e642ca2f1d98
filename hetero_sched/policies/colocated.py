"""``colocated``: every group prefills and decodes its own requests (vLLM-style, prefill first)."""

from __future__ import annotations

from typing import Sequence

from hetero_sched.core.fleet import BOTH, PENDING_WORK, as_fleet
from hetero_sched.policies.registry import register
from hetero_sched.policies.base import Decision, GroupView, Placement, Policy, RequestInfo, require_roles


@register
class Colocated(Policy):
    """Route each request to the ``both`` group with the least pending work.

    Pending work is queued prefill tokens plus decoding sequences weighted by
    ``decode_weight_tokens`` (a running sequence costs about that many prefill tokens of time).
    """

    name = "colocated"

    def __init__(self, decode_weight_tokens: float = 64.0) -> None:
        self.decode_weight_tokens = decode_weight_tokens

    def check(self, groups: Sequence[GroupView]) -> None:
        require_roles(self.name, [g for g in groups if g.can_prefill and g.can_decode], True, True)

    def place(self, request: RequestInfo, groups: Sequence[GroupView], now_s: float) -> Decision:
        best = as_fleet(groups).best(PENDING_WORK, BOTH, weight=float(self.decode_weight_tokens))
        assert best is not None   # check() made sure a colocated group exists
        return Placement(best.group_id, best.group_id)
