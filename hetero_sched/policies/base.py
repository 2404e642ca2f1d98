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
from typing import Any, ClassVar, Final, Optional, Sequence, Union

from hetero_sched.core.fleet import as_fleet
from hetero_sched.core.placement import Placement, RequestInfo
from hetero_sched.core.view import GroupView
from hetero_sched.errors import DEBUG_HINT, UserError


class RejectCode:
    """Short codes of rejection kinds (plain strings: they are Parquet and JSON values)."""

    OVERLOADED: Final = "overloaded"              # admission.max_inflight requests already in flight
    CONTEXT_TOO_LONG: Final = "context_too_long"  # beyond the model's context window
    KV_CAPACITY: Final = "kv_capacity"            # more KV than a group can ever hold
    SLO_TTFT: Final = "slo_ttft"                  # a policy predicted the TTFT SLO would be missed
    SLO_TPOT: Final = "slo_tpot"                  # ... or the TPOT SLO
    NO_DECODE_ROOM: Final = "no_decode_room"      # a policy found no decode slot and KV for it now
    NO_LIVE_GROUP: Final = "no_live_group"        # no group of a role is in service (failed, switching)
    POLICY: Final = "policy"                      # a policy's own reason (or an invalid choice)
    CANCELLED: Final = "cancelled"                # not a rejection: the client gave up (serving)


NEVER_SERVABLE: Final = frozenset({RejectCode.CONTEXT_TOO_LONG, RejectCode.KV_CAPACITY})
"""Codes of requests this deployment can never serve, however long a client waits (beyond the
model's window, more KV than a group can hold); every other code is load or a passing state
that a retry may find gone. A server answers the first kind 400, the rest 429 with Retry-After."""


@dataclass(frozen=True, slots=True)
class Reject:
    """Turn the request away, with a reason the record keeps and a short code summaries group by
    (one of :class:`RejectCode`, or a policy's own)."""

    reason: str
    code: str = RejectCode.POLICY


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
    serves_any_role: bool = False
    """Whether a group may serve the role it was not configured for (heterogeneous fallback;
    role switching is :attr:`rebalances`): the arrival check then counts every group's KV."""

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
            return Reject("no decode-capable group", RejectCode.NO_LIVE_GROUP)
        return best.group_id


def require_roles(policy: str, groups: Sequence[GroupView], prefill: bool, decode: bool) -> None:
    """Fail clearly when a cluster lacks a role the policy needs."""
    if prefill and not any(g.can_prefill for g in groups):
        raise UserError(f"policy {policy}: no group can prefill (set a group's role to prefill or both)")
    if decode and not any(g.can_decode for g in groups):
        raise UserError(f"policy {policy}: no group can decode (set a group's role to decode or both)")


class PolicyFailed(UserError):
    """A policy's own code failed: it raised, or returned something that is not a decision.

    One line naming the policy (a built-in's name, a user's ``module:Class``), the method and
    the exception — ``policy my_mod:P raised ValueError in place(): ... (--debug for the
    traceback)``; the exception is chained (``__cause__``), so ``--debug`` and Python callers
    keep its traceback.
    """

    @staticmethod
    def label(policy: Union[Policy, type[Policy]]) -> str:
        """How a config names the policy."""
        cls = policy if isinstance(policy, type) else type(policy)
        if cls.__module__.startswith("hetero_sched.policies.") and cls.name:
            return cls.name
        return f"{cls.__module__}:{cls.__qualname__}"

    @classmethod
    def raised(cls, policy: Union[Policy, type[Policy]], method: str, exc: BaseException) -> "PolicyFailed":
        """``policy``'s ``method`` raised ``exc``."""
        text = " ".join(str(exc).split())
        where = "" if method == "__init__" else f" in {method}()"
        return cls(f"policy {cls.label(policy)} raised {type(exc).__name__}{where}"
                   f"{': ' + text if text else ''} {DEBUG_HINT}")

    @classmethod
    def returned(cls, policy: Policy, method: str, value: Any, expected: str) -> "PolicyFailed":
        """``policy``'s ``method`` returned ``value`` where ``expected`` was due."""
        shown = repr(value)
        return cls(f"policy {cls.label(policy)}: {method}() returned "
                   f"{shown if len(shown) <= 80 else shown[:77] + '...'}, expected {expected}")
