"""Which ingress for `hetero-sched serve`? Ray Serve vs an aiohttp server in a Ray actor.

    RAY_AUTH_MODE=disabled flock /tmp/hetero-bench.lock python bench/serve_ingress.py [--ingress serve,actor]

Both prototypes stream the same fake token source -- ``--tokens`` SSE chunks (OpenAI-shaped
``text_completion`` chunks), the first at once and token k at ``start + k x --interval-ms`` on an
absolute schedule, so a late token does not delay the next one -- and a client in this process
(aiohttp) timestamps every chunk as it arrives:

- ``actor``: an aiohttp server on the event loop of an async Ray actor (one process, the
  client talks to it directly);
- ``serve``: a Ray Serve application (the default proxy actor, uvicorn, forwarding to one
  replica that returns a Starlette ``StreamingResponse``; needs ``ray[serve]``).

Reported per ingress and concurrency: client TTFT (request sent -> first chunk: pure overhead,
the source emits token 0 at once), client ITL p50/p99 against the source's ``--interval-ms``,
how many chunks arrived glued to the previous one (< 0.1 ms apart), the stream's end-to-end
lateness against the ideal ``(tokens - 1) x interval``, and the latency of a tiny non-streaming
request (per-request overhead). Needs the ``ray[serve]`` extra only for ``--ingress serve``.

Prints one JSON object last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import time
from typing import AsyncIterator

import numpy as np

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import aiohttp  # noqa: E402
import ray  # noqa: E402


def _chunk(k: int) -> bytes:
    body = {"id": "cmpl-bench", "object": "text_completion", "created": 0, "model": "tiny",
            "choices": [{"index": 0, "text": "a", "logprobs": None, "finish_reason": None, "k": k}]}
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


async def token_source(num_tokens: int, interval_s: float) -> AsyncIterator[bytes]:
    """The fake source both prototypes stream: chunk k at ``start + k * interval_s``."""
    start = time.perf_counter()
    for k in range(num_tokens):
        delay = start + k * interval_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        yield _chunk(k)
    yield b"data: [DONE]\n\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@ray.remote(num_cpus=0)
class HttpActor:
    """Prototype ``actor``: aiohttp on the actor's own event loop."""

    async def start(self, port: int) -> None:
        from aiohttp import web

        async def stream(request: web.Request) -> web.StreamResponse:
            q = request.query
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            async for chunk in token_source(int(q["n"]), float(q["dt"])):
                await resp.write(chunk)
            await resp.write_eof()
            return resp

        async def once(request: web.Request) -> web.Response:
            return web.json_response({"id": "cmpl-bench", "choices": [{"text": "a"}]})

        app = web.Application()
        app.router.add_get("/stream", stream)
        app.router.add_get("/once", once)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()


def start_serve(port: int) -> None:
    """Prototype ``serve``: one Ray Serve replica behind the default HTTP proxy."""
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse

    @serve.deployment(max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
    class App:
        async def __call__(self, request: Request):  # noqa: ANN204
            if request.url.path.endswith("/once"):
                return JSONResponse({"id": "cmpl-bench", "choices": [{"text": "a"}]})
            q = request.query_params
            return StreamingResponse(token_source(int(q["n"]), float(q["dt"])), media_type="text/event-stream")

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(App.bind(), route_prefix="/", name="ingress-bench")


async def one_stream(session: aiohttp.ClientSession, url: str) -> tuple[float, list[float]]:
    """(TTFT, arrival times of every token chunk) for one streamed request, seconds."""
    sent = time.perf_counter()
    arrivals: list[float] = []
    async with session.get(url) as resp:
        resp.raise_for_status()
        async for line in resp.content:
            if line.startswith(b"data: {"):
                arrivals.append(time.perf_counter())
    return arrivals[0] - sent, arrivals


async def measure(base: str, args: argparse.Namespace, concurrency: int) -> dict:
    url = f"{base}/stream?n={args.tokens}&dt={args.interval_ms / 1e3}"
    ttfts: list[float] = []
    itls: list[np.ndarray] = []
    lateness: list[float] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        for _ in range(3):                                            # warm-up: connections, imports, JIT paths
            await one_stream(session, url)
        for _ in range(args.streams):
            results = await asyncio.gather(*(one_stream(session, url) for _ in range(concurrency)))
            for ttft, arr in results:
                assert len(arr) == args.tokens, f"{len(arr)} chunks"
                ttfts.append(ttft)
                itls.append(np.diff(arr))
                lateness.append(arr[-1] - arr[0] - (args.tokens - 1) * args.interval_ms / 1e3)
        once = []
        if concurrency == 1:
            for _ in range(args.requests):
                t = time.perf_counter()
                async with session.get(f"{base}/once") as resp:
                    await resp.read()
                once.append(time.perf_counter() - t)
    itl = np.concatenate(itls) * 1e3
    ms = lambda xs, q: round(float(np.percentile(np.asarray(xs) * 1e3, q)), 3)  # noqa: E731
    out = {"concurrency": concurrency, "streams": len(ttfts), "ttft_ms_p50": ms(ttfts, 50), "ttft_ms_p99": ms(ttfts, 99),
           "itl_ms_p50": round(float(np.percentile(itl, 50)), 3), "itl_ms_p99": round(float(np.percentile(itl, 99)), 3),
           "itl_ms_p1": round(float(np.percentile(itl, 1)), 3),
           "glued_chunks_frac": round(float(np.mean(itl < 0.1)), 4),
           "stream_lateness_ms_p50": ms(lateness, 50), "stream_lateness_ms_p99": ms(lateness, 99)}
    if once:
        out |= {"request_ms_p50": ms(once, 50), "request_ms_p99": ms(once, 99)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ingress", default="actor,serve", help="comma-separated: actor, serve")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--interval-ms", type=float, default=2.0)
    ap.add_argument("--streams", type=int, default=30, help="rounds of concurrent streams per concurrency level")
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--requests", type=int, default=300, help="non-streaming requests (concurrency 1)")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    ray.init(include_dashboard=False, num_cpus=2, logging_level="ERROR", log_to_driver=False)
    results: dict = {"tokens": args.tokens, "interval_ms": args.interval_ms, "ray": ray.__version__}
    try:
        for ingress in args.ingress.split(","):
            port = _free_port()
            if ingress == "actor":
                actor = HttpActor.remote()
                ray.get(actor.start.remote(port))
            elif ingress == "serve":
                start_serve(port)
            else:
                sys.exit(f"error: --ingress: unknown {ingress!r}")
            base = f"http://127.0.0.1:{port}"
            results[ingress] = [asyncio.run(measure(base, args, c)) for c in levels]
            print(json.dumps({ingress: results[ingress]}), file=sys.stderr)
            if ingress == "actor":
                ray.kill(actor)
            else:
                from ray import serve
                serve.shutdown()
    finally:
        ray.shutdown()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
