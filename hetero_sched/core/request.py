"""Requests: what a workload states (:class:`Request`, frozen) and a request's progress
through the core (:class:`RequestState`, mutable, owned by the scheduler)."""

from __future__ import annotations

from enum import Enum
from typing import Final, NamedTuple, Optional

from librt.vecs import append, pop, vec
from mypy_extensions import i64, mypyc_attr

MAX_REQUEST_ID: Final = (1 << 63) - 1
"""The largest request id: the core keeps ids unboxed (64-bit), e.g. in a :class:`StepHeap`
(a workload numbers its requests from 0; serving counts)."""


class StepHeap:
    """A min-heap of ``(step, request id)``: the steps at which a group's requests finish or run
    out of KV, earliest first (entries may be stale: their owners check them when popped).

    The pairs are unboxed in one array, step and id side by side: a list of Python ints (or of
    tuples) was a list header, an item array and an object per entry, three cache lines apart
    and all cold by the time a group's next span ends when a thousand groups take turns. Pairs
    are totally ordered, so the pop order is theirs however the heap is laid out.
    """

    def __init__(self) -> None:
        self._items = vec[i64]()
        self.popped_step: i64 = -1
        """The step of the pair :meth:`pop_due` returned last."""

    def __len__(self) -> int:
        return len(self._items) >> 1

    def clear(self) -> None:
        self._items = vec[i64]()

    def push(self, step: i64, request_id: i64) -> None:
        self._items = append(append(self._items, step), request_id)
        self._sift_up(len(self._items) // 2 - 1, step, request_id)

    def head_step(self) -> i64:
        """The earliest pair's step (the heap must not be empty)."""
        return self._items[0]

    def pop_due(self, steps_done: i64) -> i64:
        """Pop the earliest pair if its step is at most ``steps_done``: returns its request id
        (its step is then :attr:`popped_step`), or -1 if none is due."""
        items = self._items
        if not len(items) or items[0] > steps_done:
            return -1
        self.popped_step = items[0]
        request_id = items[1]
        items, last_id = pop(items)
        self._items, last_step = pop(items)
        if len(self._items):
            self._sift_down(0, last_step, last_id)
        return request_id

    # Slot i of the heap is items[2i] (its step) and items[2i + 1] (its request id).
    def _sift_up(self, i: i64, step: i64, request_id: i64) -> None:
        """Place the pair at slot ``i`` or above it."""
        items = self._items
        while i > 0:
            parent = (i - 1) >> 1
            if _before(items[2 * parent], items[2 * parent + 1], step, request_id):
                break
            items[2 * i] = items[2 * parent]
            items[2 * i + 1] = items[2 * parent + 1]
            i = parent
        items[2 * i] = step
        items[2 * i + 1] = request_id

    def _sift_down(self, i: i64, step: i64, request_id: i64) -> None:
        """Place the pair at slot ``i`` or below it."""
        items = self._items
        n: i64 = len(items) >> 1
        while True:
            c = 2 * i + 1
            if c >= n:
                break
            if c + 1 < n and _before(items[2 * c + 2], items[2 * c + 3], items[2 * c], items[2 * c + 1]):
                c += 1
            if _before(step, request_id, items[2 * c], items[2 * c + 1]):
                break
            items[2 * i] = items[2 * c]
            items[2 * i + 1] = items[2 * c + 1]
            i = c
        items[2 * i] = step
        items[2 * i + 1] = request_id


def _before(step: i64, request_id: i64, other_step: i64, other_id: i64) -> bool:
    """``(step, request_id) <= (other_step, other_id)``: where a heap of pairs may stop moving."""
    return step < other_step or (step == other_step and request_id <= other_id)


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
        if not 0 <= request.request_id <= MAX_REQUEST_ID:
            raise ValueError(f"request id {request.request_id} is outside 0..{MAX_REQUEST_ID}")
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
