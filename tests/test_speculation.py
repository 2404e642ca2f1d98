"""Speculative decoding in the cost model: expected tokens per step, per-token step time, published figures."""

from __future__ import annotations

import math

import pytest

import hetero_sched as hs
from hetero_sched.accuracy import predict_figure
from hetero_sched.catalog import GroupSpec
from hetero_sched.catalog.figures import published_figures
from hetero_sched.costmodel import build_group_cost, step_time_s
from hetero_sched.errors import UserError
from hetero_sched.speculation import Speculation, SpeculativeCost, acceptance_for

CS3_SETTING = Speculation(4, acceptance_rate=0.75, draft_cost_fraction=0.1)
"""The documented setting the cs3 catalog is calibrated with (docs/costmodel.md)."""


def test_expected_tokens_per_step_is_leviathans_formula() -> None:
    assert Speculation(4, acceptance_rate=0.75, draft_cost_fraction=0.1).expected_tokens == pytest.approx(
        (1 - 0.75 ** 5) / 0.25)
    assert Speculation(3, acceptance_rate=1.0, draft_cost_fraction=0.0).expected_tokens == 4
    assert Speculation(3, acceptance_rate=0.0, draft_cost_fraction=0.0).expected_tokens == 1
    assert Speculation(3, tokens_per_step=3.22, draft_cost_fraction=0.05).expected_tokens == 3.22
    alpha = acceptance_for(3.22, 3)
    assert Speculation(3, acceptance_rate=alpha, draft_cost_fraction=0.0).expected_tokens == pytest.approx(3.22)


@pytest.mark.parametrize("kwargs, message", [
    (dict(draft_tokens=0, acceptance_rate=0.5, draft_cost_fraction=0.1), "draft_tokens"),
    (dict(draft_tokens=2, draft_cost_fraction=0.1), "exactly one of acceptance_rate and tokens_per_step"),
    (dict(draft_tokens=2, tokens_per_step=4.0, draft_cost_fraction=0.1), "tokens_per_step must be in"),
    (dict(draft_tokens=2, acceptance_rate=0.5), "exactly one of draft_model and draft_cost_fraction"),
])
def test_inconsistent_settings_are_user_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        Speculation(**kwargs)


def test_per_token_step_is_draft_plus_verify_over_tau() -> None:
    group = GroupSpec("trn2", 16, tp=64)
    plain = build_group_cost(group, "llama-3.1-70b")
    spec = build_group_cost(group, "llama-3.1-70b", speculation=Speculation(7, acceptance_rate=0.8,
                                                                            draft_cost_fraction=0.0175))
    assert isinstance(spec, SpeculativeCost)
    for batch, context in ((1, 10_000), (8, 80_000), (256, 256 * 2000)):
        verify = step_time_s(plain.decode_step_lines(batch, 8), context)
        draft = 7 * 0.0175 * step_time_s(plain.decode_step_lines(batch), context)
        tau = (1 - 0.8 ** 8) / 0.2
        assert step_time_s(spec.decode_step_lines(batch), context) == pytest.approx((verify + draft) / tau, rel=1e-9)
    # verification of 8 tokens costs ~one step when weight reads dominate, ~8 when compute does
    assert step_time_s(plain.decode_step_lines(1, 8), 0) < 1.1 * step_time_s(plain.decode_step_lines(1), 0)
    assert step_time_s(plain.decode_step_lines(2048, 8), 0) > 5 * step_time_s(plain.decode_step_lines(2048), 0)
    # speculation pays at batch 1 and costs at large batch
    assert step_time_s(spec.decode_step_lines(1), 10_000) < 0.4 * step_time_s(plain.decode_step_lines(1), 10_000)
    assert step_time_s(spec.decode_step_lines(2048), 0) > step_time_s(plain.decode_step_lines(2048), 0)


def test_a_draft_model_takes_memory_and_prefills_too() -> None:
    group = GroupSpec("h100", 1, tp=1)
    plain = build_group_cost(group, "llama-3.1-8b")
    drafted = build_group_cost(group, "llama-3.1-8b", speculation=Speculation(3, acceptance_rate=0.7,
                                                                              draft_model="llama-3.2-1b"))
    assert drafted.kv_capacity_tokens < plain.kv_capacity_tokens
    assert drafted.prefill_time_s([2048], [0]) > plain.prefill_time_s([2048], [0])
    assert drafted.transfer_bytes_per_token > plain.transfer_bytes_per_token


# Cerebras' current (speculative) speeds, matched by the documented setting with the catalog's values.
CS3_CURRENT = ["cs3-llama405b-speed", "cs3-qwen3-32b-speed", "cs3-gptoss120b-speed", "cs3-llama70b-oct2024-speed",
               "cs3-qwen3-235b-speed", "cs3-llama8b-current-speed"]


@pytest.mark.parametrize("name", CS3_CURRENT)
def test_cs3_current_speeds_within_25_percent_with_the_documented_setting(name: str) -> None:
    fig = next(f for f in published_figures() if f.name == name)
    s = fig.speculation()
    assert (s.draft_tokens, s.acceptance_rate, s.draft_cost_fraction) == (4, 0.75, 0.1)
    assert predict_figure(fig) == pytest.approx(fig.value_s, rel=0.25), fig.source


def test_without_speculation_the_same_catalog_misses_cerebras_speeds() -> None:
    fig = next(f for f in published_figures() if f.name == "cs3-llama405b-speed")
    cost = build_group_cost(fig.group, fig.model)
    per_token = step_time_s(cost.decode_step_lines(1), 1000)
    assert per_token > 1.5 * fig.value_s


def test_a_speculating_decode_group_lowers_simulated_tpot() -> None:
    base = {"name": "spec", "model": "llama-3.1-70b",
            "groups": [{"name": "d", "device": "cs3", "count": 4, "pp": 4, "role": "both"}],
            "policy": "colocated", "workload": {"kind": "synthetic", "num_requests": 100, "rate_per_s": 2,
                                                "prompt": 500, "output": 200}}
    plain = hs.simulate(base).summary["tpot_s"]["p50"]
    spec = {**base, "groups": [{**base["groups"][0], "speculative": {"draft_tokens": 4, "acceptance_rate": 0.75,
                                                                     "draft_cost_fraction": 0.1}}]}
    fast = hs.simulate(spec).summary["tpot_s"]["p50"]
    assert fast < 0.6 * plain
    assert math.isfinite(fast)
