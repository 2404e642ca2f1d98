"""`hetero-sched sensitivity`: designs, intervals, repricing, ratios and the tornado plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from hetero_sched.sensitivity import Parameter, apply_design, designs, run_sensitivity, tornado_png
from hetero_sched.sweep import load_sweep_or_experiment, parse_sweep

SWEEP = {
    "name": "tiny",
    "experiment": {"name": "tiny", "model": "llama-3.1-8b",
                   "groups": [{"name": "g", "device": "h100", "count": 1, "role": "both"}],
                   "policy": "colocated",
                   "workload": {"kind": "synthetic", "num_requests": 40, "rate_per_s": 4, "prompt": 200, "output": 30}},
    "axes": {"policy.name": ["colocated", "colocated-chunked"]},
    "goodput": {"tiers": ["standard"]},
    "ratios": {"chunked-over-plain": {"numerator": {"policy.name": ["colocated-chunked"]},
                                      "denominator": {"policy.name": ["colocated"]},
                                      "metric": "goodput_tokens_per_s_standard"}},
}


def test_latin_hypercube_puts_one_sample_in_each_stratum() -> None:
    params = [Parameter("a", 1.0, 0.0, 2.0, "assumed", ""), Parameter("b", 10.0, 1.0, 100.0, "assumed", "")]
    ds = designs(params, samples=8, seed=3)
    assert [d.kind for d in ds[:5]] == ["baseline", "low", "high", "low", "high"]
    joint = [d for d in ds if d.kind == "joint"]
    assert len(joint) == 8
    a = sorted(d.values["a"] for d in joint)
    assert all(i / 8 * 2 <= v < (i + 1) / 8 * 2 for i, v in enumerate(a))
    b = sorted(d.values["b"] for d in joint)         # log-uniform: one per decade-eighth
    assert all(10 ** (i / 4) <= v < 10 ** ((i + 1) / 4) for i, v in enumerate(b))
    assert designs(params, 8, 3) == ds


def test_apply_design_sets_overrides_and_speculative_acceptance() -> None:
    exp = {"groups": [{"name": "d", "speculative": {"draft_tokens": 4, "acceptance_rate": 0.75,
                                                    "draft_cost_fraction": 0.1}}],
           "overrides": {"cost.cs3.dollars_per_hour": 80}}
    d = designs([Parameter("speculative.acceptance_rate", 0.75, 0.6, 0.9, "assumed", ""),
                 Parameter("cost.cs3.dollars_per_hour", 100, 50, 250, "assumed", ""),
                 Parameter("cost.cs3.pp_hop_s", 1e-5, 2e-6, 1e-4, "assumed", "")], 0, 0)[1]
    out = apply_design(exp, d)
    assert out["groups"][0]["speculative"]["acceptance_rate"] == 0.6
    assert out["overrides"]["cost.cs3.dollars_per_hour"] == 80       # the experiment's own override stays
    assert out["overrides"]["cost.cs3.pp_hop_s"] == 1e-5
    assert exp["groups"][0]["speculative"]["acceptance_rate"] == 0.75


def test_sensitivity_runs_intervals_ratio_and_tornado(tmp_path: Path) -> None:
    sweep = parse_sweep(SWEEP, tmp_path)
    outcome = run_sensitivity(sweep, tmp_path / "s", samples=4, seed=0, include=("cost.h100.",), use_ray=False)
    summ = outcome.summary
    keys = [p["key"] for p in summ["parameters"]]
    assert "cost.h100.dollars_per_hour" in keys and "cost.h100.memory_efficiency" in keys
    assert summ["designs"] == 1 + 2 * len(keys) + 4
    price = next(p for p in summ["parameters"] if p["key"] == "cost.h100.dollars_per_hour")
    out = summ["outputs"]["policy.name=colocated standard tokens per dollar"]
    by = {e["param"]: e for e in out["one_at_a_time"]}
    # repriced, not re-simulated: goodput per dollar scales with 1/price
    assert by["cost.h100.dollars_per_hour"]["at_low"] == pytest.approx(out["baseline"] * price["nominal"] / price["low"])
    tput = summ["outputs"]["policy.name=colocated standard tokens per s"]
    assert {e["param"]: e for e in tput["one_at_a_time"]}["cost.h100.dollars_per_hour"]["swing"] == 0
    ratio = summ["outputs"]["ratio chunked-over-plain"]
    assert ratio["baseline"] is not None and ratio["joint"]["min"] <= ratio["joint"]["max"]
    assert json.loads((tmp_path / "s" / "sensitivity.json").read_text())["designs"] == summ["designs"]
    png = tornado_png(summ, "policy.name=colocated standard tokens per s", tmp_path / "t.png")
    assert png.stat().st_size > 5000
    again = run_sensitivity(sweep, tmp_path / "s", samples=4, seed=0, include=("cost.h100.",), use_ray=False)
    assert again.computed == 0 and again.summary == summ


def test_an_experiment_file_is_a_one_point_sweep(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({**SWEEP["experiment"], "slo": "high-speed"}))
    sweep = load_sweep_or_experiment(path)
    assert sweep.goodput is not None and sweep.goodput.tiers == ("high-speed",) and not sweep.axes
