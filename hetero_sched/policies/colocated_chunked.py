"""``colocated-chunked``: colocated serving with chunked prefill under a token budget (Sarathi-Serve).

Every ``both`` group runs iterations of at most ``token_budget`` tokens: one decode token per
running sequence, the rest filled with prefill chunks (prompts under way first, then the
queue in order). A long prompt is split across iterations, so running requests keep getting a
token every iteration instead of stalling behind the whole prefill ("stall-free batching");
TPOT stays bounded by a decode step plus a budget's worth of prefill. Routing is
``colocated``'s (least pending work). The core executes the chunks
(:class:`~hetero_sched.core.group.SpanKind` ``MIXED``).
"""

from __future__ import annotations

from hetero_sched.policies.colocated import Colocated
from hetero_sched.policies.registry import register


@register
class ColocatedChunked(Colocated):
    """Colocated routing; the core chunks prefills to ``token_budget`` tokens per iteration."""

    name = "colocated-chunked"

    def __init__(self, token_budget: int = 512, decode_weight_tokens: float = 64.0) -> None:
        if token_budget < 1:
            raise ValueError(f"token_budget must be at least 1 (got {token_budget})")
        super().__init__(decode_weight_tokens)
        self.chunk_budget_tokens = token_budget
