"""Heterogeneous fallback for the disaggregated policies: a group may serve the other role.

When every decode group is saturated, the group that just prefilled a request may decode it
itself (a Trainium group decoding at its modelled speed; its KV is already there, nothing
moves); when every prefill group is backed up, a decode group with room may prefill a new
request and decode it (a CS-3 doing its own prefill). The scheduler accepts such *local*
placements on any group that is not switching roles; these helpers decide when to make them.
"""

from __future__ import annotations

from typing import Optional, Sequence

from hetero_sched.core.fleet import DECODE_ONLY_SLOT, DECODE_SLOT, FREE_KV, PREFILL, PREFILL_TOKENS, Fleet, as_fleet
from hetero_sched.policies.base import GroupView, Placement, RequestInfo


def decode_pool_saturated(request: RequestInfo, groups: Sequence[GroupView]) -> bool:
    """No decode group has a slot and KV room for ``request`` now (it would wait)."""
    fleet = as_fleet(groups)
    for kind in range(fleet.num_kinds):   # the kind's most free KV among groups with a slot decides
        g = fleet.best(FREE_KV, DECODE_SLOT, kind)
        if g is not None and g.has_decode_room(request):
            return False
    return True


def prefill_pool_saturated(groups: Sequence[GroupView], batches: float) -> bool:
    """Every prefill group has at least ``batches`` full prefill iterations queued."""
    fleet = as_fleet(groups)
    for kind in range(fleet.num_kinds):   # the kind's least queued prefill group decides
        g = fleet.best(PREFILL_TOKENS, PREFILL, kind)
        if g is not None and not g.prefill_queued_tokens >= batches * g.max_batch_tokens:
            return False
    return True


def fallback_decode(request: RequestInfo, groups: Sequence[GroupView]) -> Optional[int]:
    """The request's own prefill group, if the decode pool is saturated and it has room."""
    src = request.prefill_group
    if src is None or not decode_pool_saturated(request, groups):
        return None
    g = groups[src]
    if g.is_draining or g.can_decode or not g.has_decode_room(request):
        return None
    return src


def fallback_prefill(request: RequestInfo, groups: Sequence[GroupView], batches: float) -> Optional[Placement]:
    """Prefill and decode on the decode group with most free KV, if every prefill group is backed up."""
    fleet: Fleet = as_fleet(groups)
    if not prefill_pool_saturated(fleet, batches):
        return None
    best: Optional[GroupView] = None
    for kind in range(fleet.num_kinds):
        g = fleet.best(FREE_KV, DECODE_ONLY_SLOT, kind)
        if g is not None and g.has_decode_room(request) and (
                best is None or (g.kv_blocks_free, -g.group_id) > (best.kv_blocks_free, -best.group_id)):
            best = g
    return None if best is None else Placement(best.group_id, best.group_id)
