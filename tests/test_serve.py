"""The OpenAI front door (``hetero_sched.serve``), driven by the official ``openai`` client.

The server is the real aiohttp application on a real socket; the engine behind it is the
FakeCore test double (tokens at fixed intervals), which records what reached it -- so these
tests check the HTTP layer: formats, usage, errors, 429, and that a client leaving cancels
its request in the core.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any, Callable

import openai
import pytest
import ray
import requests
from hypothesis import HealthCheck, given, settings, strategies as st

from hetero_sched.serve import ServeOptions, serve_app, start_ingress
from hetero_sched.serve.fakecore import FakeCore, FakeCoreConfig
from hetero_sched.serve.servecore import Refusal
from hetero_sched.serve.tokenizer import PLACEHOLDER


class ThreadServer:
    """The server on its own event loop in a background thread (the test thread is the client)."""

    def __init__(self, core: FakeCore) -> None:
        self.core = core
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(serve_app(core, ServeOptions(port=0)), self.loop).result(30)
        self.url = self.server.url

    def client(self, **kw: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, **kw)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def serve() -> Iterator[Callable[..., ThreadServer]]:
    started: list[ThreadServer] = []

    def start(**config: Any) -> ThreadServer:
        started.append(ThreadServer(FakeCore(FakeCoreConfig(**config))))
        return started[-1]

    yield start
    for s in started:
        s.close()


def placeholder(n: int) -> str:
    return (PLACEHOLDER * (n // len(PLACEHOLDER) + 1))[:n].decode()


def wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    end = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_completion_non_streaming_text_usage_and_request_id(serve):
    s = serve()
    raw = s.client().completions.with_raw_response.create(
        model="tiny", prompt="héllo", max_tokens=9, extra_headers={"X-Request-Id": "my-req-1"})
    r = raw.parse()
    assert raw.headers["x-request-id"] == "my-req-1"
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == "tiny"
    assert r.choices[0].text == placeholder(9) and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (6, 9, 15)  # é is 2 bytes
    assert s.core.submitted[0].prompt_token_ids == tuple("héllo".encode())
    assert s.core.finished == [s.core.submitted[0].request_id] and s.core.cancelled == []


def test_completion_prompt_as_token_ids_and_defaults(serve):
    s = serve()
    r = s.client().completions.create(model="tiny", prompt=[104, 105, 255])
    assert r.usage.prompt_tokens == 3
    assert r.usage.completion_tokens == 16                           # OpenAI's default max_tokens


def test_completion_streaming_with_usage(serve):
    s = serve()
    chunks = list(s.client().completions.create(model="tiny", prompt="abc", max_tokens=12, stream=True,
                                                  stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == placeholder(12)
    assert sum(1 for t in texts if t) == 12                          # one chunk per token event
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == 3
    assert all(c.usage is None for c in chunks[:-1])


def test_streaming_without_usage_has_none(serve):
    s = serve()
    chunks = list(s.client().completions.create(model="tiny", prompt="abc", max_tokens=3, stream=True))
    assert all(c.usage is None for c in chunks) and chunks[-1].choices[0].finish_reason == "length"


def test_chat_non_streaming_and_streaming(serve):
    s = serve()
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    prompt = "system: be brief\nuser: hi\nassistant: "                 # the shipped chat template
    r = s.client().chat.completions.create(model="tiny", messages=messages, max_tokens=5)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == placeholder(5)
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == 5
    assert s.core.submitted[0].prompt_token_ids == tuple(prompt.encode())
    chunks = list(s.client().chat.completions.create(model="tiny", messages=messages, max_completion_tokens=7,
                                                       stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == placeholder(7)
    assert chunks[-1].usage.prompt_tokens == len(prompt) and chunks[-1].usage.completion_tokens == 7
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_chat_text_parts(serve):
    s = serve()
    r = s.client().chat.completions.create(
        model="tiny", max_tokens=1, messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                          {"type": "text", "text": "b"}]}])
    assert r.usage.prompt_tokens == len("user: ab\nassistant: ")


def test_rejection_is_429_with_retry_after_and_reason(serve):
    s = serve(max_inflight=1, itl_s=0.05, retry_after_s=2.5)
    client = s.client()
    first = client.completions.create(model="tiny", prompt="x", max_tokens=1000, stream=True)
    next(iter(first))                                                # admitted and streaming
    with pytest.raises(openai.RateLimitError) as info:
        client.completions.create(model="tiny", prompt="y", max_tokens=5)
    assert info.value.status_code == 429
    assert info.value.response.headers["retry-after"] == "3"
    assert "max_inflight 1" in info.value.body["message"] and info.value.body["code"] == "rate_limit_exceeded"
    first.close()
    wait_for(lambda: not s.core._active)
    assert len(s.core.submitted) == 1                                # the rejected one never reached a stream
    metrics = requests.get(f"{s.url}/metrics").text
    assert 'hetero:requests_rejected_total{model_name="tiny"} 1.0' in metrics


def error_of(resp: requests.Response) -> dict:
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


BAD_REQUESTS = [
    (b'{"model": "tiny", "prompt": "x", ', None, "invalid_json"),
    (b"\xff\xfe not json", None, "invalid_json"),
    (b"[1, 2]", None, "invalid_json"),
    (json.dumps({"model": "llama-9000", "prompt": "x"}).encode(), "model", "model_not_found"),
    (json.dumps({"model": "tiny", "prompt": "x", "max_tokens": -1}).encode(), "max_tokens", "invalid_value"),
    (json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 0}).encode(), "max_tokens", "invalid_value"),
    (json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 2.5}).encode(), "max_tokens", "invalid_type"),
    (json.dumps({"model": "tiny", "prompt": "x", "max_tokens": "10"}).encode(), "max_tokens", "invalid_type"),
    (json.dumps({"model": "tiny", "prompt": "x", "max_tokens": True}).encode(), "max_tokens", "invalid_type"),
    (json.dumps({"model": "tiny", "prompt": "x" * 60, "max_tokens": 5}).encode(), "prompt", "context_length_exceeded"),
    (json.dumps({"model": "tiny", "prompt": "x" * 30, "max_tokens": 40}).encode(), "prompt", "context_length_exceeded"),
    (json.dumps({"model": "tiny", "prompt": ""}).encode(), "prompt", "invalid_value"),
    (json.dumps({"model": "tiny", "prompt": [1, 256]}).encode(), "prompt", "invalid_value"),
    (json.dumps({"model": "tiny", "prompt": ["a", "b"]}).encode(), "prompt", "invalid_value"),
    (json.dumps({"model": "tiny", "prompt": "x", "n": 2}).encode(), "n", "invalid_value"),
    (json.dumps({"model": "tiny", "prompt": "x", "stop": ["\n"]}).encode(), "stop", "unsupported_parameter"),
    (json.dumps({"model": "tiny", "prompt": "x", "stream_options": {"include_usage": True}}).encode(),
     "stream_options", "invalid_value"),
    (json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 5, "min_tokens": 6}).encode(), "min_tokens", "invalid_value"),
]


@pytest.mark.parametrize("body, param, code", BAD_REQUESTS)
def test_bad_completion_requests_are_400_with_openai_error_body(serve, body, param, code):
    s = serve(max_model_len=64)
    resp = requests.post(f"{s.url}/v1/completions", data=body, headers={"Content-Type": "application/json"})
    assert resp.status_code == 400
    err = error_of(resp)
    assert (err["type"], err["param"], err["code"]) == ("invalid_request_error", param, code), err
    assert s.core.submitted == []


def test_bad_chat_requests_and_openai_client_errors(serve):
    s = serve(max_model_len=64)
    client = s.client()
    for kwargs, param in [({"messages": []}, "messages"), ({"messages": [{"content": "no role"}]}, "messages[0]"),
                          ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
                          ({"messages": [{"role": "user", "content": "x" * 100}]}, "messages")]:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="tiny", **kwargs)
        assert info.value.status_code == 400 and info.value.body["param"] == param, info.value.body
    with pytest.raises(openai.BadRequestError, match="does not exist"):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    assert s.core.submitted == []


def test_unknown_routes_and_methods_are_json_errors(serve):
    s = serve()
    resp = requests.get(f"{s.url}/v1/embeddings")
    assert resp.status_code == 404 and error_of(resp)["code"] == "not_found"
    resp = requests.get(f"{s.url}/v1/completions")
    assert resp.status_code == 405 and error_of(resp)["code"] == "method_not_allowed"


def test_models_health_ready(serve):
    s = serve(max_model_len=2048)
    models = s.client().models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert requests.get(f"{s.url}/v1/models").json()["data"][0]["max_model_len"] == 2048
    assert requests.get(f"{s.url}/health").status_code == 200
    assert requests.get(f"{s.url}/ready").json() == {"status": "ready"}


def test_streaming_disconnect_cancels_the_request_in_the_core(serve):
    s = serve(itl_s=0.01)
    stream = s.client().completions.create(model="tiny", prompt="x", max_tokens=4000, stream=True)
    it = iter(stream)
    for _ in range(3):
        next(it)
    (rid,) = [r.request_id for r in s.core.submitted]
    assert s.core.cancelled == []
    stream.close()                                                   # the client goes away mid-stream
    wait_for(lambda: s.core.cancelled == [rid])
    assert s.core.finished == [] and not s.core._active
    metrics = requests.get(f"{s.url}/metrics").text
    assert 'hetero:requests_cancelled_total{model_name="tiny"} 1.0' in metrics
    assert 'vllm:num_requests_running{model_name="tiny"} 0.0' in metrics


def test_disconnect_before_the_first_token_cancels(serve):
    s = serve(ttft_s=30.0)
    stream = s.client(timeout=0.5).completions.create(model="tiny", prompt="x", max_tokens=10, stream=True)
    with pytest.raises(openai.APITimeoutError):
        next(iter(stream))                                           # headers came, no token yet
    stream.close()
    wait_for(lambda: len(s.core.cancelled) == 1)
    assert s.core.finished == []


def test_non_streaming_disconnect_cancels(serve):
    s = serve(itl_s=0.01)
    with pytest.raises(openai.APITimeoutError):
        s.client(timeout=0.5).completions.create(model="tiny", prompt="x", max_tokens=4000)
    wait_for(lambda: len(s.core.cancelled) == 1)
    assert s.core.finished == []


def test_core_failure_after_admission(serve):
    s = serve(fail_at_token=2)
    with pytest.raises(openai.InternalServerError, match="fake device failure"):
        s.client().completions.create(model="tiny", prompt="x", max_tokens=5)
    with pytest.raises(openai.APIError, match="fake device failure"):
        list(s.client().completions.create(model="tiny", prompt="x", max_tokens=5, stream=True))
    assert requests.get(f"{s.url}/health").status_code == 200


REFUSAL_STATUS = [(Refusal.RETRY, 429, "rate_limit_exceeded", True), (Refusal.NEVER, 400, "fake_refusal", False),
                  (Refusal.UNAVAILABLE, 503, "fake_refusal", True)]


@pytest.mark.parametrize("refusal,status,code,retry_after", REFUSAL_STATUS)
def test_a_refusal_before_or_after_admission_gets_its_kinds_status(serve, refusal, status, code, retry_after):
    """Each kind of refusal has its status (429 retry later, 400 never, 503 the server cannot serve
    now), with ``Retry-After`` only where a retry makes sense -- refused at submission, or after
    admission (a non-streamed reply's status is not out yet; a stream's error event has the body)."""
    before = serve(refuse=refusal, retry_after_s=2.5)
    after = serve(fail_at_token=2, fail_refusal=refusal, retry_after_s=2.5)
    body = {"model": "tiny", "prompt": "x", "max_tokens": 5}
    for s, message in ((before, "fake refusal"), (after, "fake refusal after admission")):
        r = requests.post(f"{s.url}/v1/completions", json=body, timeout=10)
        assert r.status_code == status, r.text
        error = error_of(r)
        assert error["code"] == code and message in error["message"], error
        assert ("Retry-After" in r.headers) == retry_after and r.headers.get("Retry-After", "3") == "3"
    with requests.post(f"{after.url}/v1/completions", json={**body, "stream": True}, stream=True, timeout=10) as r:
        assert r.status_code == 200
        events = [line[len(b"data: "):] for line in r.iter_lines() if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]" and json.loads(events[-2])["error"]["code"] == code, events[-2:]


def test_metrics_have_vllm_names_and_group_gauges(serve):
    s = serve(itl_s=0.001)
    client = s.client()
    for _ in range(3):
        client.completions.create(model="tiny", prompt="abcd", max_tokens=4)
    stream = client.completions.create(model="tiny", prompt="x", max_tokens=4000, stream=True)
    next(iter(stream))
    resp = requests.get(f"{s.url}/metrics")
    stream.close()
    assert resp.headers["content-type"].startswith("text/plain")
    text = resp.text
    for line in ['vllm:time_to_first_token_seconds_count{model_name="tiny"} 3.0',
                 'vllm:e2e_request_latency_seconds_count{model_name="tiny"} 3.0',
                 'vllm:time_per_output_token_seconds_count{model_name="tiny"} 3.0',
                 'vllm:inter_token_latency_seconds_count{model_name="tiny"} 9.0',   # 3 gaps per 4-token request
                 'vllm:prompt_tokens_total{model_name="tiny"} 12.0',
                 'vllm:generation_tokens_total{model_name="tiny"} 12.0',
                 'vllm:request_success_total{finished_reason="length",model_name="tiny"} 3.0',
                 'vllm:num_requests_running{model_name="tiny"} 1.0',
                 'vllm:num_requests_waiting{model_name="tiny"} 0.0',
                 'hetero:group_requests_running{device="none",group="fake",model_name="tiny",role="both"} 1.0']:
        assert line in text, line
    assert "vllm:kv_cache_usage_perc" in text


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                           max_leaves=6)
FIELDS = ("model", "prompt", "messages", "max_tokens", "max_completion_tokens", "min_tokens", "stream",
          "stream_options", "n", "stop", "echo", "logprobs", "ignore_eos")
BODIES = st.one_of(
    st.binary(max_size=40),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=6).map(lambda d: json.dumps(d).encode()),
    st.fixed_dictionaries({"model": st.just("tiny"), "prompt": JSON_VALUES | st.text(max_size=10)},
                          optional={f: JSON_VALUES for f in FIELDS[3:]}).map(lambda d: json.dumps(d).encode()))


def test_fuzzed_bodies_never_break_the_server(serve):
    s = serve(max_model_len=48, ttft_s=0.0, itl_s=0.0)
    statuses: dict[int, int] = {}
    with requests.Session() as http:

        @settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
        @given(body=BODIES, path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
        def check(body: bytes, path: str) -> None:
            resp = http.post(s.url + path, data=body, headers={"Content-Type": "application/json"}, timeout=10)
            statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
            assert resp.status_code in (200, 400), (resp.status_code, body, resp.text)
            if resp.status_code == 400:
                error_of(resp)

        check()
        assert http.get(f"{s.url}/health").status_code == 200
        assert http.post(f"{s.url}/v1/completions", json={"model": "tiny", "prompt": "ok", "max_tokens": 2}).status_code == 200
    assert statuses.get(400, 0) >= 300, statuses                    # mostly bad bodies, as intended
    assert not s.core._active


@pytest.mark.ray
def test_ingress_actor_serves_on_loopback_and_a_disconnect_reaches_its_core(ray_cluster):
    ingress = start_ingress(partial(FakeCore, FakeCoreConfig(itl_s=0.01)), ServeOptions(port=0))
    try:
        assert ingress.url.startswith("http://127.0.0.1:")
        client = openai.OpenAI(base_url=f"{ingress.url}/v1", api_key="unused", max_retries=0)
        assert client.completions.create(model="tiny", prompt="abc", max_tokens=3).choices[0].text == placeholder(3)
        stream = client.completions.create(model="tiny", prompt="x", max_tokens=4000, stream=True)
        it = iter(stream)
        for _ in range(3):
            next(it)
        assert ray.get(ingress.actor.status.remote()).num_running == 1
        stream.close()
        wait_for(lambda: ray.get(ingress.actor.status.remote()).num_running == 0)
        assert 'hetero:requests_cancelled_total{model_name="tiny"} 1.0' in requests.get(f"{ingress.url}/metrics").text
    finally:
        ingress.stop()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{ingress.url}/health")


def test_shipped_openai_example_runs(serve):
    s = serve()
    example = Path(__file__).resolve().parents[1] / "examples" / "openai_client.py"
    done = subprocess.run([sys.executable, str(example), "--base-url", f"{s.url}/v1"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"completion: '{placeholder(16)}' (length)" in done.stdout
    assert f"chat (streamed): '{placeholder(32)}'" in done.stdout and "'completion_tokens': 32" in done.stdout
