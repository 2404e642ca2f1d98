"""Sweeps: axes over any field, validation with one-line errors, Ray tasks, resuming."""

from __future__ import annotations

import os
import sys

import pyarrow.parquet as pq
import pytest
import yaml

from hetero_sched import cli
from hetero_sched.errors import UserError
from hetero_sched.sweep import (TOKEN, PointsRate, ShardWriter, batch_size, expand, load_rows, parse_sweep,
                                run_batch, run_points, run_sweep, set_path)

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
    stamps = {p: (p.stat().st_mtime_ns) for p in (out / "shards").glob("*.jsonl")}
    assert stamps
    second = run_sweep(sweep, out)
    assert (second.computed, second.reused) == (0, 4)
    assert {p: p.stat().st_mtime_ns for p in (out / "shards").glob("*.jsonl")} == stamps
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


def many_points_sweep(tmp_path):
    """30 cheap points (no goodput search): 5 rates x 2 decode setups x 3 seeds."""
    exp = disagg_experiment(workload={"kind": "synthetic", "num_requests": 40, "rate_per_s": 20.0})
    return parse_sweep({"name": "many", "experiment": exp, "save_runs": False,
                        "axes": {"workload.rate_per_s": [5.0, 10.0, 20.0, 40.0, 80.0], "seed": [1, 2, 3],
                                 "setup": {"one-decode": {"groups.1.replicas": 1},
                                           "two-decode": {"groups.1.replicas": 2}}}}, tmp_path)


@pytest.mark.ray
def test_an_interrupted_sweep_resumes_on_ray_with_the_rows_of_an_in_process_run(ray_cluster, tmp_path):
    sweep = many_points_sweep(tmp_path)
    points = expand(sweep)
    assert len(points) == 30
    reference = run_sweep(sweep, tmp_path / "local", use_ray=False, points=points)
    assert (reference.computed, reference.reused) == (30, 0)
    # an interrupted run: the first 11 points finished (in-process), then a task died mid-line
    out = tmp_path / "ray"
    out.mkdir()
    run_points(points[:11], out, None, False, use_ray=False)
    with ShardWriter(out) as shard:
        shard.path.write_text('{"point_id": "cut sho')
    assert len(load_rows(out)) == 11
    ticks = []
    resumed = run_sweep(sweep, out, points=points, points_per_task=3, progress=lambda d, t: ticks.append((d, t)))
    assert (resumed.computed, resumed.reused) == (19, 11)
    assert resumed.rows == reference.rows
    assert pq.read_table(out / "sweep.parquet").to_pylist() == pq.read_table(tmp_path / "local" / "sweep.parquet").to_pylist()
    # 19 points in tasks of 3: 7 tasks, each wrote its own shard (2 shards from before the "crash")
    shards = list((out / "shards").glob("*.jsonl"))
    assert len(shards) == 2 + 7
    assert sum(not s.name.startswith(f"{os.getpid()}-") for s in shards) == 7   # by the tasks, not the driver
    assert ticks[0] == (11, 30) and ticks[-1] == (30, 30) and len(ticks) == 1 + 7
    assert resumed.points_per_min is not None and resumed.points_per_min > 0
    again = run_sweep(sweep, out, points=points)
    assert (again.computed, again.reused) == (0, 30) and again.rows == reference.rows


def test_a_task_that_cannot_see_the_folder_returns_its_results(tmp_path):
    points = expand(many_points_sweep(tmp_path))[:2]
    out = tmp_path / "o"
    out.mkdir()
    (out / TOKEN).write_text("driver-token")
    away = run_batch(points, str(out), "another-driver", None, False)
    assert away.count == 2 and [r.row["point_id"] for r in away.results] == [p.point_id for p in points]
    assert load_rows(out) == {}
    here = run_batch(points, str(out), "driver-token", None, False)
    assert here.count == 2 and here.results == []
    assert load_rows(out) == {r.row["point_id"]: r.row for r in away.results}


def test_batch_size_and_points_rate():
    assert batch_size(1000, 5) == 32 and batch_size(100, 5) == 5 and batch_size(3, 8) == 1
    rate = PointsRate()
    assert rate.per_min(40, now=100.0) is None          # the first count: points reused
    assert rate.per_min(40, now=110.0) is None
    assert rate.per_min(100, now=130.0) == pytest.approx(120.0)


def test_bad_points_per_task_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(small_sweep()))
    monkeypatch.setattr(sys, "argv", ["hetero-sched", "sweep", str(f), "--out", str(tmp_path / "o"), "-q",
                                      "--points-per-task", "0"])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--points-per-task" in err and len(err.strip().splitlines()) == 1, err
