"""Metric and goodput maths on hand-computable cases (DESIGN contract §5)."""

from __future__ import annotations

import math

import pytest

from hetero_sched.metrics import SLO, attainment, goodput_search, records_table, summarize


def row(rid, arrival, out, t1, t2, fin, status="completed", reason=None, gap=0.0, code=None):
    return (rid, arrival, 100, out, out, 0, status, reason, 0, 1, t1, t2, fin, gap, 0, out if status == "completed" else 0,
            code)


def test_ttft_tpot_and_attainment_by_hand():
    rows = [
        row(0, 0.0, 11, 0.5, 0.6, 1.5),      # TTFT 0.5, TPOT (1.5-0.5)/10 = 0.1
        row(1, 1.0, 1, 1.2, None, 1.2),      # one token: TTFT 0.2, no TPOT
        row(2, 2.0, 5, 4.5, 4.6, 4.9),       # TTFT 2.5 (miss), TPOT 0.1
        row(3, 3.0, 4, None, None, 3.0, "rejected", "no capacity", code="kv_capacity"),
    ]
    t = records_table(rows, SLO(1.0, 0.2))
    ttft = t.column("ttft_s").to_pylist()
    tpot = t.column("tpot_s").to_pylist()
    assert ttft[:3] == pytest.approx([0.5, 0.2, 2.5])
    assert math.isnan(ttft[3])
    assert tpot[0] == pytest.approx(0.1) and math.isnan(tpot[1]) and tpot[2] == pytest.approx(0.1)
    assert t.column("meets_slo").to_pylist() == [True, True, False, False]
    # rejections count as misses over *all* requests
    assert attainment(t, SLO(1.0, 0.2)) == 0.5
    assert attainment(t, SLO(3.0, 0.05)) == 0.25      # only the one-token request meets TPOT 50 ms
    s = summarize(t, SLO(1.0, 0.2))
    assert s["completed"] == 3 and s["rejected"] == 1
    assert s["reject_reasons"] == {"kv_capacity": 1} and s["reject_examples"] == {"kv_capacity": "no capacity"}
    assert s["output_tokens"] == 17
    assert s["makespan_s"] == pytest.approx(4.9)


def test_goodput_scans_a_grid_before_bisecting():
    # attainment is not monotone: a dip at 3 must not hide the passing region up to 5.5
    def att(rate):
        if rate <= 2.0:
            return 1.0
        if 2.5 <= rate <= 3.2:
            return 0.8
        return 0.95 if rate <= 5.5 else 0.5
    g = goodput_search(att, [1, 2, 3, 4, 5, 6, 7], target=0.9, rel_tol=0.001)
    assert 5.49 <= g.rate_per_s <= 5.5
    assert not g.capped


def test_goodput_zero_and_capped():
    assert goodput_search(lambda r: 0.0, [1, 2]).rate_per_s == 0.0
    g = goodput_search(lambda r: 1.0, [1, 2])
    assert g.capped and g.rate_per_s == 2
