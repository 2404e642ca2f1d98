"""The HTTP layer: an aiohttp application speaking OpenAI's API in front of a :class:`ServeCore`.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (SSE when ``stream``),
``GET /v1/models``, ``/health``, ``/ready``, ``/metrics``. Every error, ours or aiohttp's (404,
405, 413), is an OpenAI-style JSON body; an unexpected exception is a 500 and is logged -- the
server keeps serving. A request the core refuses -- before admitting it, or after (while a
non-streamed reply's status is not out yet; a stream's error event says the same) -- is 429 with
``Retry-After`` if it may be served later, 400 if it never can be, 503 if the server can serve
nothing now (:func:`_refusal`). The runner cancels a handler whose client went away
(``handler_cancellation``), so a disconnect -- mid-stream or while a non-streamed reply is being
gathered -- closes the request's stream, which cancels it in the core
(:class:`~hetero_sched.serve.servecore.EventStream`).
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional

from aiohttp import web
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from hetero_sched.serve.metrics import CONTENT_TYPE, ServeMetrics
from hetero_sched.serve.openai_api import (ApiError, ApiRequest, Endpoint, bad, full_response, now_created,
                                           parse_request, retry_after_header, stream_chunk, usage_chunk)
from hetero_sched.serve.servecore import (FinalEvent, FinishReason, Refusal, Rejected, ServeCore, ServeRequest,
                                          TokenStream)
from hetero_sched.serve.tokenizer import ByteTokenizer, Detokenizer

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 << 20
"""Largest request body (a 131k-token prompt is ~131 KB of bytes, plus JSON escaping)."""
_CLIENT_ID = re.compile(r"^[\x21-\x7e]{1,128}$")
"""A client's ``X-Request-Id`` is echoed only if it is short printable ASCII."""
_PROPAGATOR = TraceContextTextMapPropagator()


def _json(body: Any, status: int = 200, headers: Optional[dict[str, str]] = None) -> web.Response:
    return web.Response(text=json.dumps(body, separators=(",", ":")), status=status,
                        content_type="application/json", headers=headers)


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


_DONE = b"data: [DONE]\n\n"


def _refusal(exc: Rejected) -> tuple[ApiError, dict[str, str]]:
    """The core's refusal as an OpenAI error and the headers that go with it: 429 with
    ``Retry-After`` when a retry may succeed; 400 with no ``Retry-After`` when the request can
    never be served here (a client would retry it forever); 503 with ``Retry-After`` when the
    server can serve nothing now (its engine stopped: a client's rate is not the cause)."""
    if exc.refusal is Refusal.NEVER:
        return bad(f"rejected: {exc.reason}", code=exc.code or "invalid_value"), {}
    retry = {"Retry-After": retry_after_header(exc.retry_after_s)}
    if exc.refusal is Refusal.UNAVAILABLE:
        return ApiError(503, f"unavailable: {exc.reason}", type="server_error", code=exc.code or "unavailable"), retry
    return ApiError(429, f"rejected: {exc.reason}", type="rate_limit_error", code="rate_limit_exceeded"), retry


def _failure(event: FinalEvent) -> tuple[ApiError, dict[str, str]]:
    """An ``error`` ending as an OpenAI error: the core's refusal after admission, answered as one
    before it would be (:func:`_refusal`), or a failure of the core's own (500)."""
    if event.rejected is not None:
        return _refusal(event.rejected)
    return ApiError(500, f"the request failed: {event.message}", type="server_error", code="engine_error"), {}


@dataclass
class _Timing:
    """Server-side latencies of one request, on the monotonic clock."""

    received: float
    first: Optional[float] = None
    last: Optional[float] = None
    gaps: list[float] = field(default_factory=list)

    def token(self) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        else:
            assert self.last is not None
            self.gaps.append(now - self.last)
        self.last = now


@web.middleware
async def _errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return _json(exc.body(), exc.status)
    except web.HTTPException as exc:                    # 404, 405, 413 ... from aiohttp
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status)
        return _json(ApiError(exc.status, f"{exc.reason}: {request.method} {request.path}", code=code).body(),
                     exc.status, headers={k: v for k, v in exc.headers.items() if k == "Allow"})
    except (ConnectionResetError, ConnectionError):     # the client left while we wrote: nothing to answer
        raise
    except Exception:                                    # a bug: log it, answer 500, keep serving
        log.exception("unhandled error serving %s %s", request.method, request.path)
        return _json(ApiError(500, "internal server error", type="server_error", code="internal_error").body(), 500)


class ServeApp:
    """Routes and handlers over one core; ``application()`` is the aiohttp app."""

    def __init__(self, core: ServeCore, tokenizer: ByteTokenizer, tracer: Optional[Tracer] = None) -> None:
        """``tracer``: each request's HTTP span (the root of its trace, under a client's
        ``traceparent`` if it sent one); None: no tracing."""
        self.core = core
        self.tokenizer = tokenizer
        self.tracer = tracer
        self.models = {m.model_id: m for m in core.models()}
        if not self.models:
            raise ValueError("the core serves no model")
        self.metrics = ServeMetrics(next(iter(self.models)))

    def application(self) -> web.Application:
        """The aiohttp application (closing it closes the core)."""
        app = web.Application(middlewares=[_errors], client_max_size=MAX_BODY_BYTES)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/ready", self.ready)
        app.router.add_get("/metrics", self.prometheus)

        async def close_core(_: web.Application) -> None:
            await self.core.close()

        app.on_cleanup.append(close_core)
        return app

    async def completions(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/completions``."""
        return await self._generate(request, Endpoint.COMPLETIONS)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/chat/completions``."""
        return await self._generate(request, Endpoint.CHAT)

    async def list_models(self, request: web.Request) -> web.Response:
        """``GET /v1/models``."""
        return _json({"object": "list", "data": [
            {"id": m.model_id, "object": "model", "created": 0, "owned_by": "hetero-sched", "root": m.model_id,
             "max_model_len": m.max_model_len} for m in self.models.values()]})

    async def health(self, request: web.Request) -> web.Response:
        """``GET /health``: 200 while the core can serve, else 503."""
        status = await self.core.status()
        return _json({"status": "ok" if status.healthy else "unhealthy"}, 200 if status.healthy else 503)

    async def ready(self, request: web.Request) -> web.Response:
        """``GET /ready``: 200 once the core accepts requests, else 503."""
        status = await self.core.status()
        ok = status.healthy and status.ready
        return _json({"status": "ready" if ok else "not ready"}, 200 if ok else 503)

    async def prometheus(self, request: web.Request) -> web.Response:
        """``GET /metrics``: Prometheus text."""
        body = self.metrics.render(await self.core.status())
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def _generate(self, request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
        if self.tracer is None:
            return await self._respond(request, endpoint, {})
        # the request's trace starts here: under the client's span if it sent a traceparent
        span = self.tracer.start_span(f"POST {request.path}", context=_PROPAGATOR.extract(dict(request.headers)),
                                      kind=SpanKind.SERVER, attributes={
                                          "http.request.method": request.method, "url.path": request.path,
                                          "server.address": request.host,
                                          "gen_ai.operation.name": "chat" if endpoint is Endpoint.CHAT else "text_completion"})
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
        status = 500
        try:
            response = await self._respond(request, endpoint, carrier)
            status = response.status
            return response
        except ApiError as exc:
            status = exc.status
            raise
        finally:
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_status(Status(StatusCode.ERROR))
            span.end()

    async def _respond(self, request: web.Request, endpoint: Endpoint,
                       trace_context: dict[str, str]) -> web.StreamResponse:
        received = time.perf_counter()
        api = parse_request(endpoint, await request.read(), self.models, self.tokenizer)
        request_id = uuid.uuid4().hex
        client_id = request.headers.get("X-Request-Id", "")
        headers = {"X-Request-Id": client_id if _CLIENT_ID.match(client_id) else request_id}
        core_request = ServeRequest(
            request_id, api.model_id, api.prompt_token_ids, api.max_tokens, api.min_tokens, api.ignore_eos,
            arrival_s=time.time(), trace_context=trace_context)
        try:
            stream = await self.core.submit(core_request)
        except Rejected as exc:
            self.metrics.rejected.labels(self.metrics.model_name).inc()
            error, extra = _refusal(exc)
            return _json(error.body(), error.status, {**headers, **extra})
        timing = _Timing(received)
        finished = False
        try:
            if api.stream:
                response, finished = await self._stream(request, api, request_id, headers, stream, timing)
            else:
                response, finished = await self._collect(api, request_id, headers, stream, timing)
            return response
        finally:
            if not finished:
                self.metrics.cancelled.labels(self.metrics.model_name).inc()
            await stream.aclose()

    def _record(self, api: ApiRequest, timing: _Timing, final: FinalEvent) -> None:
        m = self.metrics
        for gap in timing.gaps:
            m.itl.labels(m.model_name).observe(gap)
        ttft = None if timing.first is None else timing.first - timing.received
        if ttft is not None:
            m.ttft.labels(m.model_name).observe(ttft)
        m.observe_finished(ttft_s=ttft, e2e_s=time.perf_counter() - timing.received, prompt_tokens=final.prompt_tokens,
                           generation_tokens=final.completion_tokens, finished_reason=final.finish_reason.value)

    async def _collect(self, api: ApiRequest, request_id: str, headers: dict[str, str], stream: TokenStream,
                       timing: _Timing) -> tuple[web.Response, bool]:
        detok = Detokenizer()
        parts: list[str] = []
        async for event in stream:
            if isinstance(event, FinalEvent):
                self._record(api, timing, event)
                if event.finish_reason is FinishReason.ERROR:
                    error, extra = _failure(event)
                    return _json(error.body(), error.status, {**headers, **extra}), True
                parts.append(detok.flush())
                return _json(full_response(api, request_id, now_created(), "".join(parts), event), headers=headers), True
            timing.token()
            parts.append(detok.push(event.token_ids))
        raise RuntimeError("the core's stream ended without a FinalEvent")

    async def _stream(self, request: web.Request, api: ApiRequest, request_id: str, headers: dict[str, str],
                      stream: TokenStream, timing: _Timing) -> tuple[web.StreamResponse, bool]:
        response = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        created = now_created()
        detok = Detokenizer()
        first = True
        async for event in stream:
            if isinstance(event, FinalEvent):
                self._record(api, timing, event)
                if event.finish_reason is FinishReason.ERROR:    # the status (200) is out: the body says
                    await response.write(_sse(_failure(event)[0].body()))
                else:
                    await response.write(_sse(stream_chunk(api, request_id, created, detok.flush(), event.finish_reason,
                                                           first=first)))
                    if api.include_usage:
                        await response.write(_sse(usage_chunk(api, request_id, created, event)))
                await response.write(_DONE)
                await response.write_eof()
                return response, True
            timing.token()
            await response.write(_sse(stream_chunk(api, request_id, created, detok.push(event.token_ids), first=first)))
            first = False
        raise RuntimeError("the core's stream ended without a FinalEvent")
