"""`hetero-sched report`: tables and PNGs from a sweep folder; utilization from spans."""

from __future__ import annotations

import sys

import pyarrow as pa
import pytest
import yaml

from hetero_sched import cli
from hetero_sched.plots import busy_intervals
from hetero_sched.sweep import parse_sweep, run_sweep

from helpers import colocated_experiment, disagg_experiment


def test_busy_intervals_apply_cuts():
    t = pa.table({"time_s": [0.0, 1.0, 1.5, 2.0], "kind": ["prefill", "decode", "cut", "place"],
                  "group_id": [0, 1, 1, 0], "request_id": [None, None, None, 3],
                  "duration_s": [0.5, 2.0, None, None], "end_s": [None, None, 1.8, None]})
    assert busy_intervals(t) == {0: [(0.0, 0.5)], 1: [(1.0, 1.8)]}


def test_report_writes_plots_and_a_table(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    doc = {"name": "r", "experiment": disagg_experiment(workload={"kind": "synthetic", "num_requests": 100,
                                                                   "rate_per_s": 10.0}),
           "axes": {"setup": {"disagg": {"policy.name": "disagg"},
                              "colocated": {"policy.name": "colocated",
                                            "groups": colocated_experiment()["groups"]}}},
           "goodput": {"tiers": ["standard", "high-speed"], "rel_tol": 0.1}}
    run_sweep(parse_sweep(doc, tmp_path), tmp_path / "s", use_ray=False)
    monkeypatch.setattr(sys, "argv", ["hetero-sched", "report", str(tmp_path / "s")])
    try:
        cli.main()
    except SystemExit as exc:   # typer may exit 0 after a successful command
        assert not exc.code
    out = capsys.readouterr().out
    for name in ("attainment_vs_rate", "goodput_per_dollar", "latency_cdf", "utilization"):
        png = tmp_path / "s" / "plots" / f"{name}.png"
        assert png.stat().st_size > 10_000, name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "goodput" in out and "colocated" in out and "disagg" in out


def test_report_of_a_non_sweep_folder_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["hetero-sched", "report", str(tmp_path)])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 2 and "not a sweep folder" in capsys.readouterr().err


def test_missing_matplotlib_is_one_line(tmp_path, monkeypatch, capsys):
    doc = {"name": "r", "experiment": disagg_experiment(workload={"kind": "synthetic", "num_requests": 50,
                                                                   "rate_per_s": 10.0})}
    run_sweep(parse_sweep(doc, tmp_path), tmp_path / "s", use_ray=False)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(sys, "argv", ["hetero-sched", "report", str(tmp_path / "s")])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "pip install 'hetero-sched[plot]'" in err and len(err.strip().splitlines()) == 1
