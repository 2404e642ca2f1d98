"""Where the HTTP server runs: an async Ray actor on the driver's node (or, for tests, any event loop).

Why a plain aiohttp server in a Ray actor rather than Ray Serve: measured on this 2-core machine
with the same token source (``bench/serve_ingress.py``, table in docs/serving.md), Ray Serve's
proxy -> replica hop added ~6 ms to TTFT at one stream and ~30 ms at eight, and glued a third
of the chunks together at eight streams; the actor added < 1 ms and ~1 ms, and glued < 1%.
A client of `hetero-sched serve` measures TTFT/ITL against the simulator, so the ingress must
add as little as possible; one actor (one process, no proxy) is the least. It keeps what Ray
gives: placement on the driver's node (so a loopback bind is reachable where the user ran the
command), the actor's lifetime tied to the job, and the core talking to the scheduler actor
over Ray calls.

``start_ingress(core_factory, options)`` creates the actor, which builds its core by calling
``core_factory()`` inside the actor (so the core lives on the server's event loop), binds
``options.host:options.port`` and returns the URL. ``serve_app(core, options)`` does the same on
the current event loop without Ray (tests, embedding).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import ray
from aiohttp import web
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from hetero_sched.serve.app import ServeApp
from hetero_sched.serve.servecore import CoreStatus, ServeCore
from hetero_sched.serve.tokenizer import ByteTokenizer
from hetero_sched.tracing import ProcessTracing, TraceSettings

CoreFactory = Callable[[], ServeCore]
"""Builds the core inside the server's process (a picklable callable: a class, a ``functools.partial``)."""


@dataclass(frozen=True)
class ServeOptions:
    """Where the server listens and which tokenizer it counts with."""

    host: str = "127.0.0.1"
    """Loopback by default: exposing it is an explicit ``--host 0.0.0.0``."""
    port: int = 8000
    """0 picks a free port (the URL returned says which)."""
    tokenizer_dir: Optional[Path] = None
    """Default: the packaged byte tokenizer."""
    trace: Optional[TraceSettings] = None
    """Export a trace per request (the HTTP request is its root span); None: no tracing."""


@dataclass
class RunningServer:
    """An aiohttp server on the current event loop."""

    runner: web.AppRunner
    app: ServeApp
    url: str
    tracing: Optional[ProcessTracing] = None

    async def stop(self) -> None:
        """Stop listening, cancel what is in flight, close the core, export the last spans."""
        await self.runner.cleanup()
        if self.tracing is not None:
            await asyncio.to_thread(self.tracing.shutdown)


async def serve_app(core: ServeCore, options: ServeOptions) -> RunningServer:
    """Start ``core`` and serve it on the running event loop; returns once listening."""
    tracing = ProcessTracing(options.trace, instance="serve") if options.trace is not None else None
    await core.start(tracing)
    app = ServeApp(core, ByteTokenizer(options.tokenizer_dir), tracing.tracer if tracing is not None else None)
    runner = web.AppRunner(app.application(), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, options.host, options.port)
    await site.start()
    host, port = runner.addresses[0][:2]
    shown = f"[{host}]" if ":" in host else host
    return RunningServer(runner, app, f"http://{shown}:{port}", tracing)


@ray.remote(num_cpus=0, max_restarts=0)
class IngressActor:
    """The HTTP server as a Ray actor (async: the server runs on the actor's event loop)."""

    def __init__(self, core_factory: CoreFactory, options: ServeOptions) -> None:
        self._factory = core_factory
        self._options = options
        self._server: Optional[RunningServer] = None

    async def start(self) -> str:
        """Build and start the core, then listen; the base URL."""
        if self._server is None:
            self._server = await serve_app(self._factory(), self._options)
        return self._server.url

    async def deliver(self, message: bytes) -> None:
        """Messages from the core's devices (streamed tokens), for the core."""
        if self._server is not None:
            self._server.app.core.deliver(message)

    async def status(self) -> CoreStatus:
        """The core's status (what ``/metrics`` shows)."""
        assert self._server is not None, "start() first"
        return await self._server.app.core.status()

    async def stop(self) -> None:
        """Stop listening and close the core."""
        if self._server is not None:
            await self._server.stop()
            self._server = None


@dataclass
class Ingress:
    """A started :class:`IngressActor` and its URL."""

    actor: ray.actor.ActorHandle
    url: str

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the server (in-flight requests are cancelled in the core) and end the actor."""
        try:
            ray.get(self.actor.stop.remote(), timeout=timeout_s)
        finally:
            ray.kill(self.actor)


def start_ingress(core_factory: CoreFactory, options: ServeOptions = ServeOptions(), *,
                  timeout_s: float = 120.0) -> Ingress:
    """Start the HTTP server actor on this driver's node (Ray must be initialized); returns once it listens."""
    here = ray.get_runtime_context().get_node_id()
    actor = IngressActor.options(  # type: ignore[attr-defined]  # ray.remote's class wrapper
        scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
        # Ray warns at any ray.get in an async actor; the engine's are in its own thread, not the loop's
        runtime_env={"env_vars": {"RAY_WARN_BLOCKING_GET_INSIDE_ASYNC": "0"}}).remote(core_factory, options)
    try:
        url = ray.get(actor.start.remote(), timeout=timeout_s)
    except BaseException:
        ray.kill(actor)
        raise
    return Ingress(actor, url)

