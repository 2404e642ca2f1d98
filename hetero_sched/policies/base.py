"""The policy interface: what a policy sees and the small decisions it returns.

A policy decides; the scheduler checks the decision against capacity and applies it (Ray
Serve's router / Vidur's global scheduler split). Policies see a :class:`GroupView` per group,
as of the group's last report (DESIGN contract §4), and a :class:`RequestInfo` carrying a
*predicted* output length — never the true one unless the experiment sets ``oracle: true``.

The ``groups`` a policy gets is a :class:`~hetero_sched.core.fleet.Fleet`: a sequence of views
that also answers "the best group of this role" without scanning every group (``best``,
``ranking``, ``sample``, ``prefix_holders``, per-role totals). A policy that scans ``groups``
still works; at thousands of groups it is what the simulator spends its time on.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, NamedTuple, Optional, Sequence, Union

from hetero_sched.core.fleet import as_fleet
from hetero_sched.core.kvblocks import blocks_for
from hetero_sched.core.kvmemory import prefix_hit_tokens, reservation_tokens
from hetero_sched.core.transfer import uncontended_transfer_s
from hetero_sched.costmodel import GroupCost, step_time_s
from hetero_sched.errors import UserError


class RequestInfo(NamedTuple):
    """What a policy may know about a request (immutable; made twice per request, so a tuple)."""

    request_id: int
    arrival_s: float
    prompt_tokens: int
    """Tokens to prefill (after a preemption: prompt plus tokens already generated)."""
    predicted_output: int
    prefix_hashes: Optional[tuple[int, ...]] = None
    prefix_block_tokens: int = 512
    prefill_group: Optional[int] = None
    """Where it was prefilled (set when :meth:`Policy.place_decode` is asked)."""
    generated: int = 0
    """Tokens it had generated before this prefill (after a preemption; part of ``prompt_tokens``)."""


class GroupView:
    """A group as the scheduler last heard of it (read-only to policies).

    Refreshed from the group at span ends, at most once per report interval; between reports
    the scheduler adds what it routed there itself (it knows that without being told).
    """

    __slots__ = ("group_id", "name", "device", "pool", "role", "can_prefill", "can_decode", "cost", "kv_blocks_total",
                 "kv_blocks_free", "num_prefill_queued", "prefill_queued_tokens",
                 "num_decode_queued", "num_decoding", "reported_s", "block_size", "max_batch_tokens",
                 "max_num_seqs", "_prefix_probe")

    def __init__(self, group_id: int, name: str, device: str, pool: str, role: Any,
                 cost: GroupCost, kv_blocks_total: int, *, block_size: int = 16,
                 max_batch_tokens: int = 16384, max_num_seqs: int = 256,
                 prefix_probe: Optional[Callable[[tuple[int, ...]], int]] = None) -> None:
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
        """A free decode slot and KV for ``request``'s reservation, as of the last report."""
        return self.decode_load < self.max_num_seqs and self.kv_blocks_free >= self.reservation_blocks(request)

    def cached_tokens(self, request: RequestInfo) -> int:
        """Prompt tokens this group's prefix cache would save ``request`` now (as the core counts them)."""
        if not request.prefix_hashes:
            return 0
        return prefix_hit_tokens(self.cached_prefix_blocks(request.prefix_hashes), request.prefix_block_tokens,
                                 request.prompt_tokens - request.generated, request.prompt_tokens)

    def decode_step_s(self, batch_size: int, context_tokens: float) -> float:
        """One decode step's time here with ``batch_size`` sequences and ``context_tokens`` in all."""
        return step_time_s(self.cost.decode_step_lines(batch_size), context_tokens)

    def transfer_s(self, request: RequestInfo, dst: "GroupView") -> float:
        """``request``'s KV (prompt plus the token its prefill makes) from here to ``dst``, with
        the link to itself (the core shares links max-min between concurrent transfers)."""
        num_bytes = (request.prompt_tokens + 1) * self.cost.transfer_bytes_per_token
        return uncontended_transfer_s(num_bytes, self.cost.egress_bytes_per_s, dst.cost.ingress_bytes_per_s,
                                      self.cost.message_cost_s)


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a request prefills, and (optionally, now) where it decodes."""

    prefill_group: int
    decode_group: Optional[int] = None
    """None: decided when prefill finishes (:meth:`Policy.place_decode`)."""


@dataclass(frozen=True, slots=True)
class Reject:
    """Turn the request away, with a reason the record keeps."""

    reason: str


Decision = Union[Placement, Reject]


@dataclass(frozen=True, slots=True)
class RoleSwitch:
    """Drain ``group_id`` and then serve ``role`` (``"prefill"`` or ``"decode"``)."""

    group_id: int
    role: str

    def __post_init__(self) -> None:
        if self.role not in ("prefill", "decode"):      # a user policy's mistake: one line, not a traceback
            raise UserError(f"a policy asked group {self.group_id} to switch to role {self.role!r} "
                            "(roles: prefill, decode)")


class Policy(ABC):
    """A scheduling policy: one abstract method, optional hooks.

    Subclasses take their parameters as keyword arguments (validated by their signature: an
    unknown parameter in a config is a one-line error) and register with
    :func:`hetero_sched.policies.register`.
    """

    name: ClassVar[str] = ""
    rebalances: ClassVar[bool] = False
    """Whether the scheduler should ask :meth:`rebalance` for role switches (at every plan)."""
    chunk_budget_tokens: Optional[int] = None
    """Chunked prefill on colocated groups: tokens per iteration (None: whole prompts)."""

    def check(self, groups: Sequence[GroupView]) -> None:
        """Raise :class:`UserError` if the cluster cannot serve this policy (e.g. no decode group)."""

    @abstractmethod
    def place(self, request: RequestInfo, groups: Sequence[GroupView], now_s: float) -> Decision:
        """Choose the prefill group (and maybe the decode group) for an arriving request."""

    def rebalance(self, groups: Sequence[GroupView], now_s: float) -> Sequence[RoleSwitch]:
        """Role switches to start now (asked only when :attr:`rebalances`)."""
        return ()

    def place_decode(self, request: RequestInfo, groups: Sequence[GroupView], now_s: float) -> Union[int, Reject]:
        """Choose the decode group once prefill is done: least loaded, then most free KV."""
        best = as_fleet(groups).least_decode_loaded()
        if best is None:
            return Reject("no decode-capable group")
        return best.group_id


def require_roles(policy: str, groups: Sequence[GroupView], prefill: bool, decode: bool) -> None:
    """Fail clearly when a cluster lacks a role the policy needs."""
    if prefill and not any(g.can_prefill for g in groups):
        raise UserError(f"policy {policy}: no group can prefill (set a group's role to prefill or both)")
    if decode and not any(g.can_decode for g in groups):
        raise UserError(f"policy {policy}: no group can decode (set a group's role to decode or both)")
