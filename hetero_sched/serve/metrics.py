"""``/metrics``: Prometheus text with vLLM's metric names, plus per-group ``hetero:`` gauges.

Dashboards and gateways built for vLLM (its Grafana board, the Gateway API inference extension,
llm-d's scorers) read these names. Histograms are observed by the HTTP layer, on the server's
monotonic clock, as tokens reach it -- what vLLM's front end sees: TTFT (request received ->
first token event), ITL (between token events; several tokens reported at once count as one
gap, as vLLM counts an engine step), TPOT per request, end to end. Gauges are read from
:meth:`ServeCore.status` at each scrape. Each server has its own registry (no process-global
state), so several servers can live in one process.

=========================================  ==========  ==============================================
``vllm:num_requests_running``              gauge       admitted and started (prefill or decode)
``vllm:num_requests_waiting``              gauge       admitted, waiting for a first placement
``vllm:kv_cache_usage_perc``               gauge       used / total KV blocks, 0-1
``vllm:time_to_first_token_seconds``       histogram
``vllm:inter_token_latency_seconds``       histogram
``vllm:time_per_output_token_seconds``     histogram   per request: (end - first token) / (tokens - 1)
``vllm:e2e_request_latency_seconds``       histogram
``vllm:request_prompt_tokens``             histogram
``vllm:request_generation_tokens``         histogram
``vllm:prompt_tokens_total``               counter
``vllm:generation_tokens_total``           counter
``vllm:request_success_total``             counter     label ``finished_reason``
``hetero:requests_rejected_total``         counter     requests the core refused before admission (429; 400: never servable; 503: stopped)
``hetero:requests_cancelled_total``        counter     streams closed before their end (disconnects)
``hetero:group_requests_running``          gauge       label ``group`` (+ ``device``, ``role``)
``hetero:group_requests_waiting``          gauge       same labels
``hetero:group_kv_cache_usage_perc``       gauge       same labels
``hetero:group_busy_frac``                 gauge       same labels
``hetero:control_plane_delay_seconds``     gauge       mean so far, label ``hop``: ``dispatch`` (a span planned ->
                                                       its device starting it), ``report`` (a span's end ->
                                                       the scheduler applying it)
=========================================  ==========  ==============================================

Every metric carries ``model_name`` (vLLM's label).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from hetero_sched.serve.servecore import CoreStatus

CONTENT_TYPE = CONTENT_TYPE_LATEST
"""``Content-Type`` of the exposition."""

_FAST = (0.0005, 0.001, 0.002, 0.005)
"""Sub-10 ms buckets vLLM's lists lack: a CS-3 decodes a token in ~1.5 ms."""
TTFT_BUCKETS = (*_FAST, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (*_FAST, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


class ServeMetrics:
    """The server's metrics and their registry."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        r, m = self.registry, ("model_name",)
        self.running = Gauge("vllm:num_requests_running", "Requests admitted and started", m, registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests admitted and waiting for placement", m, registry=r)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage, 0-1 (1 = 100%)", m, registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token", m, buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between token events", m, buckets=ITL_BUCKETS, registry=r)
        self.tpot = Histogram("vllm:time_per_output_token_seconds", "Mean time per output token after the first",
                              m, buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency", m, buckets=E2E_BUCKETS, registry=r)
        self.prompt_tokens = Histogram("vllm:request_prompt_tokens", "Prompt tokens per request", m,
                                       buckets=TOKEN_BUCKETS, registry=r)
        self.generation_tokens = Histogram("vllm:request_generation_tokens", "Generated tokens per request", m,
                                           buckets=TOKEN_BUCKETS, registry=r)
        self.prompt_total = Counter("vllm:prompt_tokens", "Prompt tokens processed", m, registry=r)
        self.generation_total = Counter("vllm:generation_tokens", "Tokens generated", m, registry=r)
        self.success = Counter("vllm:request_success", "Requests finished", (*m, "finished_reason"), registry=r)
        self.rejected = Counter("hetero:requests_rejected", "Requests the core refused before admission (HTTP 429; 400 if never servable; 503 once stopped)", m, registry=r)
        self.cancelled = Counter("hetero:requests_cancelled", "Streams closed before their end", m, registry=r)
        g = (*m, "group", "device", "role")
        self.group_running = Gauge("hetero:group_requests_running", "Requests running on a device group", g, registry=r)
        self.group_waiting = Gauge("hetero:group_requests_waiting", "Requests queued at a device group", g, registry=r)
        self.group_kv = Gauge("hetero:group_kv_cache_usage_perc", "KV-cache usage of a device group, 0-1", g, registry=r)
        self.group_busy = Gauge("hetero:group_busy_frac", "Recent share of time a device group was busy", g, registry=r)
        self.control_plane = Gauge("hetero:control_plane_delay_seconds", "Mean latency of the scheduler <-> device "
                                   "messages so far", (*m, "hop"), registry=r)

    def observe_finished(self, *, ttft_s: float | None, e2e_s: float, prompt_tokens: int, generation_tokens: int,
                         finished_reason: str) -> None:
        """Record one finished request (``ttft_s`` None: it produced no token)."""
        m = self.model_name
        if ttft_s is not None:
            if generation_tokens > 1:
                self.tpot.labels(m).observe((e2e_s - ttft_s) / (generation_tokens - 1))
        self.e2e.labels(m).observe(e2e_s)
        self.prompt_tokens.labels(m).observe(prompt_tokens)
        self.generation_tokens.labels(m).observe(generation_tokens)
        self.prompt_total.labels(m).inc(prompt_tokens)
        self.generation_total.labels(m).inc(generation_tokens)
        self.success.labels(m, finished_reason).inc()

    def render(self, status: CoreStatus) -> bytes:
        """The exposition text, gauges refreshed from ``status``."""
        m = self.model_name
        self.running.labels(m).set(status.num_running)
        self.waiting.labels(m).set(status.num_waiting)
        self.kv_usage.labels(m).set(status.kv_cache_usage)
        for gauge in (self.group_running, self.group_waiting, self.group_kv, self.group_busy):
            gauge.clear()                                     # a group that left must not linger
        for grp in status.groups:
            labels = (m, grp.name, grp.device, grp.role)
            self.group_running.labels(*labels).set(grp.num_running)
            self.group_waiting.labels(*labels).set(grp.num_waiting)
            self.group_kv.labels(*labels).set(grp.kv_blocks_used / grp.kv_blocks_total if grp.kv_blocks_total else 0.0)
            self.group_busy.labels(*labels).set(grp.busy_frac)
        self.control_plane.labels(m, "dispatch").set(status.dispatch_delay_s)
        self.control_plane.labels(m, "report").set(status.report_delay_s)
        return generate_latest(self.registry)
