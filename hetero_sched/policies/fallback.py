"""Heterogeneous fallback for the disaggregated policies: a group may serve the other role.

When every decode group is saturated, the group that just prefilled a request may decode it
itself (a Trainium group decoding at its modelled speed; its KV is already there, nothing
moves); when every prefill group is backed up, a decode group with room may prefill a new
request and decode it (a CS-3 doing its own prefill). The scheduler accepts such *local*
placements on any group that is not switching roles; these helpers decide when to make them.
"""

from __future__ import annotations

from typing import Optional, Sequence

from hetero_sched.policies.base import GroupView, Placement, RequestInfo


def decode_pool_saturated(request: RequestInfo, groups: Sequence[GroupView]) -> bool:
    """No decode group has a slot and KV room for ``request`` now (it would wait)."""
    return not any(g.can_decode and g.has_decode_room(request) for g in groups)


def prefill_pool_saturated(groups: Sequence[GroupView], batches: float) -> bool:
    """Every prefill group has at least ``batches`` full prefill iterations queued."""
    return all(g.prefill_queued_tokens >= batches * g.max_batch_tokens for g in groups if g.can_prefill)


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
    if not prefill_pool_saturated(groups, batches):
        return None
    best: Optional[GroupView] = None
    for g in groups:
        if g.can_decode and not g.can_prefill and g.has_decode_room(request) \
                and (best is None or g.kv_blocks_free > best.kv_blocks_free):
            best = g
    return None if best is None else Placement(best.group_id, best.group_id)
