"""The planner finds the best goodput per dollar of a tiny space, with and without pruning."""

from __future__ import annotations


import pytest

import hetero_sched as hs
from hetero_sched.experiment import build_workload
from hetero_sched.planner import PlanFile, experiment_for, plan_search, shapes
from hetero_sched.workload import scale_to_rate


def tiny_plan(**over) -> PlanFile:
    doc = {
        "name": "tiny", "model": "llama-3.1-8b", "seed": 1,
        "workload": {"kind": "synthetic", "num_requests": 200, "rate_per_s": 10.0},
        "slo": "standard",
        "devices": {"trn2": {"max_chips": 8, "roles": ["prefill"], "counts": [4], "pp": [1]},
                    "cs3": {"max_chips": 2, "roles": ["decode"], "counts": [1]},
                    "h100": {"max_chips": 2, "roles": ["both"], "counts": [1], "pp": [1]}},
        "max_replicas": 2, "rel_tol": 0.05, "max_evaluations": 100,
    }
    doc.update(over)
    return PlanFile.model_validate(doc)


def test_shapes_are_valid_and_fit_the_model():
    plan = tiny_plan(devices={"trn2": {"max_chips": 16, "roles": ["prefill"]}})
    got = {(s.count, s.tp, s.pp) for s in shapes(plan, "trn2")}
    assert (16, 64, 1) in got and (4, 16, 1) in got and (16, 16, 4) in got
    assert all(tp * pp == 4 * count for count, tp, pp in got)


def test_planner_finds_the_brute_force_best_and_pruning_keeps_it(tmp_path):
    plan = tiny_plan()
    full = plan_search(plan.model_copy(update={"prune": False}), tmp_path)
    pruned = plan_search(plan, tmp_path)
    # 2 prefill counts x 2 decode counts + 2 colocated counts = 6 candidates, all simulated
    assert full.candidates == 6 and full.evaluated == 6 and full.pruned == 0
    # brute force, independent of the planner and its goodput search: simulate every configuration
    # on a fixed 6%-step rate grid and read attainment off the records by hand
    workload = build_workload(plan.workload, plan.seed, tmp_path)
    by_hand = {label: _brute_force_requests_per_dollar(plan, e.candidate, workload, tmp_path)
               for label, e in ((e.candidate.label(), e) for e in full.ranked)}
    best = max(by_hand, key=by_hand.get)
    assert full.ranked[0].candidate.label() == best
    assert pruned.ranked[0].candidate.label() == best
    # the planner bisects to rel_tol 5%, the grid steps 6%: the two agree within both
    assert pruned.ranked[0].goodput.requests_per_dollar == pytest.approx(by_hand[best], rel=0.12)
    assert pruned.evaluated < full.evaluated   # the bound did skip something
    for e in full.ranked:                      # and it never ranks below what it bounds
        assert e.goodput.rate_per_s <= e.candidate.bound.rate_per_s


def _brute_force_requests_per_dollar(plan, candidate, workload, base) -> float:
    """SLO-meeting requests per dollar at the highest rate of a geometric grid (1 to 2,000 req/s,
    6% steps: attainment is not monotone on a finite trace, so all of it) where >= 90% of all
    requests complete within TTFT 2 s and TPOT 50 ms, counted from the records."""
    exp = experiment_for(plan, candidate, base)
    best = 0.0
    rate = 1.0
    while rate < 2000:
        rows = hs.simulate(exp, workload=scale_to_rate(workload, rate)).records.to_pylist()
        ok = 0
        for r in rows:
            if r["status"] != "completed":
                continue
            ttft = r["token1_s"] - r["arrival_s"]
            tpot = (r["finish_s"] - r["token1_s"]) / (r["output_tokens"] - 1) if r["output_tokens"] > 1 else 0.0
            ok += ttft <= 2.0 and tpot <= 0.05
        if ok >= 0.9 * len(rows):
            best = rate
        rate *= 1.06
    return best * 3600 / candidate.dollars_per_hour


def test_budget_and_chip_limits_restrict_candidates(tmp_path):
    plan = tiny_plan(budget_dollars_per_hour=30.0)
    result = plan_search(plan.model_copy(update={"prune": False}), tmp_path)
    assert {e.candidate.label() for e in result.ranked} == {"h100[1]:both", "2×h100[1]:both"}
    assert all(e.candidate.dollars_per_hour <= 30.0 for e in result.ranked)


def test_a_space_of_thousands_is_bounded_once_and_simulated_only_up_to_the_cap(tmp_path, monkeypatch):
    from hetero_sched import planner
    from hetero_sched.bound import BoundMaker

    plan = PlanFile.model_validate({
        "name": "wide", "model": "llama-3.1-70b", "seed": 1, "slo": "standard",
        "workload": {"kind": "synthetic", "num_requests": 40, "rate_per_s": 5.0},
        "devices": {"trn2": {"max_chips": 64, "roles": ["prefill", "both"]},
                    "cs3": {"max_chips": 16, "roles": ["decode", "both"]},
                    "h100": {"max_chips": 64, "roles": ["prefill", "decode", "both"]}},
        "max_replicas": 2, "max_evaluations": 2, "rel_tol": 0.2})
    bounds = []
    real_bound = BoundMaker.bound
    monkeypatch.setattr(BoundMaker, "bound", lambda self, caps: bounds.append(1) or real_bound(self, caps))
    result = planner.plan_search(plan, tmp_path)
    assert result.candidates >= 1000
    assert len(bounds) == result.candidates          # one bound per candidate, none twice
    assert result.evaluated == 2 and result.stopped_early
    assert result.ranked[0].goodput.requests_per_dollar >= result.ranked[1].goodput.requests_per_dollar
