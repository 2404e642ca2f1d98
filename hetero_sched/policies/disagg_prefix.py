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

With KV tiers (``kv_cache:``) a group's blocks still to compute are what the core's own prefix
plan leaves (:meth:`GroupView.prefix_plan`: blocks reused from device memory, host DRAM, SSD or
the cluster store, where fetching beats recomputing), plus the plan's read time counted in blocks
(one block's prefill time on that group): a prefix in a group's DRAM costs it a little, one only
in the store costs the network read — the router sees where each prefix lives and at what cost.

Without KV tiers only two kinds of group can win, so only they are scored: the groups whose prefix cache holds
the request's first block (the Fleet's prefix holders), and the group with the fewest blocks in
use (a group with no hit scores ``overlap_weight × blocks + blocks in use``, never less than
that group's score) — the same choice as scoring every group, at O(holders + log G). With KV
tiers every prefill group is scored (a prefix may sit in any group's DRAM or SSD, or the store).
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
    plan = g.prefix_plan(request) if g.has_kv_tiers else None
    if plan is None:
        to_compute = float(blocks - min(g.cached_prefix_blocks(request.prefix_hashes), blocks))
    else:
        block_s = g.prefill_s(block)
        to_compute = blocks - min(plan.blocks, blocks) + (plan.fetch_s / block_s if block_s > 0 else 0.0)
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
        if fleet.holders is None:  # KV tiers: any group may hold the prefix in DRAM, SSD or the store
            candidates = [fleet[i] for i in fleet.role_ids(True)]
        else:
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
