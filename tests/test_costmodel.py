"""Roofline cost model: regimes, kink, pipeline, CS-3 SRAM fit, KV transfer inputs, fitted-profile terms.

(Accuracy against published figures: tests/test_accuracy.py.)
"""

from __future__ import annotations


import pytest

from hetero_sched.catalog import GroupSpec, get_cost_params, get_device, get_model
from hetero_sched.costmodel import (GroupCost, RooflineCost, build_group_cost, decode_time_s, kink_contexts,
                                    step_time_s)
from hetero_sched.errors import UserError
from hetero_sched.speculation import Speculation, SpeculativeCost

GiB = 2**30


def test_roofline_cost_implements_the_core_protocol() -> None:
    cost = build_group_cost(GroupSpec("trn2", 16, tp=64), "llama-3.1-70b")
    assert isinstance(cost, RooflineCost) and isinstance(cost, GroupCost)


def test_kv_inputs_for_transfer_and_capacity_by_hand() -> None:
    cost = build_group_cost(GroupSpec("trn2", 16, tp=64), "llama-3.1-70b")
    # TP64 over 8 KV heads holds 8 replicas of each head; only one copy moves.
    assert cost.transfer_bytes_per_token == 327_680
    assert cost.kv_bytes_per_token == 8 * 327_680
    weights = get_model("llama-3.1-70b").total_params * 2
    assert cost.kv_capacity_tokens == int((16 * 96 * GiB * 0.9 - weights) // (8 * 327_680))
    assert cost.egress_bytes_per_s == cost.ingress_bytes_per_s == pytest.approx(3.2e12 / 8)
    assert cost.dollars_per_hour == pytest.approx(16 * get_cost_params("trn2").dollars_per_hour)


def test_prefill_is_compute_bound_and_attention_is_quadratic() -> None:
    cost = build_group_cost(GroupSpec("h100", 1, tp=1), "llama-3.1-8b")
    model, dev, par = get_model("llama-3.1-8b"), get_device("h100"), get_cost_params("h100")
    n = 8192
    flops = model.flops_per_token * n + 0.5 * model.attn_flops_per_context_token * n * n
    compute_s = flops / (dev.bf16_flops_per_s * par.compute_efficiency)
    memory_s = model.weight_bytes_read(n) / (dev.memory_bytes_per_s * par.memory_efficiency)
    assert compute_s > 10 * memory_s
    assert cost.prefill_time_s([n], [0]) == pytest.approx(compute_s + 32 * par.layer_latency_s, rel=1e-9)
    # A cached prefix is attended to (quadratic cross term), not recomputed (no linear term).
    with_prefix = cost.prefill_time_s([1024], [7168])
    assert cost.prefill_time_s([1024], [0]) < with_prefix < 0.5 * cost.prefill_time_s([n], [0])


def test_decode_is_memory_bound_at_small_batch_and_compute_bound_at_large() -> None:
    cost = build_group_cost(GroupSpec("h100", 1, tp=1), "llama-3.1-8b")
    t1 = step_time_s(cost.decode_step_lines(1), 1000)
    t8 = step_time_s(cost.decode_step_lines(8), 8000)
    assert t8 < 1.15 * t1  # weight reads dominate: batching is nearly free
    t2k = step_time_s(cost.decode_step_lines(2048), 0)
    t4k = step_time_s(cost.decode_step_lines(4096), 0)
    assert t4k / t2k == pytest.approx(2.0, rel=0.05)  # compute roof: time grows with batch


def test_kink_is_where_the_max_switches_line() -> None:
    cost = build_group_cost(GroupSpec("h100", 1, tp=1), "llama-3.1-8b")
    lines = cost.decode_step_lines(1024)
    assert len(lines) == 2
    (kink,) = kink_contexts(lines)
    (a1, s1), (a2, s2) = lines
    assert a1 + s1 * kink == pytest.approx(a2 + s2 * kink, rel=1e-9)
    below = max(lines, key=lambda l: l[0] + l[1] * 0.5 * kink)
    above = max(lines, key=lambda l: l[0] + l[1] * 2.0 * kink)
    assert below != above


def test_span_time_is_the_sum_of_linear_steps() -> None:
    cost = build_group_cost(GroupSpec("trn2", 16, tp=64), "llama-3.1-70b")
    lines = cost.decode_step_lines(4)
    by_hand = sum(step_time_s(lines, 4 * 1000 + 4 * k) for k in range(50))
    assert decode_time_s(cost, 4, 4000, 50) == pytest.approx(by_hand, rel=1e-12)


def test_span_time_across_kinks_is_the_sum_of_its_steps() -> None:
    """A span that crosses the kink of a pipeline's lines: each step takes the max of them."""
    cost = _pipeline(4)
    lines = cost.decode_step_lines(8)
    kinks = kink_contexts(lines)
    assert len(lines) >= 2 and kinks
    steps = int(kinks[-1] / 8) + 50
    by_hand = sum(step_time_s(lines, 8 * 10 + 8 * k) for k in range(steps))
    assert decode_time_s(cost, 8, 80, steps) == pytest.approx(by_hand, rel=1e-12)


def test_remembered_costs_are_per_arguments() -> None:
    """Shipped-catalog costs are remembered: asked alike, the same cost; any argument that differs
    (an override, its value's type, the KV capacity, speculation, the group) gets its own."""
    group = GroupSpec("h100", 1, tp=1)
    base = build_group_cost(group, "llama-3.1-8b")
    assert build_group_cost(GroupSpec("h100", 1, tp=1), "llama-3.1-8b") is base
    slow = build_group_cost(group, "llama-3.1-8b", {"cost.h100.layer_latency_s": 1e-3})
    assert step_time_s(slow.decode_step_lines(1), 0) > step_time_s(base.decode_step_lines(1), 0) + 0.025
    assert build_group_cost(group, "llama-3.1-8b", kv_capacity_tokens=1000).kv_capacity_tokens == 1000
    spec = build_group_cost(group, "llama-3.1-8b", speculation=Speculation(4, 0.75, draft_cost_fraction=0.1))
    assert isinstance(spec, SpeculativeCost)
    assert build_group_cost(GroupSpec("h100", 2, tp=2), "llama-3.1-8b").kv_capacity_tokens > base.kv_capacity_tokens
    build_group_cost(group, "llama-3.1-8b", {"cost.h100.memory_efficiency": 1})
    with pytest.raises(UserError, match="expected a number"):
        build_group_cost(group, "llama-3.1-8b", {"cost.h100.memory_efficiency": True})
    with pytest.raises(UserError, match="expected a number"):      # unhashable: built, not remembered
        build_group_cost(group, "llama-3.1-8b", {"cost.h100.memory_efficiency": [1]})


def _pipeline(count: int) -> RooflineCost:
    ov = {"cost.cs3.layer_latency_s": 1e-3, "cost.cs3.pp_hop_s": 1e-4, "cost.cs3.half_speed_batch": 1e9,
          "cost.cs3.memory_efficiency": 0.8, "cost.cs3.step_overhead_s": 0}
    cost = build_group_cost(GroupSpec("cs3", count, tp=1, pp=count), "llama-3.1-70b", ov)
    assert isinstance(cost, RooflineCost)
    return cost


def test_pipeline_lone_request_pays_every_stage_plus_hops() -> None:
    cost = _pipeline(4)
    read_s = get_model("llama-3.1-70b").weight_bytes / (21e15 * 0.8)  # SRAM read: ~8 us
    assert step_time_s(cost.decode_step_lines(1), 0) == pytest.approx(80 * 1e-3 + read_s + 4 * 1e-4, rel=1e-3)


def test_pipeline_throughput_is_bounded_by_the_slowest_stage() -> None:
    # 80 layers on 6 stages: 14, 14, 13, 13, 13, 13. Six micro-batches keep all stages busy, so a
    # token of each takes 6 x 14 layer-times (84 ms) rather than the 80 ms + 6 hops of a lone one.
    cost = _pipeline(6)
    lone = step_time_s(cost.decode_step_lines(1), 0)
    six = step_time_s(cost.decode_step_lines(6), 0)
    assert lone == pytest.approx(80e-3 + 6e-4, rel=2e-3)
    assert six == pytest.approx(6 * 14 * 1e-3, rel=2e-3)
    assert 6 / six > 5.5 / lone  # ~6x the throughput at ~the same per-user speed


@pytest.mark.parametrize("model, fits_in, needs", [
    ("llama-3.1-8b", 1, 1), ("llama-3.1-70b", 4, 4), ("llama-3.1-405b", 21, 21)])
def test_cs3_sram_fit_and_no_fit(model: str, fits_in: int, needs: int) -> None:
    spec = get_model(model)
    assert spec.num_devices_for(44e9, 0.1) == needs
    cost = build_group_cost(GroupSpec("cs3", fits_in, tp=1, pp=fits_in), model)
    assert cost.kv_capacity_tokens == int((fits_in * 44e9 * 0.9 - spec.weight_bytes) // spec.kv_bytes_per_token())
    if fits_in > 1:
        with pytest.raises(UserError, match=f"needs at least {needs} cs3"):
            build_group_cost(GroupSpec("cs3", fits_in - 1, tp=1, pp=fits_in - 1), model)


def test_cs3_per_user_speed_assumption_halves_at_the_stated_concurrency() -> None:
    cost = build_group_cost(GroupSpec("cs3", 1, tp=1), "llama-3.1-8b")
    half = get_cost_params("cs3").half_speed_batch
    assert half is not None
    b = int(half) + 1
    ratio = step_time_s(cost.decode_step_lines(b), 0) / step_time_s(cost.decode_step_lines(1), 0)
    assert ratio == pytest.approx(2.0, rel=0.02)


def test_overrides_move_predictions() -> None:
    group = GroupSpec("h100", 1, tp=1)
    base = step_time_s(build_group_cost(group, "llama-3.1-8b").decode_step_lines(1), 0)
    fast = build_group_cost(group, "llama-3.1-8b", {"device.h100.hbm_bytes_per_s": 2 * 3.35e12})
    assert step_time_s(fast.decode_step_lines(1), 0) < 0.75 * base


def test_fitted_profile_terms_peers_use(tmp_path) -> None:
    """Per-step, per-stage and per-context-token overheads and the context convention, each as stated."""
    import json

    from hetero_sched.catalog.profiles import load_profile
    from hetero_sched.costmodel import FittedCost, fitted_cost

    base = {"prefill": [1e-2, 1e-4, 1e-8], "decode_pieces": [[8, 2e-2, 5e-7, 4e-5], [1000, 7e-3, 6e-7, 1.6e-4]]}
    terms = {"per_step_s": 2e-3, "prefill_per_stage_s": 1e-3, "per_context_token_s": 1e-7}
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"format": "hetero-sched-profile/1", "kind": "fitted", "device": "a100",
                                "base_device": "a100", "model": "opt-13b", "tp": 1, "pp": 2, "count": 2,
                                "params": {**base, **terms}}))
    shared = dict(kv_capacity_tokens=1, kv_bytes_per_token=1, transfer_bytes_per_token=1, egress_bytes_per_s=1.0,
                  ingress_bytes_per_s=1.0)
    cost = fitted_cost(load_profile(path), str(path), shared)
    assert isinstance(cost, FittedCost) and cost.pp == 2
    n = 500
    assert cost.prefill_time_s([n], [0]) == pytest.approx(1e-2 + 1e-4 * n + 1e-8 * n * n + 2e-3 + 2 * 1e-3 + 1e-7 * n)
    b, c = 4, 4 * 801           # 4 sequences, each 800 known tokens + the one being decoded
    expected = 2e-2 + 5e-7 * c + 4e-5 * b + 2e-3 + 1e-7 * (c - b)
    assert step_time_s(cost.decode_step_lines(b), c) == pytest.approx(expected)
    offset = FittedCost(**{**cost.__dict__, "decode_context_offset": -1.0})
    assert step_time_s(offset.decode_step_lines(b), c) == pytest.approx(expected - 5e-7 * b)
    path.write_text(path.read_text().replace('"per_step_s"', '"per_stpe_s"'))
    with pytest.raises(UserError, match="unknown fitted parameter 'per_stpe_s'"):
        fitted_cost(load_profile(path), str(path), shared)
