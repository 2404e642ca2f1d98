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
    def kv_fetched(self, now_s: float, rs: RequestState, group_id: int, tier: int, start_s: float, end_s: float,
                   num_bytes: float, tokens: int) -> None:
        """``tokens`` of ``rs``'s prefix were read from ``tier`` (``core.kvtiers`` codes) into
        ``group_id``'s device memory from ``start_s`` to ``end_s`` (a store read: when it landed)."""
    def store_read_started(self, now_s: float, flow_id: int, rs: RequestState, group_id: int,
                           hashes: tuple[int, ...]) -> None:
        """The cluster KV store starts sending the blocks ``hashes`` to ``group_id`` for ``rs``."""
    def store_write_started(self, now_s: float, flow_id: int, group_id: int, request_id: int,
                            hashes: tuple[int, ...]) -> None:
        """``group_id`` starts writing the blocks ``hashes`` (its prefill of ``request_id``) to the store."""
    def store_evicted(self, now_s: float, blocks: list[tuple[int, int]]) -> None:
        """The store dropped these blocks (full): ``(hash, the write's flow id that had stored it)``."""
