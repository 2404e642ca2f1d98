"""The live runtime on a real labelled Ray cluster (the session fixture): actors, KV, clocks."""

from __future__ import annotations

import time

import msgpack
import numpy as np
import pytest
import ray

import hetero_sched as hs
from hetero_sched.core.events import DecisionKind as D
from hetero_sched.errors import RunFailed, UserError
from hetero_sched.runtime.cluster import object_store_usage
from hetero_sched.policies import PolicyFailed
from hetero_sched.runtime.live import _result, run_live
from hetero_sched.runtime.messages import SCHEMA_VERSION, MessageError, pack, unpack, unpack_any
from hetero_sched.workload import Workload

from helpers import colocated_experiment, disagg_experiment, prefix_families, reference_tokens

pytestmark = pytest.mark.ray


def _check_placement(result, exp):
    expected = {}
    for g in exp["groups"]:
        for r in range(g.get("replicas", 1)):
            name = g["name"] if g.get("replicas", 1) == 1 else f"{g['name']}-{r}"
            expected[name] = (g["device"], g.get("pool") or g["role"])
    for p in result.stamp["placement"]:
        labels = p["node_labels"]
        assert (labels["hetero.device"], labels["hetero.pool"]) == expected[p["group"]]


@pytest.mark.parametrize("make,n", [(disagg_experiment, 300), (colocated_experiment, 150)])
def test_virtual_clock_run_equals_the_simulator(ray_cluster, make, n):
    """Devices at the model's pace give the simulator's run exactly. Each promises its pace
    exactly, so its spans go out in batches (a few calls for hundreds of spans) and end as
    promised, every report checked against its promise when it comes (the tests below show a
    device that reports otherwise changes the run, or fails it)."""
    exp = make()
    exp["workload"] = dict(exp["workload"], num_requests=n)
    live = run_live(exp, address=ray_cluster.address, clock="virtual")
    sim = hs.simulate(exp)
    assert len(live.decisions) == len(sim.decisions) > n
    assert live.decisions == sim.decisions
    assert live.records.equals(sim.records)
    spans = sum(1 for d in sim.decisions if d[1] in (D.PREFILL, D.DECODE, D.CHUNK))
    assert live.summary["runtime"]["span_reports"] == spans
    assert live.summary["runtime"]["actor_calls"] < spans / 4
    assert live.summary["runtime"]["kv_held_after_run"] == 0
    _check_placement(live, exp)
    if make is disagg_experiment:
        assert live.summary["runtime"]["transfers"] == n
        assert live.summary["runtime"]["bytes_moved"] > 0


def test_the_live_runtime_rejects_at_arrival_what_no_group_can_serve(ray_cluster):
    """The arrival check is the core's, so the runtime applies it exactly as the simulator does."""
    exp = disagg_experiment(model="llama-3.1-70b", oracle=True, groups=[
        {"name": "p", "device": "trn2", "count": 16, "tp": 64, "role": "prefill"},
        {"name": "d", "device": "cs3", "count": 4, "pp": 4, "role": "decode"}])
    prompts = np.array([1000, 140_000, 60_000, 2000, 1500, 800])
    w = Workload("long", np.arange(6, dtype=float) * 0.2, prompts, np.full(6, 12))
    live = run_live(exp, address=ray_cluster.address, clock="virtual", workload=w)
    sim = hs.simulate(exp, workload=w)
    assert str(live.records.to_pylist()) == str(sim.records.to_pylist())   # (NaN TTFTs: compare as text)
    assert live.decisions == sim.decisions
    assert live.records.column("reason_code").to_pylist() == [None, "context_too_long", "kv_capacity", None, None, None]
    assert live.summary["runtime"]["transfers"] == 4            # nothing of the two was prefilled or moved


def test_a_user_error_in_the_scheduler_actor_is_one_line(ray_cluster):
    """A user's policy failing inside the scheduler actor (PolicyFailed, a UserError) reaches the
    driver as that UserError — one line from the CLI — not as Ray's task traceback."""
    @ray.remote(num_cpus=0)
    def fails():
        raise PolicyFailed("policy my_mod:P raised ValueError in place(): nope (--debug for the traceback)")

    with pytest.raises(UserError, match=r"^policy my_mod:P raised ValueError in place\(\): nope"):
        _result(fails.remote())


def _tiny_experiment(**over):
    exp = {"name": "kv", "seed": 1, "model": "tiny",
           "groups": [{"name": "p", "device": "trn2", "count": 4, "tp": 16, "role": "prefill"},
                      {"name": "d", "device": "cs3", "count": 1, "role": "decode"}],
           "policy": "disagg",
           "workload": {"kind": "synthetic", "num_requests": 60, "rate_per_s": 50.0,
                        "prompt": {"kind": "uniform", "low": 16, "high": 200},
                        "output": {"kind": "uniform", "low": 4, "high": 32}}}
    exp.update(over)
    return exp


_reference_tokens = reference_tokens


def test_numpy_kv_round_trip_across_nodes_is_token_exact(ray_cluster):
    exp = _tiny_experiment()
    r = run_live(exp, address=ray_cluster.address, clock="virtual", backend="numpy")
    assert r.summary["completed"] == 60
    nodes = {p["group"]: p["node_labels"]["hetero.node"] for p in r.stamp["placement"]}
    assert nodes["p"] != nodes["d"], "prefill and decode must run on different nodes"
    min_margin = _reference_tokens(r, seed=1)
    assert min_margin > 1e-6, "greedy ties would make token equality meaningless"
    assert r.summary["runtime"]["min_margin"] > 1e-6
    assert r.summary["runtime"]["transfers"] == 60


def test_numpy_round_trip_with_prefix_hits_and_preemptions(ray_cluster):
    n, block = 60, 32
    rng = np.random.default_rng(7)
    hashes, prompts = prefix_families(rng, n, block, trim=(0, block // 2))
    # a burst at t=0 into a decode group with room for ~1,000 tokens: reservations of 4 predicted
    # tokens run out and requests are preempted, prefilled again and transferred again
    w = Workload("prefix", np.zeros(n), np.array(prompts), rng.integers(8, 80, n),
                 prefix_hashes=hashes, prefix_block_tokens=block)
    exp = _tiny_experiment(predictor={"kind": "constant", "tokens": 4},
                           overrides={"device.cs3.memory_bytes": 4e5})
    r = run_live(exp, address=ray_cluster.address, clock="virtual", backend="numpy", workload=w)
    assert r.summary["completed"] == n
    assert sum(r.records.column("cached_tokens").to_pylist()) > 0, "prefix hits must happen"
    assert r.summary["preemptions"] > 0, "the small decode memory must force preemptions"
    _reference_tokens(r, seed=1, hashes=hashes, block=block)


def _settled_usage(address: str, quiet_s: float = 1.0, limit_s: float = 15.0) -> tuple[int, int]:
    """The object store's usage once it has not changed for ``quiet_s``: Ray frees an earlier
    test's objects asynchronously after their owners die, so a read right after that test can
    still count one."""
    last, since, deadline = object_store_usage(address), time.monotonic(), time.monotonic() + limit_s
    while time.monotonic() - since < quiet_s and time.monotonic() < deadline:
        time.sleep(0.1)
        now = object_store_usage(address)
        if now != last:
            last, since = now, time.monotonic()
    return last


def test_object_store_returns_to_baseline_and_no_actor_is_left(ray_cluster):
    exp = disagg_experiment()
    exp["workload"] = dict(exp["workload"], num_requests=80)
    before = _settled_usage(ray_cluster.address)
    r = run_live(exp, address=ray_cluster.address, clock="virtual", bytes_scale=1e-2)
    rt = r.summary["runtime"]
    assert rt["bytes_moved"] > 10 * 2**20
    # measured inside the run, while every actor was still alive: refs were released, not orphaned
    assert rt["object_store_after"] == rt["object_store_before"] == {"mib": before[0], "objects": before[1]}
    assert rt["kv_held_after_run"] == 0
    alive = [a for a in ray._private.state.actors().values()
             if a["State"] == "ALIVE" and a["ActorClassName"] in ("DeviceGroupActor", "SchedulerActor")]
    assert alive == []


# --- the devices drive the run: what they report is what the run is --------------------------
def _small(n=200, rate=20.0):
    exp = disagg_experiment()
    exp["workload"] = dict(exp["workload"], num_requests=n, rate_per_s=rate)
    return exp


def test_a_slower_device_slows_exactly_what_it_runs(ray_cluster):
    """Virtual clock, the CS-3 decode device 20% slower than the model: every decode step takes
    1.25x, so TPOT grows by that while prefill (TTFT) is untouched — the run is what the devices
    reported, not the core's arithmetic (at speed 1 the same run equals the simulator). Such a
    device promises its pace exactly: the engine takes its next events while reports are out."""
    exp = _small(n=100)
    sim = hs.simulate(exp)
    slow = run_live(exp, address=ray_cluster.address, clock="virtual", device_speed={"d": 0.8})
    assert slow.decisions != sim.decisions
    assert slow.summary["completed"] == 100
    assert slow.records.column("token1_s").to_pylist() == sim.records.column("token1_s").to_pylist()
    ratio = slow.summary["tpot_s"]["p50"] / sim.summary["tpot_s"]["p50"]
    assert 1.2 < ratio < 1.3
    assert slow.summary["runtime"]["device_pace"] == pytest.approx({"p-0": 1.0, "p-1": 1.0, "d": 1.25})
    # a device without jitter says exactly when its spans end: the engine runs on meanwhile
    assert slow.summary["runtime"]["events_ahead"] > 0.5 * slow.summary["runtime"]["span_reports"]


def test_a_device_that_stops_short_changes_the_run_and_loses_no_token(ray_cluster):
    """A decode device that stops every span of two or more steps one step short: the core
    applies the steps it reported — more, shorter spans — and every request still gets exactly
    its tokens (a request whose last step did not run is not complete)."""
    exp = _small(n=100)
    sim = hs.simulate(exp)
    short = run_live(exp, address=ray_cluster.address, clock="virtual",
                     faults={"short_group": "d", "short_steps": 1})
    rows = short.records.to_pylist()
    assert {r["status"] for r in rows} == {"completed"}
    assert all(r["generated"] == r["output_tokens"] for r in rows)
    spans = lambda r: sum(1 for d in r.decisions if d[1] == D.DECODE)  # noqa: E731
    assert spans(short) > spans(sim)
    assert short.summary["runtime"]["kv_held_after_run"] == 0


def test_the_engine_runs_ahead_of_the_reports_and_fails_a_device_that_reports_early(ray_cluster):
    """Virtual clock: the engine stops for a report only when its next event could come after
    the span's earliest end — a jittered device promises a floor only, and two runs are still
    the same run (which answers the engine waited for depends on the plan alone). A device that
    says it is slower than it runs reports before its promise: the run fails, saying so."""
    exp = _small(n=100)
    runs = [run_live(exp, address=ray_cluster.address, clock="virtual", device_jitter={"d": 0.3}) for _ in range(2)]
    assert runs[0].decisions == runs[1].decisions
    assert runs[0].records.equals(runs[1].records)
    assert runs[0].decisions != hs.simulate(exp).decisions                 # the jitter is in the run
    with pytest.raises(RunFailed, match=r"device-group actor 2 reported span \d+ ending at .* before the "
                                        r"earliest its pace allows"):
        run_live(exp, address=ray_cluster.address, clock="virtual", faults={"overpromise_group": "d"})


def test_an_error_inside_a_device_actor_ends_the_run_naming_its_group(ray_cluster):
    """A device that raises (a bug in its backend, say) is not a crash to fail over and resume:
    the run fails at once with the actor's own error and its group, rather than hang or retry."""
    with pytest.raises(RunFailed, match=r"device-group actor 2 failed: .*injected fault: span \d+ failed on d"):
        run_live(_small(), address=ray_cluster.address, clock="virtual", faults={"error_group": "d", "error_at_span": 2})


def test_wall_clock_results_are_what_the_devices_reported(ray_cluster):
    """Wall clock: the decode device held at half the model's speed reports spans twice as long
    as modeled and TPOT at least doubles (overheads only add to it); prefill devices at full
    speed report the model's durations; the core learns of each span end within milliseconds."""
    exp = _small(n=60, rate=10.0)
    sim = hs.simulate(exp)
    live = run_live(exp, address=ray_cluster.address, clock="wall", device_speed={"d": 0.5})
    s, l, rt = sim.summary, live.summary, live.summary["runtime"]
    assert l["completed"] == 60 and rt["kv_held_after_run"] == 0
    pace = rt["device_pace"]
    assert 1.9 < pace["d"] < 2.3 and 0.97 < pace["p-0"] < 1.15
    assert 1.9 < l["tpot_s"]["p50"] / s["tpot_s"]["p50"] < 6.0
    assert l["ttft_s"]["p50"] == pytest.approx(s["ttft_s"]["p50"], rel=0.5)
    assert rt["span_reports"] >= 2 * 60
    assert 0.0 < rt["report_delay_ms_p50"] < 25.0


def test_control_messages_are_validated():
    data = pack("step", ops=[{"op": "forget", "ids": [1, 2]}], expect=0, seq=0)
    assert unpack(data, "step")["ops"][0]["ids"] == [1, 2]
    with pytest.raises(MessageError, match="expected a step_report message"):
        unpack(data, "step_report")
    with pytest.raises(MessageError, match="import op 0 lacks 'last'"):
        pack("step", ops=[{"op": "import", "id": 1, "ref": 0, "index": 0}], expect=0, seq=0)
    with pytest.raises(MessageError, match="span field 'steps'"):
        pack("span", span={"span_id": 1, "kind": "decode"}, expect=0, seq=0)
    with pytest.raises(MessageError, match="not one of"):
        pack("step", ops=[{"op": "explode"}], expect=0, seq=0)
    with pytest.raises(MessageError, match="schema version"):
        unpack(msgpack.packb({"v": 99, "kind": "step", "ops": []}), "step")
    with pytest.raises(MessageError, match="not valid msgpack"):
        unpack(b"\xc1", "step")
    # a batch's items: span, cut and step messages only, each checked against its own schema
    assert unpack_any(data, ("span", "cut", "step"))["kind"] == "step"
    with pytest.raises(MessageError, match="batch item: expected one of span, cut, step, got 'span_report'"):
        unpack_any(pack("span_report", span_id=1, start_s=0.0, end_s=1.0, steps=1, first_step_end_s=1.0, max_step_s=1.0,
                        tokens={}, margins={}, exports=[], compute_s=0.0, incarnation=1), ("span", "cut", "step"))
    with pytest.raises(MessageError, match="cut message: missing field 'at_s'"):
        unpack_any(msgpack.packb({"v": SCHEMA_VERSION, "kind": "cut", "span_id": 1}), ("span", "cut", "step"))
