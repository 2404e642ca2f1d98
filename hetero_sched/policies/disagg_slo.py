"""``disagg-slo``: SLO-aware routing with early rejection (Mooncake's Conductor).

For an arriving request the policy predicts, for every prefill group ``p`` and decode group
``d``:

- TTFT at ``p`` = queue + own prefill: the queued prefill tokens at the cost of full
  iterations (``max_batch_tokens`` each, linear share) plus this prompt's prefill time,
  less its prefix-cache hit at ``p``;
- the transfer ``p → d``: the prompt's unique KV bytes at the pair's uncontended bandwidth
  plus one message;
- TPOT at ``d``: one decode step with ``d``'s batch plus this request, over its reserved KV
  (blocks in use + this prompt), plus the transfer spread over the predicted output tokens —
  provided ``d`` has a free slot and KV headroom for the reservation (prompt + *predicted*
  output, the same reservation the core makes).

It routes to the prefill group with the lowest predicted queue + prefill + transfer among
placements meeting both SLOs, and rejects the request at once, with the reason, when none
does. The decode group is picked when prefill ends (fresher state), by the most reserved-KV
headroom among those meeting the TPOT SLO (ties: lower predicted TPOT), else least loaded.
Output lengths are the predictor's (``oracle: true`` in the experiment makes them exact).

**At scale.** Groups built alike (a *kind*: same cost model and limits) predict alike, so the
policy evaluates, per prefill kind, the group with the fewest queued prefill tokens plus the
groups whose prefix cache holds the request's first block (the only ones whose prediction can
beat it), and per decode kind the group with the most free KV among those with a free slot
(the one with the most reserved-KV headroom: the one place_decode would try first). The
prefill side is exactly the scan over every group; the decode side judges each decode kind at
that one group — a decode group with less headroom that would meet the TPOT SLO while the
most-headroom one does not is not considered (with one decode group per kind, as in the
shipped experiments, nothing changes). A decision costs O(prefill kinds × decode kinds +
prefix holders), not O(prefill groups × decode groups).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

from hetero_sched.core.fleet import DECODE_SLOT, FREE_KV, PREFILL, PREFILL_TOKENS, Fleet, as_fleet
from hetero_sched.policies.base import Decision, GroupView, Placement, Reject, RejectCode, RequestInfo
from hetero_sched.policies.disagg import Disagg
from hetero_sched.policies.registry import register


def predicted_ttft_s(request: RequestInfo, g: GroupView) -> float:
    """Queue wait plus the request's own prefill at prefill group ``g``."""
    queue_s = 0.0
    if g.prefill_queued_tokens:
        full = g.max_batch_tokens
        queue_s = g.prefill_queued_tokens / full * g.prefill_s(full)
    hit = g.cached_tokens(request)
    return queue_s + g.prefill_s(request.prompt_tokens - hit, hit)


def predicted_tpot_s(request: RequestInfo, d: GroupView, transfer: float) -> Optional[float]:
    """TPOT at decode group ``d``; None if it has no slot or KV headroom for the reservation now.

    One decode step with ``d``'s batch plus this request over its reserved KV (blocks in use
    plus this prompt), plus the transfer spread over the predicted output tokens.
    """
    if not d.has_decode_room(request):
        return None
    context = (d.kv_blocks_total - d.kv_blocks_free) * d.block_size + request.prompt_tokens + 1
    return d.decode_step_s(d.decode_load + 1, context) + transfer / max(request.predicted_output - 1, 1)


def fastest_prefill(request: RequestInfo, fleet: Fleet, kind: int) -> Optional[tuple[float, int]]:
    """``(predicted TTFT, group id)`` of the prefill group of ``kind`` with the lowest predicted
    TTFT (ties: lowest id): the least-queued group not holding the request's first prefix block
    (without a hit, TTFT grows with the queue), or one of the groups holding it."""
    best: Optional[tuple[float, int]] = None
    holders = [g for g in fleet.prefix_holders(request.prefix_hashes[0])
               if g.can_prefill and fleet.kind_of(g.group_id) == kind] if request.prefix_hashes else []
    if holders:
        held = {g.group_id for g in holders}
        least = next((g for g in fleet.ordered(PREFILL_TOKENS, PREFILL, kind) if g.group_id not in held), None)
    else:                                   # nothing to skip: no walk of the ranking
        least = fleet.best(PREFILL_TOKENS, PREFILL, kind)
    candidates = holders + ([least] if least is not None else [])
    for g in candidates:
        key = (predicted_ttft_s(request, g), g.group_id)
        if best is None or key < best:
            best = key
    return best


def decode_candidates(fleet: Fleet) -> list[GroupView]:
    """Per decode kind, the group with the most free KV among those with a free slot."""
    out = []
    for kind in range(fleet.num_kinds):
        d = fleet.best(FREE_KV, DECODE_SLOT, kind)
        if d is not None:
            out.append(d)
    return out


@register
class DisaggSLO(Disagg):
    """Predict TTFT and TPOT per placement; route to the fastest feasible one; reject early."""

    name = "disagg-slo"

    def __init__(self, ttft_slo_s: float = 2.0, tpot_slo_s: float = 0.05, fallback: bool = False,
                 fallback_prefill_batches: float = 4.0) -> None:
        if ttft_slo_s <= 0 or tpot_slo_s <= 0:
            raise ValueError("ttft_slo_s and tpot_slo_s must be positive")
        super().__init__(fallback=fallback, fallback_prefill_batches=fallback_prefill_batches)
        self.ttft_slo_s = ttft_slo_s
        self.tpot_slo_s = tpot_slo_s

    def place(self, request: RequestInfo, groups: Sequence[GroupView], now_s: float) -> Decision:
        fleet = as_fleet(groups)
        borrowed = self.borrowed_prefill(request, fleet)
        if borrowed is not None:
            return borrowed
        best: Optional[tuple[float, int]] = None
        best_ttft = best_tpot = math.inf
        decoders = decode_candidates(fleet)
        for kind in range(fleet.num_kinds):
            fastest = fastest_prefill(request, fleet, kind)
            if fastest is None:
                continue
            ttft, pid = fastest
            best_ttft = min(best_ttft, ttft)
            if ttft > self.ttft_slo_s:
                continue
            p = fleet[pid]
            for d in decoders:
                move = p.transfer_s(request, d)
                tpot = predicted_tpot_s(request, d, move)
                if tpot is None:
                    continue
                best_tpot = min(best_tpot, tpot)
                if tpot <= self.tpot_slo_s and (best is None or (ttft + move, pid) < best):
                    best = (ttft + move, pid)
        if best is not None:
            return Placement(best[1])
        if best_ttft > self.ttft_slo_s:
            return Reject(f"predicted TTFT {best_ttft:.4g} s exceeds the SLO {self.ttft_slo_s:g} s at every prefill group",
                          RejectCode.SLO_TTFT)
        if best_tpot == math.inf:
            return Reject("no decode group has a slot and KV headroom for the reservation", RejectCode.NO_DECODE_ROOM)
        return Reject(f"predicted TPOT {best_tpot:.4g} s exceeds the SLO {self.tpot_slo_s:g} s at every decode group",
                      RejectCode.SLO_TPOT)

    def place_decode(self, request: RequestInfo, groups: Sequence[GroupView], now_s: float) -> Union[int, Reject]:
        fleet = as_fleet(groups)
        src = fleet[request.prefill_group] if request.prefill_group is not None else None
        best: Optional[tuple[int, float, int]] = None
        for d in decode_candidates(fleet):
            tpot = predicted_tpot_s(request, d, src.transfer_s(request, d) if src is not None else 0.0)
            if tpot is None or tpot > self.tpot_slo_s:
                continue
            key = (-(d.kv_blocks_free - d.reservation_blocks(request)), tpot, d.group_id)
            if best is None or key < best:
                best = key
        if best is not None:
            return best[2]
        return super().place_decode(request, fleet, now_s)    # fallback, else least loaded
