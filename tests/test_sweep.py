"""Sweeps: axes over any field, validation with one-line errors, Ray tasks, resuming."""

from __future__ import annotations

import sys

import pyarrow.parquet as pq
import pytest
import yaml

from hetero_sched import cli
from hetero_sched.errors import UserError
from hetero_sched.sweep import expand, parse_sweep, run_sweep, set_path

from helpers import disagg_experiment


def small_sweep(**over):
    exp = disagg_experiment(workload={"kind": "synthetic", "num_requests": 120, "rate_per_s": 20.0})
    doc = {"name": "t", "experiment": exp,
           "axes": {"policy.name": ["disagg"], "workload.rate_per_s": [10.0, 40.0],
                    "setup": {"one-decode": {"groups.1.replicas": 1},
                              "two-decode": {"groups.1.replicas": 2, "overrides.cost.cs3.dollars_per_hour": 50}}},
           "goodput": {"tiers": ["standard"], "rel_tol": 0.1}}
    doc.update(over)
    return doc


def test_set_path_lists_dicts_and_override_keys():
    d = {"groups": [{"count": 1}], "overrides": {}}
    set_path(d, "groups.0.count", 4)
    set_path(d, "overrides.cost.cs3.dollars_per_hour", 80)
    set_path(d, "policy.params.choices", 2)
    assert d == {"groups": [{"count": 4}], "overrides": {"cost.cs3.dollars_per_hour": 80},
                 "policy": {"params": {"choices": 2}}}
    with pytest.raises(UserError, match="no list item '3'"):
        set_path(d, "groups.3.count", 1)


def test_expand_makes_the_grid_with_labels(tmp_path):
    points = expand(parse_sweep(small_sweep(), tmp_path))
    assert len(points) == 4
    assert [p.axes["setup"] for p in points] == ["one-decode", "two-decode"] * 2
    assert points[1].experiment["overrides"] == {"cost.cs3.dollars_per_hour": 50}
    assert points[3].experiment["workload"]["rate_per_s"] == 40.0
    assert len({p.point_id for p in points}) == 4


@pytest.mark.parametrize("axes,message", [
    ({"polcy.name": ["disagg"]}, "'polcy' is not an experiment field"),
    ({"workload.rate": [1.0]}, "point workload.rate=1.0: experiment: workload.rate: Extra inputs"),
    ({"policy.name": ["fastest"]}, "unknown policy 'fastest'"),
    ({"groups.7.count": [2]}, "no list item '7'"),
    ({"setup": {"a": 3}}, "each alternative must map fields to values"),
])
def test_a_bad_axis_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, axes, message):
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(small_sweep(axes=axes)))
    monkeypatch.setattr(sys, "argv", ["hetero-sched", "sweep", str(f), "--out", str(tmp_path / "o"), "-q"])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.ray
def test_sweep_runs_on_ray_writes_parquet_and_resumes(ray_cluster, tmp_path):
    sweep = parse_sweep(small_sweep(), tmp_path)
    out = tmp_path / "s"
    first = run_sweep(sweep, out)
    assert (first.computed, first.reused) == (4, 0)
    table = pq.read_table(out / "sweep.parquet")
    assert table.num_rows == 4
    rows = table.to_pylist()
    assert {r["status"] for r in rows} == {"ok"}
    for col in ("policy.name", "workload.rate_per_s", "setup", "slo_attainment", "goodput_rps_standard",
                "pct_of_bound_standard", "bound_rps"):
        assert col in table.column_names
    assert all(r["goodput_rps_standard"] <= r["bound_rps_standard"] for r in rows)
    # point ran on a Ray worker, not here: its run folder came back through the object store
    assert (out / "points" / rows[0]["point_id"] / "run" / "decisions.parquet").stat().st_size > 0
    stamps = {p: (p.stat().st_mtime_ns) for p in (out / "points").rglob("row.json")}
    second = run_sweep(sweep, out)
    assert (second.computed, second.reused) == (0, 4)
    assert {p: p.stat().st_mtime_ns for p in (out / "points").rglob("row.json")} == stamps
    assert pq.read_table(out / "sweep.parquet").to_pylist() == rows
    # a new axis value runs only the new points
    third = run_sweep(parse_sweep(small_sweep(axes={**small_sweep()["axes"], "workload.rate_per_s": [10.0, 40.0, 80.0]}),
                                  tmp_path), out)
    assert (third.computed, third.reused) == (2, 4)


def test_incompatible_point_is_an_error_row_not_a_crash(tmp_path):
    doc = small_sweep(axes={"policy.name": ["disagg", "colocated"]}, goodput=None)
    outcome = run_sweep(parse_sweep(doc, tmp_path), tmp_path / "o", use_ray=False)
    status = {r["policy.name"]: (r["status"], r["error"]) for r in outcome.rows}
    assert status["disagg"] == ("ok", None)
    assert status["colocated"][0] == "error" and "colocated" in status["colocated"][1]
