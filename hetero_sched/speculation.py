"""Speculative decoding on the decode side, as an effective per-token step time.

A speculative step drafts ``k`` tokens per sequence (with a small draft model, or with
multi-token-prediction / EAGLE heads) and verifies them with one forward pass of the target over
``k + 1`` tokens per sequence; on average ``τ`` tokens per sequence are emitted per step
(Leviathan et al., 2023: with an i.i.d. per-token acceptance rate ``α``,
``τ = (1 − α^(k+1)) / (1 − α)``). So the time per *emitted* token is::

    (k · draft_step(b, C) + verify_step(b, C, k + 1)) / τ

which is still a maximum of lines in the batch's total context ``C`` (a sum of two maxima of lines
is the maximum of the pairwise sums), so :class:`SpeculativeCost` is a
:class:`~hetero_sched.costmodel.GroupCost` like any other and the scheduling core keeps counting
one token per step: a span of ``n`` "steps" is ``n`` emitted tokens at the effective per-token time.

Approximation (stated): emission is smoothed. A real request receives its tokens in bursts of
1..k+1 per verification step, at a per-request random acceptance; here every request receives
one token every ``step/τ``, so TPOT means are right while inter-token gaps (and the largest gap) are
smoothed, and acceptance is the same for every request. The draft's own context growth inside
one step is ignored (k·b tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from hetero_sched.costlines import GroupCost, Line, upper_envelope
from hetero_sched.errors import UserError


@dataclass(frozen=True)
class Speculation:
    """A speculative-decoding setting: draft length, acceptance, and what a draft token costs."""

    draft_tokens: int
    """``k``: tokens drafted per sequence per step."""
    acceptance_rate: Optional[float] = None
    """``α``: i.i.d. probability that a drafted token is accepted (τ from Leviathan et al.)."""
    tokens_per_step: Optional[float] = None
    """``τ`` directly (vLLM's "mean acceptance length"), instead of ``α``."""
    draft_model: Optional[str] = None
    """A catalog model drafting on the same group (its own roofline: weights, latencies, KV)."""
    draft_cost_fraction: Optional[float] = None
    """Instead of a draft model: one draft token costs this fraction of a target decode step
    (MTP/EAGLE heads, or a draft fused into the target's graph)."""

    def __post_init__(self) -> None:
        if not isinstance(self.draft_tokens, int) or not 1 <= self.draft_tokens <= 64:
            raise UserError(f"speculative: draft_tokens must be an integer 1..64, got {self.draft_tokens!r}")
        if (self.acceptance_rate is None) == (self.tokens_per_step is None):
            raise UserError("speculative: give exactly one of acceptance_rate and tokens_per_step")
        if self.acceptance_rate is not None and not 0.0 <= self.acceptance_rate <= 1.0:
            raise UserError(f"speculative: acceptance_rate must be in [0, 1], got {self.acceptance_rate!r}")
        if self.tokens_per_step is not None and not 1.0 <= self.tokens_per_step <= self.draft_tokens + 1:
            raise UserError(f"speculative: tokens_per_step must be in [1, draft_tokens + 1 = "
                            f"{self.draft_tokens + 1}], got {self.tokens_per_step!r}")
        if (self.draft_model is None) == (self.draft_cost_fraction is None):
            raise UserError("speculative: give exactly one of draft_model and draft_cost_fraction")
        if self.draft_cost_fraction is not None and not 0.0 <= self.draft_cost_fraction <= 10.0:
            raise UserError(f"speculative: draft_cost_fraction must be in [0, 10], got {self.draft_cost_fraction!r}")

    @property
    def expected_tokens(self) -> float:
        """``τ``: tokens emitted per sequence per verification step."""
        if self.tokens_per_step is not None:
            return self.tokens_per_step
        alpha, k = self.acceptance_rate, self.draft_tokens
        assert alpha is not None
        if alpha >= 1.0:
            return float(k + 1)
        return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def acceptance_for(tokens_per_step: float, draft_tokens: int) -> float:
    """The i.i.d. acceptance rate ``α`` giving ``τ = tokens_per_step`` for ``k = draft_tokens``."""
    if not 1.0 <= tokens_per_step <= draft_tokens + 1:
        raise ValueError(f"tokens_per_step {tokens_per_step} outside [1, {draft_tokens + 1}]")
    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if Speculation(draft_tokens, acceptance_rate=mid, draft_cost_fraction=0.0).expected_tokens < tokens_per_step:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _sum_lines(a: Sequence[Line], b: Sequence[Line], scale_b: float) -> list[Line]:
    return [(a0 + scale_b * b0, a1 + scale_b * b1) for a0, a1 in a for b0, b1 in b]


@dataclass(frozen=True)
class SpeculativeCost:
    """A group's cost with speculative decoding: ``target`` verifies, ``draft`` (or a fraction of a
    target step) drafts; decode lines are per *emitted* token (see the module docstring)."""

    target: GroupCost
    speculation: Speculation
    draft: Optional[GroupCost] = None
    kv_capacity_tokens: int = 0
    kv_bytes_per_token: int = 0
    transfer_bytes_per_token: int = 0

    @property
    def egress_bytes_per_s(self) -> float:
        return self.target.egress_bytes_per_s

    @property
    def ingress_bytes_per_s(self) -> float:
        return self.target.ingress_bytes_per_s

    @property
    def message_cost_s(self) -> float:
        return self.target.message_cost_s

    @property
    def dollars_per_hour(self) -> float:
        return self.target.dollars_per_hour

    def prefill_time_s(self, new_tokens: Sequence[int], cached_tokens: Sequence[int]) -> float:
        """The target's prefill, plus the draft model's (it needs its own KV of the prompt)."""
        t = self.target.prefill_time_s(new_tokens, cached_tokens)
        return t + (self.draft.prefill_time_s(new_tokens, cached_tokens) if self.draft is not None else 0.0)

    def decode_step_lines(self, batch_size: int, tokens_per_seq: int = 1) -> tuple[Line, ...]:
        """Per emitted token: ``(k · draft + verify(k + 1)) / τ`` as a max of lines in ``C``."""
        if tokens_per_seq != 1:
            raise ValueError("a speculative group's steps are already verification steps")
        spec = self.speculation
        k = spec.draft_tokens
        verify = self.target.decode_step_lines(batch_size, k + 1)
        if self.draft is not None:
            drafting = self.draft.decode_step_lines(batch_size)
            scale = float(k)
        else:
            assert spec.draft_cost_fraction is not None
            drafting = self.target.decode_step_lines(batch_size)
            scale = k * spec.draft_cost_fraction
        tau = spec.expected_tokens
        lines = [(a / tau, s / tau) for a, s in _sum_lines(verify, drafting, scale)]
        return tuple(upper_envelope(lines))


def speculative_capacity(capacity_tokens: int, held_bytes_per_token: float, draft_held_bytes_per_token: float,
                         draft_weight_bytes: float) -> int:
    """KV tokens left when the draft model's weights and KV share the group's memory."""
    total = held_bytes_per_token + draft_held_bytes_per_token
    return max(0, int(math.floor((capacity_tokens * held_bytes_per_token - draft_weight_bytes) / total)))
