"""``disagg-prefix``: prefix-cache-aware prefill routing with Dynamo's KV-router cost.

NVIDIA Dynamo's KV router scores each worker as
``overlap_weight × (prefill blocks still to compute) + (blocks in use)`` and picks the lowest.
Here a block is the trace's prefix-hash block (e.g. Mooncake's 512 tokens): blocks to compute
are the prompt's blocks minus the leading ones the group's prefix cache holds (the core's
cache, looked up per request: :meth:`GroupView.cached_prefix_blocks`); blocks in use are the
group's queued prefill tokens plus the KV it holds, in the same block units. A request so goes
to the group holding its prefix unless that group's load outweighs the hit. Ties go to the
lowest group id; requests without hashes are routed on load alone. The decode group is chosen
as by ``disagg``.

Only two kinds of group can win, so only they are scored: the groups whose prefix cache holds
the request's first block (the Fleet's prefix holders), and the group with the fewest blocks in
use (a group with no hit scores ``overlap_weight × blocks + blocks in use``, never less than
that group's score) — the same choice as scoring every group, at O(holders + log G).
"""

from __future__ import annotations

from typing import Optional, Sequence

from hetero_sched.core.fleet import KV_IN_USE, PREFILL, as_fleet
from hetero_sched.policies.base import Decision, GroupView, Placement, RequestInfo
from hetero_sched.policies.disagg import Disagg
from hetero_sched.policies.registry import register


def kv_router_cost(request: RequestInfo, g: GroupView, overlap_weight: float) -> float:
    """Dynamo's cost of sending ``request`` to ``g``, in prefix blocks (lower is better)."""
    block = request.prefix_block_tokens
    blocks = -(-request.prompt_tokens // block)
    to_compute = blocks - min(g.cached_prefix_blocks(request.prefix_hashes), blocks)
    in_use = (g.prefill_queued_tokens + (g.kv_blocks_total - g.kv_blocks_free) * g.block_size) / block
    return overlap_weight * to_compute + in_use


@register
class DisaggPrefix(Disagg):
    """Route prefill by prefix-cache overlap against load (Dynamo's KV router)."""

    name = "disagg-prefix"

    def __init__(self, overlap_weight: float = 1.0, fallback: bool = False,
                 fallback_prefill_batches: float = 4.0) -> None:
        if overlap_weight < 0:
            raise ValueError(f"overlap_weight must be >= 0 (got {overlap_weight})")
        super().__init__(fallback=fallback, fallback_prefill_batches=fallback_prefill_batches)
        self.overlap_weight = overlap_weight

    def place(self, request: RequestInfo, groups: Sequence[GroupView], now_s: float) -> Decision:
        fleet = as_fleet(groups)
        borrowed = self.borrowed_prefill(request, fleet)
        if borrowed is not None:
            return borrowed
        least = fleet.best(KV_IN_USE, PREFILL)
        assert least is not None   # check() made sure a prefill group exists
        candidates = [least]
        if request.prefix_hashes:
            candidates += [g for g in fleet.prefix_holders(request.prefix_hashes[0]) if g.can_prefill]
        best: Optional[tuple[float, int]] = None
        for g in candidates:
            key = (kv_router_cost(request, g, self.overlap_weight), g.group_id)
            if best is None or key < best:
                best = key
        assert best is not None
        return Placement(best[1])
