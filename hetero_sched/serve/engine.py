"""The real core behind the front door: the experiment's cluster, live on Ray, fed by HTTP requests.

:class:`EngineCore` implements :class:`~hetero_sched.serve.servecore.ServeCore` with the same
engine ``hetero-sched run`` uses (``engine/loop.py`` + ``runtime/devices.py``), on the wall
clock, in a thread of the server's process:

- a request becomes a :class:`~hetero_sched.core.request.Request` (its prompt's token ids and
  their prefix hashes, its ``max_tokens`` as its output length) left in the engine's :class:`~hetero_sched.runtime.inbox.Inbox`;
  ``submit`` returns once the core placed it (admitted) or rejected it (HTTP 429, or 400 for
  what no group can ever serve: ``NEVER_SERVABLE``; 503 once the engine stopped); a request the
  core rejects after admitting it ends with that rejection, answered alike;
- device actors stream each token as they make it (``deliver``: progress messages), so a client
  sees tokens at the times the devices produced them; the numpy backend's tokens are the tiny
  Llama's, the modeled backend's are placeholder text (its devices compute nothing);
- the core ends each request (completed, or cancelled when its client left: its KV and slots
  are freed everywhere); the stream's last event says so, after every token.

Times the devices report are run time (seconds since the server started); a token's event
carries it as Unix time.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, AsyncGenerator, Optional

import numpy as np
import ray

from hetero_sched.catalog import resolve_catalog
from hetero_sched.core.request import Phase, Request, RequestState
from hetero_sched.core.scheduler import Scheduler
from hetero_sched.core.spans import Span, SpanReport
from hetero_sched.engine.assembly import ExperimentLike, build_scheduler, resolve
from hetero_sched.engine.loop import run_events
from hetero_sched.experiment import Experiment
from hetero_sched.policies.base import NEVER_SERVABLE
from hetero_sched.predictor import predict_outputs
from hetero_sched.runtime.clock import WallClock
from hetero_sched.runtime.devices import RayDevices
from hetero_sched.runtime.inbox import Cancel, Inbox
from hetero_sched.runtime.live import Backend, Pace, PerGroup, start_group_actors, with_absolute_paths
from hetero_sched.runtime.store import start_store_actors
from hetero_sched.runtime.messages import unpack
from hetero_sched.serve.servecore import (CoreStatus, EventStream, FinalEvent, FinishReason, GroupStatus, ModelCard,
                                          Refusal, Rejected, ServeRequest, StreamEvent, TokenEvent)
from hetero_sched.serve.prefixes import DEFAULT_BLOCK_TOKENS, prompt_prefix_hashes
from hetero_sched.serve.tokenizer import placeholder_token_ids
from hetero_sched.tracing import ProcessTracing, RequestTracer, attach_tracer
from hetero_sched.workload import Workload

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineOptions:
    """How the cluster behind the server runs (``hetero-sched serve`` flags)."""

    backend: Backend = "modeled"
    pace: Pace = "modeled"
    device_speed: PerGroup = 1.0
    device_jitter: PerGroup = 0.0
    bytes_scale: float = 1e-3
    call_timeout_s: float = 120.0
    progress_interval_s: float = 0.002
    """Devices send the tokens they made at most this often (each token keeps its own time)."""
    retry_after_s: float = 1.0
    """What a 429 (or a 503) suggests a client waits."""
    prefix_block_tokens: int = DEFAULT_BLOCK_TOKENS
    """Tokens per hashed prompt block (prefix caching's granularity; 0: prompts carry no hashes)."""


ENGINE_STOPPED = "engine_stopped"
"""The code of a refusal because the engine failed and stopped (a serving state, not a core reject code)."""


@dataclass
class _Live:
    """One admitted request as the front door follows it."""

    queue: "asyncio.Queue[StreamEvent]"
    admitted: "asyncio.Future[None]"
    prompt_tokens: int
    output_tokens: int
    next_index: int = 0
    """Tokens put on the stream so far (in order)."""
    pending: dict[int, tuple[int, float]] = field(default_factory=dict)
    """Tokens reported out of order: index -> (token id, time)."""
    final: Optional[FinalEvent] = None


class EngineCore:
    """A live, disaggregated, heterogeneous cluster serving HTTP requests (see the module doc)."""

    def __init__(self, experiment: ExperimentLike = None, options: EngineOptions = EngineOptions()) -> None:
        exp, base = resolve(experiment)
        self.exp: Experiment = with_absolute_paths(exp, base)
        self.options = options
        model = resolve_catalog(self.exp.overrides, self.exp.catalog_data).model(self.exp.model)
        self._card = ModelCard(self.exp.model, int(model.max_context_tokens))
        self._live: dict[int, _Live] = {}
        self._ids = itertools.count()
        self._inbox = Inbox()
        self._thread: Optional[threading.Thread] = None
        self._failure: Optional[str] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self.devices: Optional[RayDevices] = None
        self.scheduler: Optional[Scheduler] = None
        self._actors: list[Any] = []
        self._stores: list[Any] = []
        """The cluster KV store's actors, when the experiment has one (``kv_cache.store``)."""
        self._predictions: list[int] = []
        self._tracer: Optional[RequestTracer] = None

    # --- lifecycle ----------------------------------------------------------------------------
    async def start(self, tracing: Optional[ProcessTracing] = None) -> None:
        """Place the device actors (streaming to this actor), then run the engine in a thread."""
        self._loop = asyncio.get_running_loop()
        o = self.options
        me = ray.get_runtime_context().current_actor
        self._actors = start_group_actors(self.exp, o.backend, o.bytes_scale, clock="wall", pace=o.pace,
                                          device_speed=o.device_speed, device_jitter=o.device_jitter,
                                          trace=tracing.settings if tracing is not None else None,
                                          fetch_timeout_s=o.call_timeout_s / 2, sink=me,
                                          progress_interval_s=o.progress_interval_s)
        await asyncio.gather(*(a.node_labels.remote() for a in self._actors))
        self._stores = start_store_actors(self.exp)
        empty = Workload("serve", np.zeros(0), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64),
                         source={"kind": "serve"})
        scheduler = build_scheduler(self.exp, empty, base_dir=None)
        scheduler.predicted_output = self._predictions       # grows as requests arrive
        wall = WallClock(1.0)
        origin = wall.origin_unix_s(0.0)
        await asyncio.gather(*(a.begin.remote(origin) for a in self._actors))
        devices = await asyncio.to_thread(
            RayDevices, self._actors, wall=wall, real_tokens=o.backend == "numpy",
            verify_imports=o.backend == "numpy", call_timeout_s=o.call_timeout_s, inbox=self._inbox, progress=True,
            store_actors=self._stores)
        devices.scheduler = scheduler
        scheduler.hooks = _FrontDoorHooks(devices, self)
        if tracing is not None:           # a request's trace goes under its HTTP request's span
            self._tracer = attach_tracer(scheduler, tracing, model=self.exp.model, epoch_ns=int(origin * 1e9),
                                         remote=devices.ship_spans)
        self.scheduler, self.devices, self._wall = scheduler, devices, wall
        self._origin = origin
        self._thread = threading.Thread(target=self._run, name="hetero-sched-engine", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        assert self.scheduler is not None and self.devices is not None
        try:
            run_events(self.scheduler, iter(()), devices=self.devices, clock=self._wall)
            self.devices.finish()
        except Exception as exc:            # the engine cannot go on: every stream ends with the reason
            log.exception("the serving engine failed")
            self._failure = f"{type(exc).__name__}: {exc}"
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._fail_all)

    async def close(self) -> None:
        """Stop taking requests (those in flight are cancelled), end the engine, stop the devices."""
        for rid in list(self._live):
            self._inbox_put(Cancel(rid))
        self._inbox.close()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30.0)
        if self._tracer is not None:        # the device actors' spans, before they go
            await asyncio.gather(*(a.flush_traces.remote() for a in self._actors))
        for a in [*self._actors, *self._stores]:
            ray.kill(a)

    # --- ServeCore ----------------------------------------------------------------------------
    def models(self) -> tuple[ModelCard, ...]:
        return (self._card,)

    async def submit(self, request: ServeRequest) -> EventStream:
        if self._failure is not None:
            raise self._rejected(self._stopped(), ENGINE_STOPPED, Refusal.UNAVAILABLE)
        rid = next(self._ids)
        loop = asyncio.get_running_loop()
        live = _Live(asyncio.Queue(), loop.create_future(), len(request.prompt_token_ids), request.max_tokens)
        self._live[rid] = live
        self._predictions.append(self._predict(rid, request.max_tokens))
        arrival = max(0.0, request.arrival_s - self._origin)
        if self._tracer is not None and request.trace_context:
            self._tracer.parents[rid] = dict(request.trace_context)
        block = self.options.prefix_block_tokens
        hashes = prompt_prefix_hashes(request.prompt_token_ids, block) if block else ()
        self._inbox_put(Request(rid, arrival, len(request.prompt_token_ids), request.max_tokens,
                                prefix_hashes=hashes or None, prefix_block_tokens=block or 512,
                                max_tokens=request.max_tokens, token_ids=tuple(request.prompt_token_ids)))
        try:
            await live.admitted
        except Rejected:
            self._live.pop(rid, None)
            raise

        async def cancel() -> None:
            if rid in self._live:
                self._inbox_put(Cancel(rid))

        return EventStream(self._events(rid, live), cancel)

    def _inbox_put(self, item: Any) -> None:
        try:
            self._inbox.put(item)
        except RuntimeError:
            pass                                  # closing: the engine ends what it holds anyway

    def _predict(self, rid: int, max_tokens: int) -> int:
        """The experiment's predictor for one request whose output length is ``max_tokens``."""
        one = Workload("one", np.zeros(1), np.ones(1, dtype=np.int64), np.array([max_tokens], dtype=np.int64),
                       max_tokens=np.array([max_tokens], dtype=np.int64))
        return int(predict_outputs(self.exp.predictor_spec, one, self.exp.seed * 1_000_003 + rid)[0])

    async def _events(self, rid: int, live: _Live) -> AsyncGenerator[StreamEvent, None]:
        try:
            while True:
                event = await live.queue.get()
                yield event
                if isinstance(event, FinalEvent):
                    return
        finally:
            self._live.pop(rid, None)

    async def status(self) -> CoreStatus:
        scheduler = self.scheduler
        ready = scheduler is not None and self._failure is None
        if scheduler is None:
            return CoreStatus(healthy=self._failure is None, ready=False, num_running=0, num_waiting=0,
                              kv_cache_usage=0.0)
        groups = []
        running = waiting = used = total = 0
        for g in scheduler.groups:          # counters only: the engine thread may be changing them
            g_waiting = len(g.prefill_queue) + len(g.decode_queue)
            g_running = len(g.batch) + g.in_transit + (g.num_pending_prefill - len(g.prefill_queue))
            groups.append(GroupStatus(g.name, g.device, g.role.value, max(g_running, 0), g_waiting, g.kv.num_used,
                                      g.kv.num_blocks, min(1.0, g.busy_s / max(self._wall.now(), 1e-9))))
            running += max(g_running, 0)
            waiting += g_waiting
            used += g.kv.num_used
            total += g.kv.num_blocks
        stats = self.devices.stats if self.devices is not None else None
        return CoreStatus(healthy=self._failure is None, ready=ready, num_running=running, num_waiting=waiting,
                          kv_cache_usage=used / total if total else 0.0, groups=tuple(groups),
                          dispatch_delay_s=_mean(stats.dispatch_delay_s) if stats else 0.0,
                          report_delay_s=_mean(stats.report_delay_s) if stats else 0.0)

    # --- what devices stream (on the server's loop) ----------------------------------------------
    def deliver(self, message: bytes) -> None:
        """A device's tokens, as it made them: put on their requests' streams, in order."""
        msg = unpack(message, "progress")
        for rid, index, token, t_s in msg["tokens"]:
            live = self._live.get(int(rid))
            if live is None or index < live.next_index:
                continue                          # ended, or already streamed (a resumed request)
            tok = int(token) if token >= 0 else placeholder_token_ids(int(index), 1)[0]
            live.pending[int(index)] = (tok, self._origin + float(t_s))
            self._drain(live)

    def _drain(self, live: _Live) -> None:
        ids, times = [], []
        while live.next_index in live.pending:
            tok, t = live.pending.pop(live.next_index)
            ids.append(tok)
            times.append(t)
            live.next_index += 1
        if ids:
            live.queue.put_nowait(TokenEvent(tuple(ids), tuple(times)))
        if live.final is not None and live.next_index >= live.final.completion_tokens:
            live.queue.put_nowait(live.final)
            live.final = None

    # --- what the core decides (from the engine thread) --------------------------------------------
    def placed(self, rs: RequestState) -> None:
        self._call(self._admit, rs.request_id, None)

    def finished(self, rs: RequestState, tokens: Optional[list[int]]) -> None:
        self._call(self._end, rs.request_id, rs.phase, rs.reject_reason, rs.reject_code, rs.finish_s,
                   rs.generated, rs.cached_tokens, tokens)

    def _call(self, fn: Any, *args: Any) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(fn, *args)

    def _stopped(self) -> str:
        """Why every request is refused once the engine failed (new ones and those in flight alike)."""
        return f"the engine stopped: {self._failure}"

    def _rejected(self, reason: str, code: Optional[str], refusal: Optional[Refusal] = None) -> Rejected:
        """A refusal with ``code``: the client retries unless no group can ever serve it (or ``refusal`` says)."""
        if refusal is None:
            refusal = Refusal.NEVER if code in NEVER_SERVABLE else Refusal.RETRY
        return Rejected(reason, self.options.retry_after_s, code=code, refusal=refusal)

    def _admit(self, rid: int, rejection: Optional[str], code: Optional[str] = None,
               refusal: Optional[Refusal] = None) -> None:
        live = self._live.get(rid)
        if live is None or live.admitted.done():
            return
        if rejection is None:
            live.admitted.set_result(None)
        else:
            live.admitted.set_exception(self._rejected(rejection, code, refusal))

    def _end(self, rid: int, phase: Phase, reason: Optional[str], code: Optional[str], finish_s: Optional[float],
             generated: int, cached: int, tokens: Optional[list[int]], refusal: Optional[Refusal] = None) -> None:
        live = self._live.get(rid)
        if live is None:
            return
        if not live.admitted.done():            # rejected on arrival: the client gets a 429, 400 or 503
            self._admit(rid, reason or "rejected", code, refusal)
            return
        t = self._origin + (finish_s if finish_s is not None else self._wall.now())
        if phase is Phase.COMPLETED:
            final = FinalEvent(FinishReason.LENGTH, live.prompt_tokens, generated, t, cached)
            # tokens the devices made but whose progress has not come in yet: the record has them
            for i in range(live.next_index, generated):
                if i not in live.pending:
                    tok = tokens[i] if tokens is not None and i < len(tokens) else placeholder_token_ids(i, 1)[0]
                    live.pending[i] = (tok, t)
        else:
            rejected = self._rejected(reason or "rejected", code, refusal) if phase is Phase.REJECTED else None
            final = FinalEvent(FinishReason.ERROR, live.prompt_tokens, live.next_index, t, cached,
                               message=reason or phase.value, rejected=rejected)
            live.pending.clear()
            live.next_index = max(live.next_index, final.completion_tokens)
        live.final = final
        self._drain(live)

    def _fail_all(self) -> None:
        for rid, live in list(self._live.items()):
            self._end(rid, Phase.REJECTED, self._stopped(), ENGINE_STOPPED, None,
                      live.next_index, 0, None, Refusal.UNAVAILABLE)


def _mean(values: list[float]) -> float:
    """The mean of a list another thread appends to (what it held when read), 0.0 when empty."""
    n = len(values)
    return sum(values[:n]) / n if n else 0.0


class _FrontDoorHooks:
    """The core's hooks: the Ray devices hear every decision; the front door hears placements and
    ends (the core calls these in the engine thread)."""

    def __init__(self, devices: RayDevices, core: EngineCore) -> None:
        self.devices = devices
        self.core = core

    def request_placed(self, now_s: float, rs: RequestState, group_id: int) -> None:
        self.devices.request_placed(now_s, rs, group_id)
        self.core.placed(rs)

    def request_finished(self, now_s: float, rs: RequestState) -> None:
        self.devices.request_finished(now_s, rs)
        tokens = self.devices.tokens.pop(rs.request_id, None)
        self.core.finished(rs, tokens)

    def span_planned(self, now_s: float, group_id: int, span: Span) -> None:
        self.devices.span_planned(now_s, group_id, span)

    def span_cut(self, now_s: float, group_id: int, span: Span) -> None:
        self.devices.span_cut(now_s, group_id, span)

    def span_applied(self, now_s: float, group_id: int, span: Span, report: SpanReport) -> None:
        self.devices.span_applied(now_s, group_id, span, report)

    def transfer_started(self, now_s: float, transfer_id: int, rs: RequestState, src: int, dst: int,
                         num_bytes: int) -> None:
        self.devices.transfer_started(now_s, transfer_id, rs, src, dst, num_bytes)

    def kv_landed(self, now_s: float, transfer_id: int, rs: RequestState, src: int, dst: int) -> None:
        self.devices.kv_landed(now_s, transfer_id, rs, src, dst)

    def request_left(self, now_s: float, group_id: int, rs: RequestState, how: str) -> None:
        self.devices.request_left(now_s, group_id, rs, how)

    def transfer_cancelled(self, now_s: float, transfer_id: int, rs: RequestState, src: int, dst: int) -> None:
        self.devices.transfer_cancelled(now_s, transfer_id, rs, src, dst)

    # the KV tiers' and the store's (served prompts carry prefix hashes: serve/prefixes.py)
    def kv_fetched(self, now_s: float, rs: RequestState, group_id: int, tier: int, start_s: float, end_s: float,
                   num_bytes: float, tokens: int) -> None:
        self.devices.kv_fetched(now_s, rs, group_id, tier, start_s, end_s, num_bytes, tokens)

    def store_read_started(self, now_s: float, flow_id: int, rs: RequestState, group_id: int,
                           hashes: tuple[int, ...]) -> None:
        self.devices.store_read_started(now_s, flow_id, rs, group_id, hashes)

    def store_write_started(self, now_s: float, flow_id: int, group_id: int, request_id: int,
                            hashes: tuple[int, ...]) -> None:
        self.devices.store_write_started(now_s, flow_id, group_id, request_id, hashes)

    def store_evicted(self, now_s: float, blocks: list[tuple[int, int]]) -> None:
        self.devices.store_evicted(now_s, blocks)
