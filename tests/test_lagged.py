"""The simulator's control-plane model (``control_plane``: engine/lagged.py)."""

from __future__ import annotations

import pytest

import hetero_sched as hs
from hetero_sched.engine.assembly import build_scheduler, finish_run, resolve
from hetero_sched.engine.lagged import LaggedDevices
from hetero_sched.engine.loop import run_events
from hetero_sched.experiment import build_workload

from helpers import disagg_experiment


def _run(exp, devices):
    e, base = resolve(exp)
    work = build_workload(e.workload, e.seed, base)
    scheduler = build_scheduler(e, work, base)
    run_events(scheduler, work.requests(), devices=devices)
    return finish_run(e, scheduler, work, "simulated")


def test_lagged_devices_without_latency_run_the_plan_exactly():
    """At zero latency the lagged devices' own timelines (cuts stopped where the cut lands) give
    the plain virtual devices' run bit for bit, on a loaded run where decode spans are cut."""
    exp = disagg_experiment(workload={"kind": "synthetic", "num_requests": 400, "rate_per_s": 40.0})
    plain = hs.simulate(exp)
    lagged = _run(exp, LaggedDevices(0.0, 0.0))
    assert plain.decisions == lagged.decisions
    assert plain.records.equals(lagged.records)
    assert sum(1 for d in plain.decisions if d[1] == "cut") > 10


def test_a_lone_request_pays_each_message_once():
    """One request, no contention: its first token comes ``dispatch`` later (the prefill starts
    when its message lands), its second ``dispatch + report + dispatch`` later (the prefill's
    report, then the decode span's message), and its last token a whole number of decode-span
    boundaries after that (the last report's latency is not in it: the token was out already)."""
    d, r = 0.125, 0.0625
    one = {"kind": "synthetic", "num_requests": 1, "rate_per_s": 1.0}
    base = hs.simulate(disagg_experiment(workload=one)).records.to_pylist()[0]
    lag = hs.simulate(disagg_experiment(workload=one, control_plane={"dispatch_ms": d * 1e3, "report_ms": r * 1e3}))
    row = lag.records.to_pylist()[0]
    assert row["token1_s"] - base["token1_s"] == pytest.approx(d, abs=1e-12)
    assert row["token2_s"] - base["token2_s"] == pytest.approx(2 * d + r, abs=1e-12)
    # each later decode span waits for its predecessor's report and its own message
    boundaries = (row["finish_s"] - base["finish_s"] - (2 * d + r)) / (d + r)
    assert boundaries >= 0 and boundaries == pytest.approx(round(boundaries), abs=1e-9)


def test_latency_slows_a_loaded_run_and_every_request_still_ends():
    exp = disagg_experiment(workload={"kind": "synthetic", "num_requests": 400, "rate_per_s": 40.0})
    plain = hs.simulate(exp).summary
    lag = hs.simulate({**exp, "control_plane": {"dispatch_ms": 2.0, "report_ms": 2.0}}).summary
    assert lag["completed"] == plain["completed"] == 400
    assert lag["tpot_s"]["p50"] > plain["tpot_s"]["p50"] * 1.1
    assert lag["ttft_s"]["p50"] > plain["ttft_s"]["p50"] + 0.002
