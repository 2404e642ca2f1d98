"""``hetero-sched serve`` for real: the OpenAI front door over the live cluster (the session Ray
cluster), driven by the official ``openai`` client.

The engine behind the server is the one ``hetero-sched run`` uses: device-group actors run the
spans and stream each token as they make it. These tests check what a client gets (text, usage,
streaming, 429 for load, 400 for what can never be served) and what the cluster does with it (a
client that leaves frees its request's KV and slots everywhere; the numpy backend's text is the
tiny Llama's, token for token).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Iterator
from typing import Any, Callable

import numpy as np
import openai
import pytest
import requests

from hetero_sched.engine.assembly import resolve
from hetero_sched.runtime.live import with_absolute_paths
from hetero_sched.runtime.clock import WallClock
from hetero_sched.serve import ServeOptions, start_ingress
from hetero_sched.core.request import Phase
from hetero_sched.serve.engine import EngineCore, EngineOptions, _Live
from hetero_sched.serve.prefixes import prompt_prefix_hashes
from hetero_sched.serve.servecore import FinalEvent, FinishReason, Refusal, Rejected, ServeRequest
from hetero_sched.serve.tokenizer import PLACEHOLDER, ByteTokenizer, Detokenizer
from hetero_sched.tinylm import TinyLM

from helpers import disagg_experiment

pytestmark = pytest.mark.ray

MODEL = "llama-3.1-8b"


class Server:
    """An ingress actor with an :class:`EngineCore` on the session cluster."""

    def __init__(self, exp: dict[str, Any], **options: Any) -> None:
        e, base = resolve(exp)
        self.ingress = start_ingress(functools.partial(EngineCore, with_absolute_paths(e, base),
                                                       EngineOptions(**options)), ServeOptions(port=0))
        self.url = self.ingress.url

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=60)

    def metrics(self) -> dict[str, float]:
        """``/metrics`` samples without labels' quotes: ``name{labels} value`` -> value."""
        out = {}
        for line in requests.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            if line and not line.startswith("#"):
                key, value = line.rsplit(" ", 1)
                out[key] = float(value)
        return out

    def stop(self) -> None:
        self.ingress.stop()


@pytest.fixture(scope="module")
def modeled(ray_cluster: Any) -> Iterator[Server]:
    s = Server(disagg_experiment(model=MODEL))
    yield s
    s.stop()


def wait_for(predicate: Callable[[], bool], timeout_s: float = 30.0) -> None:
    end = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def tiny_llama_text(lm: TinyLM, prompt: str, n: int) -> str:
    """What the single-process tiny Llama makes of ``prompt`` in ``n`` greedy tokens, as text."""
    want, _ = lm.generate(np.asarray(list(ByteTokenizer().encode(prompt))), n)
    detok = Detokenizer()
    return detok.push(want) + detok.flush()


def placeholder(n: int) -> str:
    return (PLACEHOLDER * (n // len(PLACEHOLDER) + 1))[:n].decode()


def test_completions_and_chat_streamed_and_not_with_usage(modeled: Server) -> None:
    c = modeled.client()
    assert [m.id for m in c.models.list()] == [MODEL]
    r = c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=24)
    assert r.choices[0].text == placeholder(24) and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len("Once upon a time"), 24)
    chunks = list(c.completions.create(model=MODEL, prompt="x" * 300, max_tokens=60, stream=True,
                                       stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == placeholder(60)
    assert chunks[-1].usage.completion_tokens == 60 and chunks[-1].usage.prompt_tokens == 300
    # token by token, as the devices made them: far more chunks than reports
    assert len([ch for ch in chunks if ch.choices and ch.choices[0].text]) >= 30
    chat = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=12)
    prompt = len(ByteTokenizer().render_chat([{"role": "user", "content": "hi"}]).encode())
    assert chat.choices[0].message.content == placeholder(12) and chat.usage.prompt_tokens == prompt
    streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=40, stream=True) if ch.choices)
    assert streamed == placeholder(40)
    # the control plane's measured latency, for a simulator to model (experiment field control_plane)
    m = modeled.metrics()
    dispatch = m[f'hetero:control_plane_delay_seconds{{hop="dispatch",model_name="{MODEL}"}}']
    report = m[f'hetero:control_plane_delay_seconds{{hop="report",model_name="{MODEL}"}}']
    assert 0 < dispatch < 0.5 and 0 < report < 0.5


def test_bad_requests_are_400_with_an_openai_error_body(modeled: Server) -> None:
    c = modeled.client()
    with pytest.raises(openai.BadRequestError, match="no-such-model"):
        c.completions.create(model="no-such-model", prompt="x", max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model=MODEL, prompt="x", max_tokens=-3)
    with pytest.raises(openai.BadRequestError) as too_long:
        c.completions.create(model=MODEL, prompt="x" * 131_070, max_tokens=10)     # past the 131,072 window
    assert "context" in str(too_long.value)
    raw = requests.post(f"{modeled.url}/v1/completions", data=b"{not json", timeout=10)
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"
    assert c.completions.create(model=MODEL, prompt="still serving", max_tokens=2).usage.completion_tokens == 2


def test_a_client_that_leaves_frees_its_kv_and_slot_everywhere(modeled: Server) -> None:
    """Read a few tokens of a long stream and hang up: the core cancels the request — it leaves
    its decode batch at the next step boundary, its KV is freed on every group, and the server
    counts it cancelled — while the cluster goes on serving."""
    before = modeled.metrics()
    with requests.post(f"{modeled.url}/v1/completions", stream=True, timeout=60,
                       json={"model": MODEL, "prompt": "y" * 500, "max_tokens": 20_000, "stream": True}) as resp:
        lines = resp.iter_lines()
        got = [line for line, _ in zip(lines, range(30)) if line.startswith(b"data: ")]
        assert len(got) >= 10
        m = modeled.metrics()                          # while it streams, it holds KV and a slot
        assert sum(v for k, v in m.items() if k.startswith("vllm:kv_cache_usage_perc")) > 0

    def freed() -> bool:
        m = modeled.metrics()
        used = sum(v for k, v in m.items() if k.startswith("vllm:kv_cache_usage_perc"))
        running = sum(v for k, v in m.items() if k.startswith("vllm:num_requests_running"))
        return used == 0 and running == 0

    wait_for(freed)
    after = modeled.metrics()
    cancelled = [k for k in after if k.startswith("hetero:requests_cancelled_total")]
    assert cancelled and sum(after[k] for k in cancelled) > sum(before.get(k, 0) for k in cancelled)
    assert modeled.client().completions.create(model=MODEL, prompt="after", max_tokens=5).usage.completion_tokens == 5


def test_overload_is_429_with_retry_after_and_the_reason(ray_cluster: Any) -> None:
    """``admission.max_inflight: 2`` and six long requests at once: the core rejects what finds two
    in flight, and each rejection reaches its client as 429 with Retry-After and the reason."""
    s = Server(disagg_experiment(model=MODEL, admission={"max_inflight": 2}))
    try:
        body = {"model": MODEL, "prompt": "z" * 100, "max_tokens": 3000}
        streams = [requests.post(f"{s.url}/v1/completions", json={**body, "stream": True}, stream=True, timeout=60)
                   for _ in range(2)]
        for r in streams:
            assert r.status_code == 200
            next(r.iter_lines())                     # admitted, streaming
        refused = [requests.post(f"{s.url}/v1/completions", json=body, timeout=60) for _ in range(4)]
        for r in refused:
            assert r.status_code == 429, r.text
            assert float(r.headers["Retry-After"]) > 0
            assert "max_inflight" in r.json()["error"]["message"]
        for r in streams:
            r.close()
    finally:
        s.stop()


def test_a_request_no_group_can_ever_hold_is_400_without_retry_after(ray_cluster: Any) -> None:
    """A prompt within the model's window but beyond the KV every decode group could hold even
    empty can never be served: 400 with an OpenAI error body and no Retry-After (a 429 would have
    clients retry it forever), while what fits is still served."""
    exp = disagg_experiment(model=MODEL)
    exp["groups"][1]["kv_capacity_tokens"] = 4096          # the only decode group; window 131,072
    s = Server(exp)
    try:
        r = requests.post(f"{s.url}/v1/completions", json={"model": MODEL, "prompt": "z" * 5000, "max_tokens": 8},
                          timeout=60)
        assert r.status_code == 400, r.text
        assert "Retry-After" not in r.headers
        error = r.json()["error"]
        assert (error["type"], error["code"]) == ("invalid_request_error", "kv_capacity"), error
        assert "exceed the KV capacity of every group that can decode" in error["message"]
        with pytest.raises(openai.BadRequestError):                     # the client does not retry a 400
            s.client().completions.create(model=MODEL, prompt="z" * 5000, max_tokens=8)
        assert s.client().completions.create(model=MODEL, prompt="fits", max_tokens=4).usage.completion_tokens == 4
    finally:
        s.stop()


@pytest.fixture(scope="module")
def tiny_llama(ray_cluster: Any) -> Iterator[Server]:
    """The numpy backend behind the server, routing prefill by prefix (``disagg-prefix``; its
    weight outweighs the KV a group's view still shows held for its last transfer: views change
    at span ends), prompts hashed in 16-token blocks."""
    s = Server(disagg_experiment(model=MODEL, seed=4, policy={"name": "disagg-prefix", "params": {"overlap_weight": 10}}),
               backend="numpy", prefix_block_tokens=16)
    yield s
    s.stop()


def test_numpy_backend_text_is_the_tiny_llamas_token_for_token(tiny_llama: Server) -> None:
    """With the numpy backend the tokens are the tiny Llama's, prefilled on a Trainium group's actor
    and decoded on the CS-3 group's from the KV it was sent: the streamed text equals what the
    single-process reference makes of the same prompt (sent again, from the prefix cache too)."""
    c = tiny_llama.client()
    # each prompt with the tokens its second send finds cached: its full 16-token blocks (43, 98
    # and 1 tokens)
    prompts = {"The quick brown fox jumps over the lazy dog": 32, "héllo wörld " * 7: 96, "a": 0}
    lm = TinyLM("tiny", 4)
    for prompt, cached in prompts.items():
        n = 23
        expected = tiny_llama_text(lm, prompt, n)
        streamed = "".join(ch.choices[0].text for ch in c.completions.create(
            model=MODEL, prompt=prompt, max_tokens=n, stream=True) if ch.choices)
        assert streamed == expected, prompt
        again = c.completions.create(model=MODEL, prompt=prompt, max_tokens=n)
        assert again.choices[0].text == expected
        assert again.usage.prompt_tokens_details.cached_tokens == cached


def test_a_shared_prompt_prefix_is_a_prefix_cache_hit_and_the_text_stays_the_tiny_llamas(tiny_llama: Server) -> None:
    """Served prompts carry chained prefix hashes: a prompt repeating another's first block is
    routed to the group holding it, its prefill reuses exactly that block's KV
    (``usage.prompt_tokens_details.cached_tokens``), and the text is still the tiny Llama's. The
    second prompt's next block repeats the first prompt's *last* block: a hash of a block's own
    tokens would count it as a hit too, and decode from KV computed after other tokens."""
    x, y, z, w = "Once upon a time", ", in a land far ", "away, there live", "d a tiny llama. "
    c = tiny_llama.client()
    lm = TinyLM("tiny", 4)
    cached = []
    for prompt in (x + y + z + w, x + w + "!", x + y + "?", "no shared start at all"):
        out = c.completions.create(model=MODEL, prompt=prompt, max_tokens=9)
        assert out.choices[0].text == tiny_llama_text(lm, prompt, 9), prompt
        cached.append(out.usage.prompt_tokens_details.cached_tokens)
    assert cached == [0, 16, 32, 0]


def test_a_prefix_another_group_computed_is_read_from_the_kv_store_token_exact(ray_cluster: Any) -> None:
    """With a cluster KV store the server starts its actors: the first prompt's blocks are written
    to it, and the third prompt, placed on the other prefill group (``choices: 1``, seeded),
    prefills from the blocks it reads there -- the text still the tiny Llama's."""
    exp = disagg_experiment(model=MODEL, seed=4, kv_cache={"store": {"nodes": 1}},
                            policy={"name": "disagg", "params": {"choices": 1, "seed": 1}})
    s = Server(exp, backend="numpy")
    shared = ("lorem ipsum dolor sit amet " * 10)[:256]
    try:
        c = s.client()
        lm = TinyLM("tiny", 4)
        cached = []
        for prompt in (shared + " first", shared + " second", shared + " third"):
            out = c.completions.create(model=MODEL, prompt=prompt, max_tokens=5)
            assert out.choices[0].text == tiny_llama_text(lm, prompt, 5), prompt
            cached.append(out.usage.prompt_tokens_details.cached_tokens)
        assert cached == [0, 256, 256]         # the second on the first's group, the third from the store
    finally:
        s.stop()


def test_prefix_hashes_are_chained_over_full_blocks_only() -> None:
    """Block j's hash stands for every token up to its end: equal blocks after different
    prefixes hash apart, and a partial last block gets no hash."""
    a = prompt_prefix_hashes(list(range(40)), 16)
    assert len(a) == 2 and all(0 <= h < 1 << 63 for h in a)
    assert prompt_prefix_hashes(list(range(32)) + [7], 16) == a              # the same full blocks
    b = prompt_prefix_hashes([99] * 16 + list(range(16, 32)), 16)            # block 1 alike, block 0 not
    assert b[0] != a[0] and b[1] != a[1]
    assert prompt_prefix_hashes(list(range(15)), 16) == ()
    with pytest.raises(ValueError):
        prompt_prefix_hashes([1, 2], 0)


def test_each_request_is_one_trace_rooted_at_its_http_request_under_the_clients(ray_cluster: Any,
                                                                                   jaeger: Any) -> None:
    """With tracing, a request is one trace in Jaeger: the client's span (its W3C ``traceparent``)
    > the server's ``POST /v1/completions`` span > ``text_completion <model>`` > the queue,
    prefill (from the Trainium actor's process), transfer and decode (the CS-3 actor's) spans."""
    from hetero_sched.tracing import trace_settings

    settings = trace_settings(trace=True, endpoint=jaeger.otlp_endpoint, service_name="serve-test", env={})
    e, base = resolve(disagg_experiment(model=MODEL))
    ingress = start_ingress(functools.partial(EngineCore, with_absolute_paths(e, base), EngineOptions()),
                            ServeOptions(port=0, trace=settings))
    trace_id, client_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    try:
        r = requests.post(f"{ingress.url}/v1/completions", timeout=60,
                          headers={"traceparent": f"00-{trace_id}-{client_span}-01"},
                          json={"model": MODEL, "prompt": "trace me", "max_tokens": 16})
        assert r.status_code == 200
    finally:
        ingress.stop()                       # flushes every process's spans
    found: list[Any] = []

    def stored() -> bool:                     # Jaeger indexes what it received a moment later
        try:
            found[:] = jaeger.get(f"/api/traces/{trace_id}")["data"][0]["spans"]
        except Exception:
            return False
        return len(found) >= 9

    wait_for(stored)
    spans = {s["operationName"]: s for s in found}
    http = spans["POST /v1/completions"]
    assert http["references"][0]["spanID"] == client_span          # under the client's span
    root = spans[f"text_completion {MODEL}"]
    assert root["references"][0]["spanID"] == http["spanID"]
    for name in ("queue.prefill", "prefill", "queue.decode", "kv_transfer", "decode"):
        assert name in spans, name
    tags = {t["key"]: t["value"] for t in http["tags"]}
    assert tags["http.response.status_code"] == 200


def test_the_engine_says_what_kind_of_refusal_each_ending_is() -> None:
    """No cluster needed: what the engine makes of the core's endings (the HTTP layer answers each
    kind with its status). A rejection after admission keeps its code and kind -- load is RETRY,
    what no group can ever hold NEVER -- and once the engine failed, every request in flight ends
    UNAVAILABLE and every new one is refused so (503), with the failure as the reason."""
    async def main() -> None:
        core = EngineCore(disagg_experiment(model=MODEL))
        core._loop, core._origin, core._wall = asyncio.get_running_loop(), 0.0, WallClock(1.0)   # what start() sets

        def admitted(rid: int) -> _Live:
            live = core._live[rid] = _Live(asyncio.Queue(), core._loop.create_future(), 10, 50)
            live.admitted.set_result(None)
            return live

        def final(live: _Live) -> FinalEvent:
            event = live.queue.get_nowait()
            assert isinstance(event, FinalEvent) and event.finish_reason is FinishReason.ERROR
            assert event.rejected is not None
            return event

        load, never = admitted(0), admitted(1)
        core._end(0, Phase.REJECTED, "no decode room", "no_decode_room", 1.0, 1, 0, None)
        core._end(1, Phase.REJECTED, "more KV than any group", "kv_capacity", 1.0, 1, 0, None)
        assert final(load).rejected.refusal is Refusal.RETRY
        assert final(never).rejected.refusal is Refusal.NEVER
        gone = admitted(2)
        core._failure = "RuntimeError: boom"
        core._fail_all()
        rejected = final(gone).rejected
        assert (rejected.refusal, rejected.code) == (Refusal.UNAVAILABLE, "engine_stopped")
        assert "boom" in rejected.reason
        with pytest.raises(Rejected) as info:
            await core.submit(ServeRequest("r", MODEL, (1, 2, 3), 4))
        assert (info.value.refusal, info.value.code) == (Refusal.UNAVAILABLE, "engine_stopped")

    asyncio.run(main())
