"""What the core tells the world as it decides (observers and executors implement it).

The runtime's Ray devices turn these calls into KV operations on the group actors (export,
import, forget); the request tracer turns them into spans; the journal into records. Every
call carries the time it happened, so a listener needs no clock of its own. The simulator
passes none.
"""

from __future__ import annotations

from typing import Protocol

from hetero_sched.core.request import RequestState
from hetero_sched.core.spans import Span, SpanReport


class ExecutorHooks(Protocol):
    """Decisions and request lifecycle events, as they happen in the core."""

    def request_placed(self, now_s: float, rs: RequestState, group_id: int) -> None:
        """``rs`` joined ``group_id``'s prefill queue (on arrival, or again after a preemption)."""
    def span_planned(self, now_s: float, group_id: int, span: Span) -> None: ...
    def span_cut(self, now_s: float, group_id: int, span: Span) -> None: ...
    def span_applied(self, now_s: float, group_id: int, span: Span, report: SpanReport) -> None:
        """``span``'s device report was applied at ``now_s`` (its times are the device's)."""
    def transfer_started(self, now_s: float, transfer_id: int, rs: RequestState, src: int, dst: int,
                         num_bytes: int) -> None: ...
    def kv_landed(self, now_s: float, transfer_id: int, rs: RequestState, src: int, dst: int) -> None: ...
    def request_left(self, now_s: float, group_id: int, rs: RequestState, how: str) -> None:
        """``rs`` left ``group_id`` (completed / preempted / failed): its KV there can go."""
    def request_finished(self, now_s: float, rs: RequestState) -> None:
        """``rs`` ended (completed or rejected); its record is written."""
    def transfer_cancelled(self, now_s: float, transfer_id: int, rs: RequestState, src: int, dst: int) -> None:
        """A transfer will never land: an endpoint's device failed, or its KV came damaged."""
