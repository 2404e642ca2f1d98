"""Tracing: settings, the span tree built from the core's hooks, and real export to a real Jaeger."""

from __future__ import annotations

import collections
import logging
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import hetero_sched as hs
from hetero_sched.errors import UserError
from hetero_sched.experiment import build_groups, build_workload, parse_experiment
from hetero_sched.engine.assembly import build_scheduler, resolve
from hetero_sched.engine.loop import run_events
from hetero_sched.tracing import ProcessTracing, TraceSettings, attach_tracer, trace_settings

from helpers import colocated_experiment, disagg_experiment

ROOT_PREFIX = "text_completion "


# --- settings ---------------------------------------------------------------------------------
def test_tracing_is_off_unless_configured() -> None:
    assert trace_settings(env={}) is None
    assert trace_settings(trace=False, env={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}) is None
    assert trace_settings(trace=True, env={"OTEL_SDK_DISABLED": "true"}) is None


def test_settings_follow_the_otel_environment_and_flags_override_it() -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/", "OTEL_SERVICE_NAME": "svc",
           "OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25",
           "OTEL_EXPORTER_OTLP_TIMEOUT": "2500"}
    s = trace_settings(env=env)
    assert s == TraceSettings("http://collector:4318/v1/traces", "svc", 0.25, 2.5)
    s = trace_settings(env=env, endpoint="http://other:9", service_name="x", sample=1.0)
    assert (s.traces_url, s.service_name, s.sample_ratio) == ("http://other:9/v1/traces", "x", 1.0)
    # the signal-specific variable is a full URL, used as given
    s = trace_settings(env={"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:1/custom"})
    assert s.traces_url == "http://c:1/custom"
    assert trace_settings(trace=True, env={}).traces_url == "http://localhost:4318/v1/traces"


@pytest.mark.parametrize("env,flags,needle", [
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4318"}, {}, "OTEL_EXPORTER_OTLP_ENDPOINT"),
    ({}, {"endpoint": "grpc://x:4317"}, "--otlp-endpoint"),
    ({"OTEL_TRACES_SAMPLER": "sometimes"}, {"trace": True}, "OTEL_TRACES_SAMPLER"),
    ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "half"}, {"trace": True}, "OTEL_TRACES_SAMPLER_ARG"),
    ({}, {"trace": True, "sample": 1.5}, "--trace-sample"),
])
def test_bad_tracing_settings_name_what_is_wrong(env: dict, flags: dict, needle: str) -> None:
    with pytest.raises(UserError, match=needle):
        trace_settings(env=env, **flags)


# --- the span tree (in-memory exporter: the tree, not the transport, is under test here) -------
def _traced_sim(exp: dict[str, Any], sample: float = 1.0) -> tuple[Any, list[Any]]:
    e, base = resolve(exp)
    work = build_workload(e.workload, e.seed, base)
    scheduler = build_scheduler(e, work, base)
    exporter = InMemorySpanExporter()
    tracing = ProcessTracing(TraceSettings("http://unused/v1/traces", sample_ratio=sample), "test", exporter=exporter)
    attach_tracer(scheduler, tracing, model=e.model, epoch_ns=10**18)
    run_events(scheduler, work.requests())
    counts = tracing.shutdown()
    spans = list(exporter.get_finished_spans())
    assert counts.ended == counts.exported == len(spans) and counts.dropped == 0
    return scheduler, spans


def _trees(spans: list[Any]) -> dict[int, dict[str, Any]]:
    """request id -> {"root": span, "children": {name: [spans]}, "parent": {span_id: name}}."""
    by_trace: dict[int, list[Any]] = collections.defaultdict(list)
    for s in spans:
        by_trace[s.context.trace_id].append(s)
    out = {}
    for group in by_trace.values():
        roots = [s for s in group if s.parent is None]
        assert len(roots) == 1, "exactly one root per trace"
        names = {s.context.span_id: s.name for s in group}
        kids: dict[str, list[Any]] = collections.defaultdict(list)
        for s in group:
            if s.parent is not None:
                assert s.parent.span_id in names, f"{s.name}: parent missing from its trace"
                kids[s.name].append(s)
        out[roots[0].attributes["hetero.request.id"]] = {"root": roots[0], "children": kids, "names": names}
    return out


def _s(ns: int) -> float:
    return ns / 1e9


def test_disaggregated_trace_tree_has_the_simulated_durations() -> None:
    scheduler, spans = _traced_sim(disagg_experiment(workload={"kind": "synthetic", "num_requests": 150, "rate_per_s": 20.0}))
    trees = _trees(spans)
    records = {r[0]: r for r in scheduler.records}
    assert set(trees) == set(records)
    epoch = 10**18
    for rid, t in trees.items():
        rec = dict(zip(("request_id", "arrival_s", "prompt_tokens", "output_tokens", "predicted_output",
                        "cached_tokens", "status", "reason", "prefill_group", "decode_group", "token1_s",
                        "token2_s", "finish_s", "max_gap_s", "preemptions", "generated"), records[rid]))
        root, kids, names = t["root"], t["children"], t["names"]
        assert root.name == ROOT_PREFIX + "llama-3.1-8b"
        assert _s(root.start_time - epoch) == pytest.approx(rec["arrival_s"], abs=1e-6)
        assert _s(root.end_time - epoch) == pytest.approx(rec["finish_s"], abs=1e-6)
        assert root.attributes["gen_ai.usage.input_tokens"] == rec["prompt_tokens"]
        assert root.attributes["gen_ai.usage.output_tokens"] == rec["generated"]
        assert root.attributes["gen_ai.server.time_to_first_token"] == pytest.approx(rec["token1_s"] - rec["arrival_s"])
        if rec["preemptions"]:
            continue
        # one attempt: queue.prefill -> prefill -> queue.decode (kv_transfer inside) -> decode
        (qp,), (pf,), (qd,), (kv,), (dec,) = (kids[n] for n in ("queue.prefill", "prefill", "queue.decode", "kv_transfer", "decode"))
        assert names[kv.parent.span_id] == "queue.decode"
        assert all(names[s.parent.span_id] == root.name for s in (qp, pf, qd, dec))
        assert qp.end_time == pf.start_time and pf.end_time == qd.start_time and qd.end_time == dec.start_time
        assert qd.start_time <= kv.start_time <= kv.end_time <= qd.end_time
        assert _s(pf.end_time - epoch) == pytest.approx(rec["token1_s"], abs=1e-6)   # prefill makes token 1
        assert dec.end_time == root.end_time
        assert pf.attributes["hetero.group"].startswith("p-") and dec.attributes["hetero.group"] == "d"
        assert kv.attributes["hetero.kv.bytes_true"] > 0 and kv.attributes["hetero.link"].endswith("->d")
        assert dec.attributes["gen_ai.usage.output_tokens"] == rec["generated"] - 1
        assert [e.name for e in root.events] == ["first_token"]


def _overloaded(make: Any) -> dict[str, Any]:
    """Too-short output predictions under overload: reservations run out, requests are preempted."""
    exp = make(predictor={"kind": "constant", "tokens": 8})
    exp["groups"][-1] = dict(exp["groups"][-1], max_num_seqs=128)
    exp["workload"] = dict(exp["workload"], num_requests=150, rate_per_s=20.0,
                           prompt={"kind": "uniform", "low": 2000, "high": 4000},
                           output={"kind": "uniform", "low": 1000, "high": 3000})
    return exp


@pytest.mark.parametrize("make", [disagg_experiment, colocated_experiment])
def test_preemptions_show_as_events_and_retries(make: Any) -> None:
    scheduler, spans = _traced_sim(_overloaded(make))
    trees = _trees(spans)
    preempted = [r for r in scheduler.records if r[14] > 0]
    assert preempted, "the test needs preemptions: shrink kv_blocks"
    for rec in preempted:
        t = trees[rec[0]]
        events = [e.name for e in t["root"].events]
        assert events.count("preempt") == rec[14] and events.count("retry") == rec[14]
        assert len(t["children"]["prefill"]) == rec[14] + 1            # prefilled again after each
        assert len(t["children"]["queue.prefill"]) == rec[14] + 1
        assert len(t["children"]["decode"]) == rec[14] + 1             # each decode attempt ends...
        left = [d.attributes["hetero.left"] for d in sorted(t["children"]["decode"], key=lambda d: d.start_time)]
        assert left == ["preempted"] * rec[14] + ["completed"]        # ...preempted, but the last
        if make is colocated_experiment:
            assert "kv_transfer" not in t["children"]
        else:
            assert len(t["children"]["kv_transfer"]) == rec[14] + 1    # transferred again each time


@pytest.mark.parametrize("name,params", [("colocated", {}), ("colocated-chunked", {"token_budget": 256}),
                                         ("disagg", {"choices": 2, "fallback": True}), ("disagg-slo", {}),
                                         ("disagg-prefix", {}), ("adaptive", {})])
def test_every_policy_gives_whole_traces_with_token_1_at_the_first_prefill_end(name: str, params: dict) -> None:
    make = colocated_experiment if name.startswith("colocated") else disagg_experiment
    exp = make(policy={"name": name, "params": params},
               workload={"kind": "synthetic", "num_requests": 150, "rate_per_s": 30.0})
    scheduler, spans = _traced_sim(exp)
    trees = _trees(spans)
    assert len(trees) == len(scheduler.records) == 150
    epoch = 10**18
    chunks = 0
    for rec in scheduler.records:
        t = trees[rec[0]]
        assert _s(t["root"].end_time - epoch) == pytest.approx(rec[12], abs=1e-6)
        if rec[6] != "completed":
            continue
        prefills = sorted(t["children"]["prefill"], key=lambda s: s.start_time)
        assert prefills and _s(prefills[0].end_time - epoch) == pytest.approx(rec[10], abs=1e-6)
        chunks = max(chunks, max(p.attributes["hetero.chunks"] for p in prefills))
        if rec[15] > 1:
            assert t["children"]["decode"], "a request with more than one token decoded somewhere"
    assert (chunks > 1) == (name == "colocated-chunked"), "chunked prefill shows as one span of several chunks"


def test_rejections_are_error_traces_with_their_reason() -> None:
    exp = disagg_experiment(workload={"kind": "synthetic", "num_requests": 60, "rate_per_s": 20.0,
                                      "prompt": 5_000_000})
    scheduler, spans = _traced_sim(exp)
    assert all(r[6] == "rejected" for r in scheduler.records)
    roots = [s for s in spans if s.parent is None]
    assert len(roots) == 60 and len(spans) == 60
    for root in roots:
        # 5M tokens: beyond Llama-3.1's context window, rejected at arrival (issue 16)
        assert root.status.status_code.name == "ERROR" and "context window" in root.status.description
        assert [e.name for e in root.events] == ["reject"]


@pytest.mark.parametrize("make", [disagg_experiment, colocated_experiment])
def test_tracing_only_observes(make: Any) -> None:
    exp = _overloaded(make)
    e, base = resolve(exp)
    work = build_workload(e.workload, e.seed, base)
    plain = build_scheduler(e, work, base)
    run_events(plain, work.requests())
    traced, _ = _traced_sim(exp)
    assert repr(traced.records) == repr(plain.records)          # repr: NaN-safe, bit-exact floats
    assert traced.decisions == plain.decisions


def test_sampling_keeps_whole_traces() -> None:
    exp = disagg_experiment(workload={"kind": "synthetic", "num_requests": 300, "rate_per_s": 20.0})
    scheduler, spans = _traced_sim(exp, sample=0.3)
    trees = _trees(spans)
    assert 0.15 * 300 < len(trees) < 0.45 * 300
    assert all(len(t["children"]["decode"]) >= 1 for t in trees.values())     # sampled traces are whole


def test_collector_down_costs_a_bounded_wait_and_counts_drops(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as s:                       # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = TraceSettings(f"http://127.0.0.1:{port}/v1/traces", export_timeout_s=1.0)
    t0 = time.perf_counter()
    with caplog.at_level(logging.WARNING):
        r = hs.simulate(disagg_experiment(workload={"kind": "synthetic", "num_requests": 400, "rate_per_s": 20.0}),
                        trace=settings)
    assert time.perf_counter() - t0 < 30
    t = r.summary["tracing"]
    assert t["spans_exported"] == 0 and t["spans_dropped"] == t["spans_ended"] == 400 * 6
    assert "unreachable" in caplog.text


# --- a real Jaeger ----------------------------------------------------------------------------
def _jaeger_trees(traces: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """request id -> {"root", "spans": {name: [span]}, "names", "process": {span_id: process}}."""
    out = {}
    for tr in traces:
        spans = tr["spans"]
        ids = {s["spanID"]: s for s in spans}
        roots = [s for s in spans if not s["references"]]
        assert len(roots) == 1, "one root per trace"
        by_name: dict[str, list[dict]] = collections.defaultdict(list)
        for s in spans:
            for ref in s["references"]:
                assert ref["refType"] == "CHILD_OF" and ref["spanID"] in ids, f"{s['operationName']}: parent missing"
            by_name[s["operationName"]].append(s)
        tags = {t["key"]: t["value"] for t in roots[0]["tags"]}
        out[int(tags["hetero.request.id"])] = {"root": roots[0], "spans": by_name, "ids": ids,
                                               "processes": tr["processes"]}
    return out


def _wait_for_traces(jaeger: Any, service: str, n: int, timeout_s: float = 60) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while True:
        traces = jaeger.traces(service)
        if len(traces) >= n or time.monotonic() > deadline:
            return traces
        time.sleep(0.5)


def test_simulated_run_of_10000_requests_exports_every_span_to_jaeger(jaeger: Any) -> None:
    settings = trace_settings(trace=True, endpoint=jaeger.otlp_endpoint, service_name="sim-10k", env={})
    exp = disagg_experiment(workload={"kind": "synthetic", "num_requests": 10_000, "rate_per_s": 20.0})
    r = hs.simulate(exp, trace=settings)
    t = r.summary["tracing"]
    assert t["spans_dropped"] == 0 and t["spans_exported"] == t["spans_ended"]
    traces = _wait_for_traces(jaeger, "sim-10k", 10_000)
    assert len(traces) == 10_000
    assert sum(len(tr["spans"]) for tr in traces) == t["spans_exported"]
    # the simulated durations: a trace's root lasts arrival -> finish of its record
    finish = {row["request_id"]: row["finish_s"] - row["arrival_s"] for row in r.records.to_pylist()}
    trees = _jaeger_trees(traces[:500])
    for rid, tree in trees.items():
        assert tree["root"]["duration"] == pytest.approx(finish[rid] * 1e6, abs=1.5)     # microseconds


@pytest.mark.ray
def test_live_run_gives_one_whole_trace_per_request_across_processes(ray_cluster: Any, jaeger: Any) -> None:
    from hetero_sched.runtime.live import run_live

    n = 40
    settings = trace_settings(trace=True, endpoint=jaeger.otlp_endpoint, service_name="live-run", env={})
    exp = disagg_experiment(workload={"kind": "synthetic", "num_requests": n, "rate_per_s": 20.0})
    r = run_live(exp, address=ray_cluster.address, clock="virtual", trace=settings)
    t = r.summary["tracing"]
    assert t["spans_dropped"] == 0 and t["processes"] == 4          # scheduler + 3 group actors
    traces = jaeger.traces("live-run")                               # no waiting: the run flushed
    assert len(traces) == n
    assert sum(len(tr["spans"]) for tr in traces) == t["spans_exported"]
    for rid, tree in _jaeger_trees(traces).items():
        spans = tree["spans"]
        assert sorted(spans) == sorted([ROOT_PREFIX + "llama-3.1-8b", "queue.prefill", "prefill", "queue.decode",
                                        "kv_transfer", "kv.encode", "kv.decode", "decode"])
        def pid(name: str) -> Any:
            proc = tree["processes"][spans[name][0]["processID"]]
            return {t["key"]: t["value"] for t in proc["tags"]}["process.pid"]
        assert len({pid("prefill"), pid("decode"), pid("queue.prefill")}) == 3, "scheduler, prefill, decode: 3 processes"
        assert pid("kv.encode") == pid("prefill") and pid("kv.decode") == pid("decode")
        kv = spans["kv_transfer"][0]
        for child in ("kv.encode", "kv.decode"):
            assert spans[child][0]["references"][0]["spanID"] == kv["spanID"]
            tags = {t["key"]: t["value"] for t in spans[child][0]["tags"]}
            assert tags["hetero.kv.bytes_moved"] > 0
        prefill_tags = {t["key"]: t["value"] for t in spans["prefill"][0]["tags"]}
        assert prefill_tags["hetero.compute_s"] >= 0 and prefill_tags["hetero.batch_size"] >= 1


# --- live metrics on Ray's Prometheus endpoint --------------------------------------------------
def _scrape(ray_cluster: Any) -> dict[tuple[str, frozenset], float]:
    """Every ``ray_hetero_*`` sample served by the cluster's metrics agents."""
    import ray
    import urllib.request
    from prometheus_client.parser import text_string_to_metric_families

    samples = {}
    for node in ray.nodes():
        if not node["Alive"]:
            continue
        url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        try:
            text = urllib.request.urlopen(url, timeout=5).read().decode()
        except OSError:
            continue
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name.startswith("ray_hetero_"):
                    samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def _value(samples: dict, name: str, **labels: str) -> list[float]:
    return [v for (n, lab), v in samples.items() if n == name and all((k, x) in lab for k, x in labels.items())]


@pytest.mark.ray
def test_live_metrics_appear_on_the_ray_metrics_endpoint_during_a_run(ray_cluster: Any) -> None:
    import threading

    from hetero_sched.runtime.live import run_live

    n = 160
    exp = disagg_experiment(name="metrics-run", workload={"kind": "synthetic", "num_requests": n, "rate_per_s": 20.0})
    out: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: out.setdefault("r", run_live(exp, address=ray_cluster.address,
                                                                           clock="wall")))
    runner.start()
    seen: list[dict] = []
    while runner.is_alive():
        samples = _scrape(ray_cluster)
        if _value(samples, "ray_hetero_inflight_requests", experiment="metrics-run"):
            seen.append(samples)
        time.sleep(0.5)
    runner.join()
    r = out["r"]
    assert r.summary["completed"] == n
    assert len(seen) >= 3, "metrics must show up while the run is going (within Ray's 1 s report interval)"
    mid = seen[len(seen) // 2]
    # KV blocks: used + free = the group's capacity (from the experiment), used > 0 somewhere mid-run
    capacity = {g.name: g.kv.num_blocks for g in build_groups(parse_experiment(exp), Path.cwd())}
    for group in ("p-0", "p-1", "d"):
        used = _value(mid, "ray_hetero_kv_blocks", experiment="metrics-run", group=group, state="used")
        free = _value(mid, "ray_hetero_kv_blocks", experiment="metrics-run", group=group, state="free")
        assert len(used) == len(free) == 1 and used[0] + free[0] == capacity[group] > 0, (group, used, free)
    assert any(max(_value(s, "ray_hetero_kv_blocks", group="d", state="used", experiment="metrics-run")) > 0
               for s in seen)
    inflight = [_value(s, "ray_hetero_inflight_requests", experiment="metrics-run")[0] for s in seen]
    assert max(inflight) >= 1 and all(0 <= x <= n for x in inflight)
    ttft = [v for s in seen for v in _value(s, "ray_hetero_ttft_seconds", quantile="p50", experiment="metrics-run")]
    assert ttft and all(0 < v < 5 for v in ttft)
    tpot = [v for s in seen for v in _value(s, "ray_hetero_tpot_seconds", quantile="p90", experiment="metrics-run")]
    assert tpot and all(0 < v < 0.05 for v in tpot)
    att = [v for s in seen for v in _value(s, "ray_hetero_slo_attainment", experiment="metrics-run")]
    assert att and all(0 <= v <= 1 for v in att)
    done = [_value(s, "ray_hetero_finished_requests", status="completed", experiment="metrics-run") for s in seen]
    counts = [d[0] for d in done if d]
    assert counts == sorted(counts) and counts[-1] <= n     # monotone, bounded by the run
    assert _value(mid, "ray_hetero_queue_depth", group="d", queue="running", experiment="metrics-run")
    assert _value(mid, "ray_hetero_link_backlog_bytes", group="p-0", experiment="metrics-run")
