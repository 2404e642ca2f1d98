"""The seam between the HTTP front door and whatever makes the tokens: :class:`ServeCore`.

The HTTP layer (``serve/app.py``) knows nothing about schedulers, groups or Ray; it turns an
OpenAI request into a :class:`ServeRequest`, awaits :meth:`ServeCore.submit`, and streams the
:class:`TokenEvent` s it gets back until a :class:`FinalEvent`. An engine plugs in by
implementing these methods (``serve/engine.py``: the live cluster); ``serve/fakecore.py`` is a
test double of it.

Contract:

- ``submit`` returns once the request is **admitted** (or raises :class:`Rejected` with the
  reason and what a client should do about it, a :class:`Refusal`: the HTTP layer answers 429
  with ``Retry-After``, 400 if the core can never serve the request, 503 if it can serve
  nothing now); it must not wait for the first token.
- The returned :class:`TokenStream` yields zero or more :class:`TokenEvent` (one per device
  report: a decode step, or several tokens reported at once) and then exactly one
  :class:`FinalEvent`, after which iteration stops. A request the core turns away after
  admitting it ends with an ``error`` :class:`FinalEvent` carrying the :class:`Rejected`
  (``rejected``), answered as a refusal before admission would be.
- **Cancellation**: if the consumer stops early (a client disconnected, a stop condition), the
  HTTP layer calls ``await stream.aclose()`` before the :class:`FinalEvent`; the core must then
  free the request's KV and batch slots everywhere. Beware: ``aclose()`` of an ``async def``
  generator that was never iterated does not run its ``finally``; wrap one in
  :class:`EventStream`, which calls its ``cancel`` whenever the stream is closed unfinished.
- ``status`` is polled (for ``/health``, ``/ready`` and every ``/metrics`` scrape); it must be
  cheap and must not block the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import AsyncGenerator, Awaitable, Callable, Optional, Protocol, Union, runtime_checkable

from hetero_sched.tracing import ProcessTracing


@dataclass(frozen=True)
class ModelCard:
    """A model the core serves: its OpenAI ``id`` and its context window in tokens."""

    model_id: str
    max_model_len: int
    """Prompt plus output tokens one request may hold; longer requests are answered with 400."""


@dataclass(frozen=True)
class ServeRequest:
    """One admitted-or-not request, as the core sees it (already tokenized and validated)."""

    request_id: str
    """Unique per server process (the HTTP layer generates it; a client's ``X-Request-Id`` is only echoed)."""
    model_id: str
    prompt_token_ids: tuple[int, ...]
    max_tokens: int
    """Output tokens to generate, >= 1; with no EOS in the vocabulary this is the output length."""
    min_tokens: int = 0
    ignore_eos: bool = True
    arrival_s: float = 0.0
    """``time.time()`` when the HTTP layer received the request (wall clock, seconds)."""
    trace_context: dict[str, str] = field(default_factory=dict)
    """W3C ``traceparent`` / ``tracestate`` of the HTTP request, for the core's spans."""

    @property
    def num_prompt_tokens(self) -> int:
        """Prompt length in tokens."""
        return len(self.prompt_token_ids)


@dataclass(frozen=True)
class TokenEvent:
    """Tokens a device reported for one request, in order, with the device's time for each."""

    token_ids: tuple[int, ...]
    times_s: tuple[float, ...]
    """Device-reported time each token was produced (the core's clock, seconds); same length as ``token_ids``."""

    def __post_init__(self) -> None:
        if not self.token_ids or len(self.token_ids) != len(self.times_s):
            raise ValueError("a TokenEvent carries >= 1 token and one time per token")


class FinishReason(str, Enum):
    """Why a request ended (OpenAI's ``finish_reason`` values, plus ``error``)."""

    LENGTH = "length"
    """Reached ``max_tokens`` (the only normal ending: the byte vocabulary has no EOS)."""
    STOP = "stop"
    ERROR = "error"
    """The core gave up on the request after admitting it (``FinalEvent.message`` says why)."""


@dataclass(frozen=True)
class FinalEvent:
    """The last event of a stream: how it ended and its usage."""

    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    time_s: float
    """Device-reported time the request finished (core clock, seconds)."""
    cached_tokens: int = 0
    """Prompt tokens served from a prefix cache."""
    message: Optional[str] = None
    """Why, when ``finish_reason`` is ``error``."""
    rejected: Optional["Rejected"] = None
    """With ``error``: the core's refusal, when it turned the request away after admitting it (a
    load, a passing state, what it can never serve, the engine stopping); None: a failure of
    its own (HTTP 500)."""


StreamEvent = Union[TokenEvent, FinalEvent]


@runtime_checkable
class TokenStream(Protocol):
    """What :meth:`ServeCore.submit` returns: an async iterator of events that can be closed early."""

    def __aiter__(self) -> "TokenStream": ...

    async def __anext__(self) -> StreamEvent: ...

    async def aclose(self) -> None:
        """Stop early: the core cancels the request and frees its KV and slots."""


class EventStream:
    """A :class:`TokenStream` over an async generator: closing it unfinished calls ``cancel`` once."""

    def __init__(self, events: AsyncGenerator[StreamEvent, None], cancel: Callable[[], Awaitable[None]]) -> None:
        self._events = events
        self._cancel = cancel
        self._open = True

    def __aiter__(self) -> "EventStream":
        return self

    async def __anext__(self) -> StreamEvent:
        if not self._open:
            raise StopAsyncIteration
        event = await self._events.__anext__()
        if isinstance(event, FinalEvent):
            self._open = False
        return event

    async def aclose(self) -> None:
        """Cancel the request unless its :class:`FinalEvent` was delivered; then close the generator."""
        was_open, self._open = self._open, False
        try:
            if was_open:
                await self._cancel()
        finally:
            await self._events.aclose()


class Refusal(Enum):
    """What a client should do about a refused request (the HTTP layer's status follows from it)."""

    RETRY = "retry"
    """Load or a passing state: a retry may be served -- HTTP 429 with ``Retry-After``."""
    NEVER = "never"
    """This deployment can never serve it -- HTTP 400, so that a client does not retry forever."""
    UNAVAILABLE = "unavailable"
    """The server can serve nothing now (its engine stopped) -- HTTP 503: the server's state,
    not the client's rate, and ``/health`` says so too."""


class Rejected(Exception):
    """The core refused the request, saying why (``reason``; ``code``: its short reason code)
    and what its client should do (``refusal``)."""

    def __init__(self, reason: str, retry_after_s: float = 1.0, *, code: Optional[str] = None,
                 refusal: Refusal = Refusal.RETRY) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s
        self.code = code
        self.refusal = refusal


@dataclass(frozen=True)
class GroupStatus:
    """One device group as ``/metrics`` shows it (``hetero:*`` gauges, label ``group``)."""

    name: str
    device: str
    role: str
    num_running: int
    """Requests decoding (or prefilling, for a prefill group) on the group."""
    num_waiting: int
    """Requests queued at the group."""
    kv_blocks_used: int
    kv_blocks_total: int
    busy_frac: float = 0.0
    """Share of recent wall time the group was executing a span, 0-1."""


@dataclass(frozen=True)
class CoreStatus:
    """What the core reports for ``/health``, ``/ready`` and the ``vllm:*`` gauges."""

    healthy: bool
    """False once the core cannot serve any more (``/health`` answers 503)."""
    ready: bool
    """True once every group is placed and the core accepts requests (``/ready``)."""
    num_running: int
    """Admitted requests that started (prefill or decode): ``vllm:num_requests_running``."""
    num_waiting: int
    """Admitted requests waiting for a first placement: ``vllm:num_requests_waiting``."""
    kv_cache_usage: float
    """Used / total KV blocks over the cluster, 0-1: ``vllm:kv_cache_usage_perc``."""
    groups: tuple[GroupStatus, ...] = ()
    dispatch_delay_s: float = 0.0
    """Mean so far: from the scheduler planning a span to its device starting it (the control
    plane's latency; a simulator models it with the experiment field ``control_plane``)."""
    report_delay_s: float = 0.0
    """Mean so far: from a span's end on its device to the scheduler applying its report."""


class ServeCore(Protocol):
    """The engine behind the HTTP layer (see the module docstring for the contract)."""

    def models(self) -> tuple[ModelCard, ...]:
        """The models served; the first is the default."""
        ...

    async def submit(self, request: ServeRequest) -> TokenStream:
        """Admit ``request`` and return its event stream, or raise :class:`Rejected`."""
        ...

    async def status(self) -> CoreStatus:
        """A cheap snapshot for health, readiness and metrics."""
        ...

    async def start(self, tracing: Optional[ProcessTracing]) -> None:
        """Bring up what the core runs on (called once, on the server's loop, before serving);
        ``tracing``: the server process's tracer, when traces are exported."""
        ...

    def deliver(self, message: bytes) -> None:
        """A message the core's devices sent to the server (the tokens they made), on its loop."""
        ...

    async def close(self) -> None:
        """Cancel what is in flight and release the core's resources (server shutdown)."""
        ...
