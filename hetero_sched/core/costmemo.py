"""What groups and policies ask of a cost model, remembered per cost model.

The cost model is plain Python (a one-prompt prefill time ~3 µs, a decode step's lines tens of
µs with speculative decoding), and the questions repeat: batch sizes, and prompt lengths with
their cached prefixes. Groups built alike share one cost model and one memo, and a group's view
asks through the same memo, so a policy predicting with the core's own formulas (``disagg-slo``
asks two prefill times and a decode step per candidate and decision) pays for each answer once.
The answers are the cost model's own, bit for bit.
"""

from __future__ import annotations

from typing import Final

from hetero_sched.costmodel import GroupCost, Line

PREFILL_MEMO_SIZE: Final = 1 << 16
"""One-prompt prefill times a memo keeps, at most (then it asks the cost model)."""


class CostMemo:
    """The answers of one cost model: decode-step lines per batch size, and the prefill time of a
    one-prompt span per (new, cached) tokens."""

    def __init__(self, cost: GroupCost) -> None:
        self.cost = cost
        self.lines: dict[int, tuple[Line, ...]] = {}
        self.prefill: dict[int, float] = {}

    def decode_lines(self, batch_size: int) -> tuple[Line, ...]:
        """``cost.decode_step_lines(batch_size)``."""
        lines = self.lines.get(batch_size)
        if lines is None:
            lines = self.lines[batch_size] = self.cost.decode_step_lines(batch_size)
        return lines

    def prefill_s(self, new_tokens: list[int], cached_tokens: list[int]) -> float:
        """``cost.prefill_time_s(new_tokens, cached_tokens)`` (remembered for one prompt)."""
        if len(new_tokens) != 1 or not 0 <= cached_tokens[0] < 1 << 32:
            return self.cost.prefill_time_s(new_tokens, cached_tokens)
        key = new_tokens[0] << 32 | cached_tokens[0]
        duration = self.prefill.get(key)
        if duration is None:
            duration = self.cost.prefill_time_s(new_tokens, cached_tokens)
            if len(self.prefill) < PREFILL_MEMO_SIZE:
                self.prefill[key] = duration
        return duration

    def absorb(self, other: "CostMemo") -> None:
        """Keep ``other``'s answers too (a group joining a shared memo brings what it asked)."""
        self.lines.update(other.lines)
        self.prefill.update(other.prefill)
