"""A test double of :class:`~hetero_sched.serve.servecore.ServeCore`, for the HTTP layer only.

``FakeCore`` schedules nothing and models no device: each admitted request gets its first token
``ttft_s`` after admission and one more every ``itl_s`` (an absolute schedule, so a late event
does not delay the next), placeholder text, and a :class:`FinalEvent` at ``max_tokens``. It
rejects beyond ``max_inflight`` and records every request it saw and every one cancelled, so
tests can check what the HTTP layer did to the core. It is what the HTTP tests and the
load-generator plumbing of ``bench/serve_vs_sim.py`` run against until the engine is plugged in;
it must never be what ``hetero-sched serve`` serves.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import AsyncGenerator, Optional

from hetero_sched.serve.servecore import (CoreStatus, EventStream, FinalEvent, FinishReason, GroupStatus, ModelCard,
                                          Refusal, Rejected, ServeRequest, StreamEvent, TokenEvent)
from hetero_sched.serve.tokenizer import placeholder_token_ids
from hetero_sched.tracing import ProcessTracing


@dataclass(frozen=True)
class FakeCoreConfig:
    """Timing and limits of a :class:`FakeCore`."""

    model_id: str = "tiny"
    max_model_len: int = 4096
    ttft_s: float = 0.005
    itl_s: float = 0.002
    max_inflight: Optional[int] = None
    """Admitted requests at once; beyond it ``submit`` raises :class:`Rejected`."""
    retry_after_s: float = 1.0
    fail_at_token: Optional[int] = None
    """End every request with ``finish_reason: error`` after this many tokens (tests the error path)."""
    fail_refusal: Optional[Refusal] = None
    """With ``fail_at_token``: that ending is the core's refusal of this kind after admission
    (None: a failure of the core's own)."""
    refuse: Optional[Refusal] = None
    """Refuse every request so at submission (tests the HTTP status of each kind)."""


class FakeCore:
    """In-process asyncio fake of the engine (HTTP-layer tests only; see the module docstring)."""

    def __init__(self, config: FakeCoreConfig = FakeCoreConfig()) -> None:
        self.config = config
        self.submitted: list[ServeRequest] = []
        self.cancelled: list[str] = []
        self.finished: list[str] = []
        self._active: set[str] = set()

    def models(self) -> tuple[ModelCard, ...]:
        """One model, ``config.model_id``."""
        return (ModelCard(self.config.model_id, self.config.max_model_len),)

    async def submit(self, request: ServeRequest) -> EventStream:
        """Admit ``request`` unless ``max_inflight`` are active; its stream starts at once."""
        limit = self.config.max_inflight
        if self.config.refuse is not None:
            raise Rejected("fake refusal", self.config.retry_after_s, code="fake_refusal", refusal=self.config.refuse)
        if limit is not None and len(self._active) >= limit:
            raise Rejected(f"admission: {len(self._active)} requests in flight, max_inflight {limit}",
                           self.config.retry_after_s)
        self.submitted.append(request)
        self._active.add(request.request_id)

        async def cancel() -> None:
            self._active.discard(request.request_id)
            self.cancelled.append(request.request_id)

        return EventStream(self._events(request, time.perf_counter()), cancel)

    async def _events(self, request: ServeRequest, start: float) -> AsyncGenerator[StreamEvent, None]:
        c = self.config
        for k in range(request.max_tokens):
            due = start + c.ttft_s + k * c.itl_s
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if c.fail_at_token is not None and k == c.fail_at_token:
                self._finish(request)
                rejected = (None if c.fail_refusal is None else
                            Rejected("fake refusal after admission", c.retry_after_s, code="fake_refusal",
                                     refusal=c.fail_refusal))
                yield FinalEvent(FinishReason.ERROR, request.num_prompt_tokens, k, due, message="fake device failure",
                                 rejected=rejected)
                return
            yield TokenEvent(placeholder_token_ids(k, 1), (due,))
        self._finish(request)
        yield FinalEvent(FinishReason.LENGTH, request.num_prompt_tokens, request.max_tokens,
                         start + c.ttft_s + (request.max_tokens - 1) * c.itl_s)

    def _finish(self, request: ServeRequest) -> None:
        self._active.discard(request.request_id)
        self.finished.append(request.request_id)

    async def status(self) -> CoreStatus:
        """Active requests as running; one pseudo-group named ``fake``."""
        n = len(self._active)
        return CoreStatus(healthy=True, ready=True, num_running=n, num_waiting=0,
                          kv_cache_usage=min(1.0, n / 64),
                          groups=(GroupStatus("fake", "none", "both", n, 0, n, 64),))

    async def start(self, tracing: Optional[ProcessTracing]) -> None:
        return None

    def deliver(self, message: bytes) -> None:
        return None

    async def close(self) -> None:
        """Nothing to release."""
