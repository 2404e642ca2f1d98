"""What a policy sees of a device group: :class:`GroupView`, as of the group's last report.

Compiled with the core (it is re-exported by :mod:`hetero_sched.policies`): the scheduler's
:class:`~hetero_sched.core.fleet.Fleet` writes a view's numbers at every report, thousands of
times a second, and a compiled class takes those writes as stores, not as Python attribute
lookups (2.4% of a run's instructions).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from hetero_sched.core.costmemo import CostMemo
from hetero_sched.core.kvblocks import blocks_for
from hetero_sched.core.kvmemory import prefix_hit_tokens, reservation_tokens
from hetero_sched.core.kvtiers import PrefixPlan
from hetero_sched.core.placement import RequestInfo
from hetero_sched.core.transfer import uncontended_transfer_s
from hetero_sched.costmodel import GroupCost, step_time_s


class GroupView:
    """A group as the scheduler last heard of it (read-only to policies).

    Refreshed from the group at span ends, at most once per report interval; between reports
    the scheduler adds what it routed there itself (it knows that without being told).
    """

    def __init__(self, group_id: int, name: str, device: str, pool: str, role: Any,
                 cost: GroupCost, kv_blocks_total: int, *, block_size: int = 16,
                 max_batch_tokens: int = 16384, max_num_seqs: int = 256,
                 prefix_probe: Optional[Callable[[tuple[int, ...]], int]] = None,
                 prefix_planner: Optional[Callable[[tuple[int, ...], int, int, int], PrefixPlan]] = None,
                 memo: Optional[CostMemo] = None) -> None:
        self.group_id = group_id
        self.name = name
        self.device = device
        self.pool = pool
        self.role = role
        self.can_prefill: bool = role.can_prefill
        self.can_decode: bool = role.can_decode
        self.cost = cost
        self.kv_blocks_total = kv_blocks_total
        self.kv_blocks_free = kv_blocks_total
        self.num_prefill_queued = 0
        self.prefill_queued_tokens = 0
        """Prefill tokens queued or being prefilled."""
        self.num_decode_queued = 0
        self.num_decoding = 0
        self.reported_s = 0.0
        self.block_size = block_size
        """Paging block of the group's KV, tokens."""
        self.max_batch_tokens = max_batch_tokens
        self.max_num_seqs = max_num_seqs
        self._prefix_probe = prefix_probe
        self._prefix_planner = prefix_planner
        self._memo = memo if memo is not None else CostMemo(cost)
        """What the group's cost model answered before (the scheduler passes the group's own)."""

    @property
    def is_draining(self) -> bool:
        """Switching roles: takes no new work of either role until it has drained."""
        return not self.can_prefill and not self.can_decode

    def cached_prefix_blocks(self, hashes: Optional[tuple[int, ...]]) -> int:
        """Leading prefix blocks of ``hashes`` the group's prefix cache holds.

        Live, not as of the last report: the core knows what each group cached when its
        prefills finished (as Dynamo's router hears KV events), and the lookup is a few dict
        probes.
        """
        if not hashes or self._prefix_probe is None:
            return 0
        return self._prefix_probe(hashes)

    @property
    def has_kv_tiers(self) -> bool:
        """Whether the group has KV tiers below device memory (or the cluster store) to plan with."""
        return self._prefix_planner is not None

    def prefix_plan(self, request: RequestInfo) -> Optional[PrefixPlan]:
        """Where ``request``'s prefix lives for this group and what reusing it would cost: the
        core's own plan (:func:`hetero_sched.core.kvtiers.plan_prefix`) over the group's tiers and
        the cluster store — reused blocks per tier, read time, fetch-plus-prefill time alone.
        None without prefix hashes or KV tiers. Live, like :meth:`cached_prefix_blocks`."""
        if not request.prefix_hashes or self._prefix_planner is None:
            return None
        return self._prefix_planner(request.prefix_hashes, request.prefix_block_tokens,
                                    request.prompt_tokens - request.generated, request.prompt_tokens)

    @property
    def decode_load(self) -> int:
        """Sequences decoding here or waiting for a decode slot."""
        return self.num_decoding + self.num_decode_queued

    # --- the core's own formulas, for policies to predict with (never re-derived) -----------
    def reservation_blocks(self, request: RequestInfo) -> int:
        """KV blocks decode admission here would reserve for ``request`` once prefilled."""
        tokens = reservation_tokens(request.prompt_tokens - request.generated, request.predicted_output,
                                    request.generated + 1, self.kv_blocks_total * self.block_size)
        return blocks_for(tokens, self.block_size)

    def has_decode_room(self, request: RequestInfo) -> bool:
        """A free decode slot and KV for ``request``'s reservation, as of the last report — and a
        group that could hold it at all (its prompt, the prefill's token and a decode step)."""
        return (self.decode_load < self.max_num_seqs
                and blocks_for(request.prompt_tokens + 2, self.block_size) <= self.kv_blocks_total
                and self.kv_blocks_free >= self.reservation_blocks(request))

    def cached_tokens(self, request: RequestInfo) -> int:
        """Prompt tokens this group's prefix cache would save ``request`` now (as the core counts them)."""
        if not request.prefix_hashes:
            return 0
        return prefix_hit_tokens(self.cached_prefix_blocks(request.prefix_hashes), request.prefix_block_tokens,
                                 request.prompt_tokens - request.generated, request.prompt_tokens)

    def decode_step_s(self, batch_size: int, context_tokens: float) -> float:
        """One decode step's time here with ``batch_size`` sequences and ``context_tokens`` in all."""
        return step_time_s(self._memo.decode_lines(batch_size), context_tokens)

    def prefill_s(self, new_tokens: int, cached_tokens: int = 0) -> float:
        """One prefill iteration's time here for one prompt of ``new_tokens`` to compute after
        ``cached_tokens`` already held: ``cost.prefill_time_s([new_tokens], [cached_tokens])``,
        remembered with the group's own answers (a prediction per candidate and decision costs a
        dict probe, not the cost model)."""
        return self._memo.prefill_s([new_tokens], [cached_tokens])

    def transfer_s(self, request: RequestInfo, dst: "GroupView") -> float:
        """``request``'s KV (prompt plus the token its prefill makes) from here to ``dst``, with
        the link to itself (the core shares links max-min between concurrent transfers)."""
        num_bytes = (request.prompt_tokens + 1) * self.cost.transfer_bytes_per_token
        return uncontended_transfer_s(num_bytes, self.cost.egress_bytes_per_s, dst.cost.ingress_bytes_per_s,
                                      self.cost.message_cost_s)
