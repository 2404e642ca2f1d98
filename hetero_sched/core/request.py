"""Requests: what a workload states (:class:`Request`, frozen) and a request's progress
through the core (:class:`RequestState`, mutable, owned by the scheduler)."""

from __future__ import annotations

import heapq
from enum import Enum
from typing import Final, NamedTuple, Optional

from mypy_extensions import mypyc_attr

ID_BITS: Final = 32
"""Request ids are below ``2**ID_BITS`` (a workload numbers its requests from 0; serving counts)."""
ID_MASK: Final = (1 << ID_BITS) - 1


def step_key(step: int, request_id: int) -> int:
    """``(step, request_id)`` as one int, ordered as the pair: the heaps of steps at which a
    group's requests finish or run out of KV hold these. A tuple per entry was an allocation
    and a collector link to undo when it died, cold by then with a thousand groups in flight;
    an int is neither tracked nor compared item by item."""
    return step << ID_BITS | request_id


def key_step(key: int) -> int:
    """The step of a :func:`step_key`."""
    return key >> ID_BITS


def pop_due(heap: list[int], steps_done: int) -> int:
    """Pop the earliest step key of ``heap`` if its step is at most ``steps_done`` (-1: none
    due). The key's request id is ``key & ID_MASK``."""
    if heap and heap[0] >> ID_BITS <= steps_done:
        return heapq.heappop(heap)
    return -1


class Request(NamedTuple):
    """One inference request as the workload states it (true lengths; policies see predictions).

    A NamedTuple, not a frozen dataclass: just as immutable, and a million of them are made
    per run at C speed.
    """

    request_id: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    prefix_hashes: Optional[tuple[int, ...]] = None
    """Hashes of the prompt's prefix blocks (e.g. Mooncake's), ``prefix_block_tokens`` each."""
    prefix_block_tokens: int = 512
    max_tokens: Optional[int] = None
    token_ids: Optional[tuple[int, ...]] = None
    """The prompt's token ids, when a client sent them (serving); traces and synthetic
    workloads have lengths only, and a real backend derives ids from the request."""


class Phase(Enum):
    """Where a request is. Every request ends COMPLETED or REJECTED (with a reason)."""

    WAITING_PREFILL = "waiting_prefill"
    PREFILLING = "prefilling"
    WAITING_DECODE = "waiting_decode"    # prefilled; waiting for a decode group to reserve KV
    TRANSFERRING = "transferring"        # decode KV reserved; KV on its way
    DECODING = "decoding"
    COMPLETED = "completed"
    REJECTED = "rejected"
    CANCELLED = "cancelled"               # the client gave up on it (serving: it disconnected)


@mypyc_attr(acyclic=True)
class RequestState:
    """Progress and timestamps of one request. Owned by the scheduler; groups update it.

    Acyclic (nothing it refers to refers back to it), so the compiled class keeps no links in
    the cycle collector's list: freeing one would otherwise rewrite its two list neighbours,
    objects made when it was and cold by the time it ends when a thousand groups' requests are
    in flight. (The span report and outcome and a transfer pair are acyclic for the same reason.)
    """

    __slots__ = (
        "request", "request_id", "prompt_tokens", "output_tokens", "predicted_output", "phase", "generated",
        "prefill_group", "decode_group", "prefill_blocks", "decode_blocks", "reserved_tokens",
        "join_step", "join_span", "finish_step", "exhaust_step", "cached_tokens",
        "token1_s", "token2_s", "last_token_s", "max_gap_s", "finish_s",
        "preemptions", "reject_reason", "reject_code", "transfer_id", "prefill_done", "prefill_s", "prefilled_s",
        "cancelled", "staged",
    )

    def __init__(self, request: Request, predicted_output: int) -> None:
        if not 0 <= request.request_id <= ID_MASK:
            raise ValueError(f"request id {request.request_id} is outside 0..{ID_MASK}")
        self.request = request
        self.request_id = request.request_id
        self.prompt_tokens = request.prompt_tokens
        """The request's, copied: read at every span, and with a thousand groups in flight the
        request tuple and its boxed ints are cold memory, a field of this object is not."""
        self.output_tokens = request.output_tokens
        self.predicted_output = predicted_output
        self.phase = Phase.WAITING_PREFILL
        self.generated = 0
        """Tokens produced so far (token 1 comes from prefill)."""
        self.prefill_group: Optional[int] = None
        self.decode_group: Optional[int] = None
        self.prefill_blocks = 0
        self.decode_blocks = 0
        self.reserved_tokens = 0
        self.join_step = 0
        self.join_span = 0
        self.finish_step = 0
        self.exhaust_step = 0
        self.cached_tokens = 0
        self.token1_s: Optional[float] = None
        self.token2_s: Optional[float] = None
        self.last_token_s = 0.0
        self.max_gap_s = 0.0
        self.finish_s: Optional[float] = None
        self.preemptions = 0
        self.reject_reason: Optional[str] = None
        self.reject_code: Optional[str] = None
        """A short :class:`~hetero_sched.policies.base.RejectCode` beside the reason."""
        self.transfer_id: Optional[int] = None
        self.prefill_done = 0
        """Chunked prefill: tokens of the current prefill computed so far (beyond the cached prefix)."""
        self.prefill_s = 0.0
        """Duration of the span that finished its last prefill (what layer-wise streaming overlaps)."""
        self.cancelled = False
        """The client gave up on it: it ends at its next safe point (a step boundary, a prefill's end)."""
        self.prefilled_s: Optional[float] = None
        """When the core applied its last prefill (a transfer starting then was streamed during it)."""
        self.staged: Optional[frozenset[int]] = None
        """Prefix blocks fetched from the cluster KV store for its next prefill (in device memory)."""

    @property
    def prefill_tokens(self) -> int:
        """Tokens a (re-)prefill computes: the prompt plus anything generated before a preemption."""
        return self.prompt_tokens + self.generated

    @property
    def decode_need_tokens(self) -> int:
        """KV tokens a group must be able to hold to prefill and decode this request: the context
        after the prefill's token, and room for one decode step if more tokens remain."""
        more = 1 if self.generated + 1 < self.output_tokens else 0
        return self.prompt_tokens + self.generated + 1 + more

    @property
    def context_tokens(self) -> int:
        """KV tokens this request holds while decoding (prompt + generated)."""
        return self.prompt_tokens + self.generated

    def on_token(self, now_s: float) -> None:
        """Count one more output token produced at ``now_s`` (prefill's token or a decode step)."""
        self.generated += 1
        if self.generated == 1:
            self.token1_s = now_s
        else:
            if self.generated == 2:
                self.token2_s = now_s
            gap = now_s - self.last_token_s
            if gap > self.max_gap_s:
                self.max_gap_s = gap
        self.last_token_s = now_s
