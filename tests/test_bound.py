"""The goodput bound: hand-checkable pieces, and no simulated goodput above it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hetero_sched.bound import GroupCapacity, fluid_capacity, horizon_rate, upper_bound, workload_work
from hetero_sched.experiment import build_workload, parse_experiment
from hetero_sched.goodput import measure_goodput, simulate_at
from hetero_sched.policies import POLICIES
from hetero_sched import workload as wl

from helpers import colocated_experiment, disagg_experiment


def cap(role: str, p: float, d: float, egress: float = math.inf, ingress: float = math.inf) -> GroupCapacity:
    return GroupCapacity("g", "x", role, p, d, 1, 1.0, egress, ingress, 1.0)


def test_fluid_capacity_by_hand():
    # two prefill groups at 0.1 s/request (20/s) feed one decode group at 0.04 s (25/s)
    assert fluid_capacity([cap("prefill", 0.1, math.inf), cap("prefill", 0.1, math.inf),
                           cap("decode", math.inf, 0.04)]) == pytest.approx(20.0)
    # the decode group's link carries only 10 requests' KV per second
    assert fluid_capacity([cap("prefill", 0.1, math.inf), cap("prefill", 0.1, math.inf),
                           cap("decode", math.inf, 0.04, ingress=10.0)]) == pytest.approx(10.0)
    # flexible groups: A (1 s + 1 s), B (1 s + 3 s): B prefills, A decodes -> 1 req/s (LP optimum)
    assert fluid_capacity([cap("both", 1.0, 1.0), cap("both", 1.0, 3.0)]) == pytest.approx(1.0, rel=1e-9)
    # one flexible group splits its time: 1 / (p + d)
    assert fluid_capacity([cap("both", 0.25, 0.75)]) == pytest.approx(1.0, rel=1e-9)


def test_horizon_rate_by_hand():
    # 10 requests one per unit time, due on arrival, unit work, capacity 1/s: one may miss, so
    # k - 1 <= (k - 1) / rate for every k -> rate <= 1 (the long-trace figure would be 1/0.9)
    rate = horizon_rate(np.arange(10.0), np.zeros(10), np.ones(10), 1.0, 0.9)
    assert rate == pytest.approx(1.0, rel=1e-6)
    # a deadline of 5 s lets the whole burst through at a higher rate: (k-1) <= (k-1)/r + 5
    assert horizon_rate(np.arange(10.0), np.full(10, 5.0), np.ones(10), 1.0, 0.9) > 1.5


def test_perfect_prefix_cache_counts_earlier_full_blocks():
    w = wl.Workload("t", np.array([0.0, 1.0, 2.0]), np.array([1024, 1100, 600]), np.array([2, 2, 2]),
                    prefix_hashes=[(1, 2), (1, 2, 3), (1, 9)], prefix_block_tokens=512)
    work = workload_work(w)
    # request 1 hits blocks 1,2 (1024 tokens); request 2 hits block 1 (512 tokens)
    assert work.cached_fraction == pytest.approx((1024 + 512) / (1024 + 1100 + 600))


def _cases():
    registered = set(POLICIES)
    cases = [("disagg", disagg_experiment()), ("colocated", colocated_experiment())]
    if "disagg-slo" in registered:
        cases.append(("disagg-slo", disagg_experiment(policy="disagg-slo")))
    if "colocated-chunked" in registered:
        cases.append(("colocated-chunked", colocated_experiment(policy="colocated-chunked")))
    if "disagg-prefix" in registered:
        cases.append(("disagg-prefix", disagg_experiment(policy="disagg-prefix")))
    cases.append(("disagg 1 prefill group", disagg_experiment(groups=[
        {"name": "p", "device": "trn2", "count": 4, "tp": 16, "role": "prefill"},
        {"name": "d", "device": "cs3", "count": 1, "role": "decode", "max_num_seqs": 16}])))
    return cases


@pytest.mark.parametrize("tier", ["standard", "high-speed"])
@pytest.mark.parametrize("name,exp", _cases(), ids=[c[0] for c in _cases()])
def test_no_simulated_goodput_exceeds_the_bound(name, exp, tier, tmp_path):
    exp = parse_experiment({**exp, "workload": {**exp["workload"], "num_requests": 300}})
    work = build_workload(exp.workload, exp.seed, tmp_path)
    g = measure_goodput(exp, work, tier, rel_tol=0.05)
    if g.bound.rate_per_s == 0:   # e.g. no H100 batch makes a 2 ms TPOT: even a trickle must miss
        assert simulate_at(exp.model_copy(update={"slo": tier}), work, 0.2)["slo_attainment"] < 0.9
        return
    assert g.rate_per_s <= g.bound.rate_per_s, (name, tier, g.rate_per_s, g.bound.to_dict())
    assert not g.capped
    assert 0 <= g.pct_of_bound <= 100


def test_decode_capacity_scales_with_decode_groups(tmp_path):
    one = parse_experiment(disagg_experiment())
    two = parse_experiment(disagg_experiment(groups=[
        {"name": "p", "device": "trn2", "count": 4, "tp": 16, "replicas": 8, "role": "prefill"},
        {"name": "d", "device": "cs3", "count": 1, "replicas": 2, "role": "decode", "max_num_seqs": 16}]))
    work = build_workload(one.workload, one.seed, tmp_path)
    b1, b2 = upper_bound(one, work), upper_bound(two, work)
    assert b1.capacity_per_s == pytest.approx(min(b1.stages["decode"], b1.stages["prefill"]))
    assert b2.stages["decode"] == pytest.approx(2 * b1.stages["decode"])
    assert b2.rate_per_s >= b1.rate_per_s
