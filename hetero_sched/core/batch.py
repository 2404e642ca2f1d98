"""A group's continuous decode batch, with progress counted lazily.

The batch keeps one step counter, ``steps_done``. A request that joined at step ``j`` with
``g`` tokens generated has ``g + steps_done - j`` now, so a span touches only the requests
that join or leave, never the whole batch: completions wait in a heap keyed by the step they
finish at, and the largest inter-token gap a request saw while in the batch is read from a
monotone stack of per-span gaps.
"""

from __future__ import annotations

from typing import Optional

from librt.vecs import append, pop, vec
from mypy_extensions import i64

from hetero_sched.core.request import Phase, RequestState, StepHeap


class DecodeBatch:
    """Requests decoding on one group: ready to join, and running (in join order)."""

    def __init__(self) -> None:
        self.ready: list[RequestState] = []                 # KV here (or prefilled here), joins next span
        self.running: dict[int, RequestState] = {}          # insertion order = join order
        self.size = 0
        """``len(running) + len(ready)``, kept (read at every report: the dict's and the list's
        headers are two more cache lines, cold with a thousand groups)."""
        self.steps_done = 0
        self.context_tokens = 0
        """KV tokens of the running requests, as of ``steps_done``."""
        self._finish = StepHeap()
        """The running requests' finish steps (maybe stale)."""
        self._spans_done = 0
        self._gap_idx = vec[i64]()       # monotone stack of (span index, gap): max gap since a span
        self._gap_val = vec[float]()
        self._last_decode_end: Optional[float] = None

    def __len__(self) -> int:
        return self.size

    def add_ready(self, rs: RequestState) -> None:
        """``rs`` (its KV here) joins at the next span."""
        self.ready.append(rs)
        self.size += 1

    def remove_ready(self, rs: RequestState) -> bool:
        """Take ``rs`` out of the requests waiting to join; False if it is not among them."""
        try:
            self.ready.remove(rs)
        except ValueError:
            return False
        self.size -= 1
        return True

    @property
    def has_work(self) -> bool:
        return self.size > 0

    def made(self, rs: RequestState) -> int:
        """Tokens ``rs`` made since it joined (progress is lazy)."""
        return self.steps_done - rs.join_step

    def join_ready(self, group_id: int) -> list[RequestState]:
        """Move the requests ready to join into the batch; returns them."""
        joiners = self.ready
        self.ready = []
        for rs in joiners:
            rs.join_step = self.steps_done
            rs.join_span = self._spans_done
            self.context_tokens += rs.context_tokens
            rs.finish_step = self.steps_done + rs.output_tokens - rs.generated
            self._finish.push(rs.finish_step, rs.request_id)
            rs.phase = Phase.DECODING
            rs.decode_group = group_id
            self.running[rs.request_id] = rs
        return joiners

    def steps_to_next_finish(self) -> int:
        """Steps until the earliest completion in the batch (its heap's head, maybe stale: sooner)."""
        return self._finish.head_step() - self.steps_done

    def first_step(self, joiners: list[RequestState], token_s: float) -> float:
        """A span's first decode tokens came out at ``token_s``: note the joiners' token 2 and
        gaps; returns the gap since the previous decode span ended (0.0 if none)."""
        for rs in joiners:
            if rs.generated == 1:
                rs.token2_s = token_s
            gap = token_s - rs.last_token_s
            if gap > rs.max_gap_s:
                rs.max_gap_s = gap
        return token_s - self._last_decode_end if self._last_decode_end is not None else 0.0

    def advance(self, steps: int, joiners: list[RequestState], step_gap_s: float, boundary_gap_s: float,
                now_s: float) -> None:
        """``steps`` decode steps are done, the longest ``step_gap_s`` long, ending at ``now_s``."""
        self.steps_done += steps
        self.context_tokens += len(self.running) * steps
        self._push_gap(self._spans_done, max(step_gap_s, boundary_gap_s))
        self._spans_done += 1
        for rs in joiners:
            if step_gap_s > rs.max_gap_s:
                rs.max_gap_s = step_gap_s
        self._last_decode_end = now_s

    def finished(self, group_id: int) -> list[RequestState]:
        """Pop the running requests that made all their tokens (still here, not already gone)."""
        done: list[RequestState] = []
        finish = self._finish
        while (request_id := finish.pop_due(self.steps_done)) >= 0:
            rs = self.running.get(request_id)
            if rs is not None and rs.phase is Phase.DECODING and rs.decode_group == group_id \
                    and rs.finish_step == finish.popped_step and not (done and done[-1] is rs):
                done.append(rs)             # (in the heap twice when it joined again: popped in a row)
        return done

    def last_joined(self) -> RequestState:
        """The preemption victim: the request that joined last (LIFO, as vLLM)."""
        return self.running[next(reversed(self.running))]

    def leave(self, rs: RequestState, now_s: float) -> None:
        """Take ``rs`` out of the batch at this step boundary, settling its lazy token count."""
        del self.running[rs.request_id]
        self.size -= 1
        made = self.steps_done - rs.join_step
        self.context_tokens -= rs.context_tokens + made
        rs.generated += made
        if made:
            rs.last_token_s = now_s
        gap = self._max_gap_since(rs.join_span + 1)
        if gap > rs.max_gap_s:
            rs.max_gap_s = gap

    def drop_all(self) -> list[RequestState]:
        """The device died: every request here, its tokens settled to the last finished span."""
        lost = []
        for rs in list(self.running.values()):
            del self.running[rs.request_id]
            rs.generated += self.steps_done - rs.join_step
            lost.append(rs)
        lost.extend(self.ready)
        self.ready = []
        self.size = 0
        self.context_tokens = 0
        self._finish.clear()
        self._gap_idx = vec[i64]()
        self._gap_val = vec[float]()
        self._last_decode_end = None
        return lost

    # The stack is two unboxed arrays (not lists of boxed numbers: a cache line per number read,
    # cold with a thousand groups taking turns).
    def _push_gap(self, span_index: i64, gap: float) -> None:
        vals = self._gap_val
        idx = self._gap_idx
        while len(vals) and vals[len(vals) - 1] <= gap:
            vals, _ = pop(vals)
            idx, _ = pop(idx)
        self._gap_idx = append(idx, span_index)
        self._gap_val = append(vals, gap)

    def _max_gap_since(self, span_index: i64) -> float:
        """The largest gap pushed at ``span_index`` or later (0.0 if none)."""
        idx = self._gap_idx
        lo: i64 = 0
        hi: i64 = len(idx)
        while lo < hi:                  # the first entry at or after span_index (bisect_left)
            mid = (lo + hi) >> 1
            if idx[mid] < span_index:
                lo = mid + 1
            else:
                hi = mid
        return self._gap_val[lo] if lo < len(self._gap_val) else 0.0
