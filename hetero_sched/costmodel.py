"""What the scheduling core asks of a device group's cost model.

The core never computes a time itself: it asks a :class:`GroupCost` (one per device group,
already bound to a model and a parallelism) and gets closed-form answers, so a whole *span* of
decode steps can be timed without stepping token by token (DESIGN contract §1).

The decode step time of a batch of ``b`` sequences holding ``C`` context tokens in all is
``max(a_i + s_i * C for (a_i, s_i) in decode_step_lines(b))``: a maximum of lines in ``C``
(compute roof, memory roof, fixed latencies are all linear in ``C`` for a fixed batch). Where
the maximum switches line is the roofline *kink*; a span ends there so that inside a span the
step time is one line and its sum is an arithmetic series.

Two kinds implement it: :class:`~hetero_sched.roofline.RooflineCost` (physics from the
catalog, calibrated on published figures) and :class:`FittedCost` (per-group coefficients, as
profiling-based simulators use them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

Line = tuple[float, float]
"""``(intercept_s, slope_s_per_context_token)`` of one decode-step line."""


@runtime_checkable
class GroupCost(Protocol):
    """Closed-form timing and capacity of one device group serving one model."""

    kv_capacity_tokens: int
    """KV tokens the group can hold (device memory or SRAM minus weights and reserve)."""
    kv_bytes_per_token: int
    """True KV bytes per token held by the whole group (every layer, K and V)."""
    transfer_bytes_per_token: int
    """Unique KV bytes per token that move between groups (TP-replicated heads sent once)."""
    egress_bytes_per_s: float
    ingress_bytes_per_s: float
    message_cost_s: float
    """Fixed cost of one KV transfer message (setup, completion notification)."""
    dollars_per_hour: float

    def prefill_time_s(self, new_tokens: Sequence[int], cached_tokens: Sequence[int]) -> float:
        """Time of one prefill iteration over a batch of prompts.

        ``new_tokens[i]`` tokens of prompt *i* are computed; its first ``cached_tokens[i]``
        come from the prefix cache (attended to, not recomputed).
        """
        ...

    def decode_step_lines(self, batch_size: int) -> tuple[Line, ...]:
        """Decode step time as a max of lines in total context tokens, for this batch size."""
        ...


def step_time_s(lines: tuple[Line, ...], context_tokens: float) -> float:
    """One decode step's time for ``context_tokens`` total context (the max of the lines)."""
    return max(a + s * context_tokens for a, s in lines)


@dataclass(frozen=True)
class FittedCost:
    """Per-(model, device, parallelism) fitted coefficients, as Vidur/DistServe-style simulators use.

    prefill: ``a + b * sum(tokens) + c * sum(tokens**2)`` (+ ``per_step_s``);
    decode: ``a + b * sum(context) + c * batch`` (+ ``per_step_s``), optionally piecewise by
    batch size: ``decode_pieces`` is a tuple of ``(max_batch, a, b, c)`` sorted by ``max_batch``;
    the first piece whose ``max_batch >= batch`` applies (the last covers anything larger).
    """

    prefill_a_s: float
    prefill_b_s_per_token: float
    prefill_c_s_per_token2: float
    decode_pieces: tuple[tuple[int, float, float, float], ...]
    kv_capacity_tokens: int
    kv_bytes_per_token: int
    transfer_bytes_per_token: int
    egress_bytes_per_s: float
    ingress_bytes_per_s: float
    message_cost_s: float = 0.0
    dollars_per_hour: float = 0.0
    per_step_s: float = 0.0

    def prefill_time_s(self, new_tokens: Sequence[int], cached_tokens: Sequence[int]) -> float:
        """``a + b·Σn + c·Σn(n+2h)`` — cached prefix tokens ``h`` add attention work, not linear work."""
        total = sum(new_tokens)
        quad = sum(n * (n + 2 * h) for n, h in zip(new_tokens, cached_tokens))
        return (self.per_step_s + self.prefill_a_s + self.prefill_b_s_per_token * total
                + self.prefill_c_s_per_token2 * quad)

    def decode_step_lines(self, batch_size: int) -> tuple[Line, ...]:
        """One line: the fitted decode model has no kink."""
        piece = self.decode_pieces[-1]
        for candidate in self.decode_pieces:
            if batch_size <= candidate[0]:
                piece = candidate
                break
        _, a, b, c = piece
        return ((self.per_step_s + a + c * batch_size, b),)
