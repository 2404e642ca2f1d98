"""The live runtime on a real labelled Ray cluster (the session fixture): actors, KV, clocks."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import ray

import hetero_sched as hs
from hetero_sched.catalog import get_model
from hetero_sched.errors import UserError
from hetero_sched.runtime.cluster import object_store_usage
from hetero_sched.policies import PolicyFailed
from hetero_sched.runtime.live import _result, run_live
from hetero_sched.runtime.messages import MessageError, pack, unpack
from hetero_sched.tinylm import TinyLM, prompt_token_ids
from hetero_sched.workload import Workload

from helpers import colocated_experiment, disagg_experiment

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
    exp = make()
    exp["workload"] = dict(exp["workload"], num_requests=n)
    live = run_live(exp, address=ray_cluster.address, clock="virtual")
    sim = hs.simulate(exp)
    assert len(live.decisions) == len(sim.decisions) > n
    assert live.decisions == sim.decisions
    assert live.records.equals(sim.records)
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


def _reference_tokens(result, seed, hashes=None, block=512):
    lm = TinyLM("tiny", seed)
    vocab = get_model("tiny").vocab_size
    margins = []
    for row in result.records.to_pylist():
        rid = row["request_id"]
        ids = prompt_token_ids(rid, row["prompt_tokens"], vocab, hashes[rid] if hashes else None, block, seed)
        toks, margin = lm.generate(ids, row["output_tokens"])
        margins.append(margin)
        assert result.tokens[rid] == toks, f"request {rid}"
    return min(margins)


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
    families = [tuple(int(x) for x in rng.integers(0, 1 << 40, 4)) for _ in range(3)]
    hashes, prompts = [], []
    for i in range(n):
        own = tuple(int(x) for x in rng.integers(0, 1 << 40, int(rng.integers(0, 3))))
        h = families[i % 3][: int(rng.integers(1, 5))] + own
        hashes.append(h)
        prompts.append(len(h) * block - int(rng.integers(0, block // 2)))
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


def test_object_store_returns_to_baseline_and_no_actor_is_left(ray_cluster):
    exp = disagg_experiment()
    exp["workload"] = dict(exp["workload"], num_requests=80)
    before = object_store_usage(ray_cluster.address)
    r = run_live(exp, address=ray_cluster.address, clock="virtual", bytes_scale=1e-2)
    rt = r.summary["runtime"]
    assert rt["bytes_moved"] > 10 * 2**20
    # measured inside the run, while every actor was still alive: refs were released, not orphaned
    assert rt["object_store_after"] == rt["object_store_before"] == {"mib": before[0], "objects": before[1]}
    assert rt["kv_held_after_run"] == 0
    alive = [a for a in ray._private.state.actors().values()
             if a["State"] == "ALIVE" and a["ActorClassName"] in ("DeviceGroupActor", "SchedulerActor")]
    assert alive == []


def test_wall_clock_run_tracks_the_simulator(ray_cluster):
    exp = disagg_experiment()
    exp["workload"] = dict(exp["workload"], num_requests=60, rate_per_s=10.0)
    live = run_live(exp, address=ray_cluster.address, clock="wall", time_scale=1.0)
    sim = hs.simulate(exp)
    assert live.summary["completed"] == 60
    # wall clock adds real overheads, but the shape of the run stays the simulator's
    assert live.summary["ttft_s"]["p50"] == pytest.approx(sim.summary["ttft_s"]["p50"], rel=0.5, abs=0.02)
    assert live.summary["runtime"]["lateness_ms_p50"] >= 0.0
    assert live.summary["runtime"]["kv_held_after_run"] == 0


def test_control_messages_are_validated():
    data = pack("step", ops=[{"op": "forget", "ids": [1, 2]}], expect=0)
    assert unpack(data, "step")["ops"][0]["ids"] == [1, 2]
    with pytest.raises(MessageError, match="expected a step_report message"):
        unpack(data, "step_report")
    with pytest.raises(MessageError, match="decode op 0 lacks 'steps'"):
        pack("step", ops=[{"op": "decode", "joiners": []}], expect=0)
    with pytest.raises(MessageError, match="not one of"):
        pack("step", ops=[{"op": "explode"}], expect=0)
    with pytest.raises(MessageError, match="schema version"):
        unpack(msgpack.packb({"v": 99, "kind": "step", "ops": []}), "step")
    with pytest.raises(MessageError, match="not valid msgpack"):
        unpack(b"\xc1", "step")
