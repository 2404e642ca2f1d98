"""The protocol the scheduling core asks a device group's cost model, and its step-time lines.

Kept apart from :mod:`hetero_sched.costmodel` so that cost-model variants (speculative decoding)
can build on it without importing the module that builds them.
"""

from __future__ import annotations

import math
from typing import Protocol, Sequence, runtime_checkable

Line = tuple[float, float]
"""``(intercept_s, slope_s_per_context_token)`` of one decode-step line."""


@runtime_checkable
class GroupCost(Protocol):
    """Closed-form timing and capacity of one device group serving one model."""

    # Read-only members (properties), so frozen dataclasses implement the protocol.
    @property
    def kv_capacity_tokens(self) -> int:
        """KV tokens the group can hold (device memory or SRAM minus weights and reserve)."""
    @property
    def kv_bytes_per_token(self) -> int:
        """True KV bytes per token held by the whole group (every layer, K and V)."""
    @property
    def transfer_bytes_per_token(self) -> int:
        """Unique KV bytes per token that move between groups (TP-replicated heads sent once)."""
    @property
    def egress_bytes_per_s(self) -> float: ...
    @property
    def ingress_bytes_per_s(self) -> float: ...
    @property
    def message_cost_s(self) -> float:
        """Fixed cost of one KV transfer message (setup, completion notification)."""
    @property
    def dollars_per_hour(self) -> float: ...

    def prefill_time_s(self, new_tokens: Sequence[int], cached_tokens: Sequence[int]) -> float:
        """Time of one prefill iteration over a batch of prompts.

        ``new_tokens[i]`` tokens of prompt *i* are computed; its first ``cached_tokens[i]``
        come from the prefix cache (attended to, not recomputed).
        """
        ...

    def decode_step_lines(self, batch_size: int, tokens_per_seq: int = 1) -> tuple[Line, ...]:
        """Decode step time as a max of lines in total context tokens, for this batch size.

        ``tokens_per_seq > 1`` is a verification step of speculative decoding: every sequence
        runs that many tokens through the model in one forward pass (weights and KV read once).
        """
        ...


def step_time_s(lines: tuple[Line, ...], context_tokens: float) -> float:
    """One decode step's time for ``context_tokens`` total context (the max of the lines)."""
    return max(a + s * context_tokens for a, s in lines)


def upper_envelope(lines: Sequence[Line]) -> list[Line]:
    """Drop lines that never attain the max for ``C >= 0`` (keeps kinks meaningful)."""
    every = tuple(lines)
    peaks = [(c, step_time_s(every, c)) for c in _candidate_contexts(lines)]    # the max where lines cross
    kept = [line for line in set(lines)
            if any(math.isclose(peak, line[0] + line[1] * c, rel_tol=1e-12) for c, peak in peaks)]
    return sorted(kept, key=lambda l: (l[1], l[0]))


def _candidate_contexts(lines: Sequence[Line]) -> list[float]:
    cs = [0.0, 1e12]
    for i, (a1, s1) in enumerate(lines):
        for a2, s2 in lines[i + 1:]:
            if s1 != s2:
                c = (a2 - a1) / (s1 - s2)
                if c > 0:
                    cs.append(c)
    return cs


